"""SPRINT: TREAD's routed tokens fused back with the dense ones by a linear layer over [dense ; deep]."""

import pytest
import torch
from safetensors.torch import save_file

from pixrun.config import ConfigError, load_config
from pixrun.export import ExportError, export_run
from pixrun.flops import denoiser_flops, training_flops
from pixrun.model import Denoiser, ModelConfig, TokenRouting
from pixrun.pipeline import Pipeline
from pixrun.pretrained import load_init_weights
from pixrun.text import TextTower
from pixrun.train import train
from tests.conftest import TINY_OVERRIDES
from tests.helpers import assert_resumed_as_straight
from tests.test_tread import TINY, generators, inputs, random_model

SPAN = TokenRouting(fusion="sprint").sprint_span(4)  # blocks 1 and 2 of 4


def sprint_model(fresh_fusion: bool = True) -> tuple[Denoiser, Denoiser]:
    """TREAD's random denoiser, and the same weights with SPRINT's fusion: at its initialisation, or random."""
    tread = random_model()
    sprint = Denoiser(ModelConfig(**TINY), SPAN)
    missing, unexpected = sprint.load_state_dict(tread.state_dict(), strict=False)
    assert sorted(missing) == ["sprint_fusion.linear.bias", "sprint_fusion.linear.weight", "sprint_fusion.mask_token"]
    assert not unexpected
    if not fresh_fusion:
        with torch.no_grad():
            for p in sprint.sprint_fusion.parameters():
                p.normal_(std=0.05)
    return tread, sprint


def test_a_fresh_fusion_routes_and_runs_dense_exactly_as_tread():
    tread, sprint = sprint_model()
    x, t, txt, mask = inputs()
    plan = tread.plan_routing(TokenRouting(), 16, generators(2, 0), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(sprint(x, t, txt, mask, routing=plan), tread(x, t, txt, mask, routing=plan),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(sprint(x, t, txt, mask), tread(x, t, txt, mask), atol=1e-6, rtol=0)
        trained = sprint_model(fresh_fusion=False)[1]
        assert not torch.allclose(trained(x, t, txt, mask, routing=plan), tread(x, t, txt, mask, routing=plan))


@pytest.mark.parametrize("routed", [True, False])
def test_the_fused_tokens_are_the_linear_layer_over_dense_and_deep(routed):
    _, sprint = sprint_model(fresh_fusion=False)
    x, t, txt, mask = inputs()
    plan = sprint.plan_routing(TokenRouting(), 16, generators(2, 0), "cpu") if routed else None
    seen = {}
    hooks = [sprint.blocks[SPAN.start - 1].register_forward_hook(lambda m, args, out: seen.update(dense=out)),
             sprint.blocks[SPAN.stop - 1].register_forward_hook(lambda m, args, out: seen.update(deep=out)),
             sprint.blocks[SPAN.stop].register_forward_pre_hook(lambda m, args: seen.update(fused=args[0]))]
    with torch.no_grad():
        sprint(x, t, txt, mask, routing=plan)
    for hook in hooks:
        hook.remove()
    fusion, dense, deep = sprint.sprint_fusion, seen["dense"], seen["deep"]
    if routed:  # the dropped tokens as they skipped the span, marked by the mask token
        assert dense.shape == (2, 16, 64) and deep.shape == (2, 8, 64)
        index = plan.kept_index[..., None].expand(-1, -1, 64)
        deep = (dense + fusion.mask_token).scatter(1, index, deep)
    expected = dense @ fusion.linear.weight[:, :64].T + deep @ fusion.linear.weight[:, 64:].T + fusion.linear.bias
    torch.testing.assert_close(seen["fused"], expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_fusion_and_the_mask_token_from_its_initialisation():
    _, sprint = sprint_model()
    x, t, txt, mask = inputs()
    plan = sprint.plan_routing(TokenRouting(), 16, generators(2, 0), "cpu")
    sprint(x, t, txt, mask, routing=plan).square().mean().backward()
    for name, p in sprint.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    sprint.zero_grad(set_to_none=True)
    sprint(x, t, txt, mask).square().mean().backward()  # dense: no token is dropped, the mask token is not used
    assert sprint.sprint_fusion.mask_token.grad is None and sprint.sprint_fusion.linear.weight.grad.abs().sum() > 0


def test_routing_no_token_is_the_dense_forward():
    _, sprint = sprint_model(fresh_fusion=False)
    x, t, txt, mask = inputs()
    keep_all = sprint.plan_routing(TokenRouting(fraction=0.0), 16, generators(2, 0), "cpu")
    assert keep_all.kept_index.shape == (2, 16)
    with torch.no_grad():
        torch.testing.assert_close(sprint(x, t, txt, mask, routing=keep_all), sprint(x, t, txt, mask),
                                   atol=1e-5, rtol=1e-5)
    other_span = sprint.plan_routing(TokenRouting(start=2), 16, generators(2, 0), "cpu")
    with pytest.raises(ValueError, match="SPRINT fuses after"):
        sprint(x, t, txt, mask, routing=other_span)


def test_its_fusion_is_counted_and_checked(tmp_path):
    model = ModelConfig(**TINY)
    plain, fused = (denoiser_flops(model, 32, 5, TokenRouting(), sprint_span=span)[0] for span in (None, SPAN))
    assert fused - plain == 2 * 16 * (2 * 64) * 64  # the linear layer on all 16 tokens
    with pytest.raises(ConfigError, match="tread.fusion must be tread or sprint, got 'dense'"):
        load_config(None, [*TINY_OVERRIDES, f"run_dir={tmp_path}", "tread.fusion=dense"])
    with pytest.raises(ConfigError, match="select no block of a depth-2 model"):  # SPRINT needs a span, routed or not
        load_config(None, [*TINY_OVERRIDES, f"run_dir={tmp_path}", "tread.fusion=sprint"])


def sprint_config(tmp_path, run, *overrides):
    return load_config(None, [*TINY_OVERRIDES, f"run_dir={tmp_path / run}", "model.depth=3", "tread.enabled=true",
                              "tread.fusion=sprint", "train.checkpoint_every=2", "train.sample_every=4", *overrides])


def test_a_run_with_it_resumes_bit_exactly_and_is_not_exported(tmp_path):
    train(sprint_config(tmp_path, "straight", "train.steps=4"))
    train(sprint_config(tmp_path, "resumed", "train.steps=2"))
    train(sprint_config(tmp_path, "resumed", "train.steps=4"), resume="auto")
    tensors = assert_resumed_as_straight(tmp_path / "straight", tmp_path / "resumed", "denoiser.sprint_fusion.")
    assert not torch.equal(tensors["ema"]["denoiser.sprint_fusion.mask_token"], torch.zeros(32))  # it trained
    assert training_flops(sprint_config(tmp_path, "flops"), 0, 8).denoiser_forward > training_flops(
        sprint_config(tmp_path, "flops", "tread.fusion=tread"), 0, 8).denoiser_forward

    with pytest.raises(ExportError, match=r"SPRINT \(tread.fusion=sprint\).*no such layer") as info:
        export_run(tmp_path / "straight", tmp_path / "export")
    assert "\n" not in str(info.value) and not (tmp_path / "export").exists()


def test_released_weights_load_with_a_fresh_fusion_and_predict_as_before(tmp_path):
    """Diffusers-named weights (no fusion layer) start a SPRINT run: the fusion keeps its initialisation, so the
    dense prediction is the released model's."""
    plain_config = sprint_config(tmp_path, "plain", "tread.fusion=tread")
    plain = Pipeline.from_config(plain_config, TextTower.build(plain_config.text, ["a red circle"]))
    with torch.no_grad():
        for p in plain.denoiser.parameters():
            p.normal_(std=0.05)
    init = tmp_path / "released"
    (init / "transformer").mkdir(parents=True)
    save_file(plain.denoiser.state_dict(), init / "transformer" / "diffusion_pytorch_model.safetensors")
    sprint_run = sprint_config(tmp_path, "sprint", f"init={init}")
    sprint = Pipeline.from_config(sprint_run, TextTower.build(sprint_run.text, ["a red circle"]))
    load_init_weights(sprint, sprint_run)
    x, t, txt, mask = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 5, 32), None
    with torch.no_grad():
        torch.testing.assert_close(sprint.denoiser(x, t, txt, mask), plain.denoiser(x, t, txt, mask), atol=1e-6,
                                   rtol=0)
