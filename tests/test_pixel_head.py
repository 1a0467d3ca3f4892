"""The pixel head: three convolutions over the unpatchified prediction, the noisy input and t, added to x̂."""

import pytest
import torch

from pixrun.config import ConfigError, load_config
from pixrun.export import ExportError, export_run
from pixrun.flops import denoiser_flops
from pixrun.model import Denoiser, ModelConfig
from pixrun.train import train
from tests.conftest import TINY_OVERRIDES
from tests.helpers import assert_resumed_as_straight
from tests.test_tread import TINY, inputs, random_model

CHANNELS = 8


def head_model(fresh_head: bool = True) -> tuple[Denoiser, Denoiser]:
    """A random denoiser, and the same weights with a pixel head: at its initialisation, or random."""
    plain = random_model()
    headed = Denoiser(ModelConfig(**TINY, pixel_head=CHANNELS))
    missing, unexpected = headed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [f"pixel_head.convs.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]
    assert not unexpected
    if not fresh_head:
        with torch.no_grad():
            for p in headed.pixel_head.parameters():
                p.normal_(std=0.1)
    return plain, headed


def test_a_fresh_head_predicts_as_the_model_without_it_and_gradients_reach_every_layer():
    plain, headed = head_model()
    x, t, txt, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(headed(x, t, txt, mask), plain(x, t, txt, mask), atol=0, rtol=0)
    headed(x, t, txt, mask).square().mean().backward()
    for name, p in headed.pixel_head.named_parameters():  # the zero last layer passes gradient to the others next step
        assert p.grad is not None, name
    assert headed.pixel_head.convs[-1].weight.grad.abs().sum() > 0


def test_its_output_is_the_convolutions_over_prediction_input_and_t_added_to_the_prediction():
    plain, headed = head_model(fresh_head=False)
    x, t, txt, mask = inputs()
    with torch.no_grad():
        coarse = plain(x, t, txt, mask)
        t_plane = t[:, None, None, None].expand(-1, 1, 32, 32)
        expected = coarse + headed.pixel_head.convs(torch.cat([coarse, x, t_plane], dim=1))
        torch.testing.assert_close(headed(x, t, txt, mask), expected, atol=1e-5, rtol=1e-5)


def test_a_pixel_sees_its_neighbours_across_a_patch_border_up_to_three_pixels_away():
    """With 8-px patches the final layer writes pixel (8, 7) and pixel (8, 8) from two different tokens; the head's
    three 3x3 convolutions correct each from the prediction and the noisy input 3 px around it, across the border."""
    _, headed = head_model(fresh_head=False)
    coarse, x, t = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32), torch.rand(1)
    for changed in (coarse, x):
        with torch.no_grad():
            before = headed.pixel_head(coarse, x, t)
            changed[0, :, 8, 8] += 1.0
            after = headed.pixel_head(coarse, x, t)
            changed[0, :, 8, 8] -= 1.0
        moved = (after - before).abs().sum(dim=(0, 1)) > 1e-6
        assert moved[5:12, 5:12].all() and moved.sum() == 7 * 7  # (8, 5..7) lie in the patch to the left


def test_it_is_counted_validated_trained_resumed_bit_exactly_and_not_exported(tmp_path):
    plain, headed = (denoiser_flops(ModelConfig(**TINY, pixel_head=c), 32, 5)[0] for c in (0, CHANNELS))
    pixels = 32 * 32
    assert headed - plain == 2 * pixels * 9 * (7 * CHANNELS + CHANNELS * CHANNELS + CHANNELS * 3)
    with pytest.raises(ConfigError, match="model.pixel_head must be 0"):
        load_config(None, [*TINY_OVERRIDES, f"run_dir={tmp_path}", "model.pixel_head=-1"])

    def config(run, *overrides):
        return load_config(None, [*TINY_OVERRIDES, f"run_dir={tmp_path / run}", f"model.pixel_head={CHANNELS}",
                                  "train.checkpoint_every=2", "train.sample_every=4", *overrides])

    train(config("straight", "train.steps=4"))
    train(config("resumed", "train.steps=2"))
    train(config("resumed", "train.steps=4"), resume="auto")
    tensors = assert_resumed_as_straight(tmp_path / "straight", tmp_path / "resumed", "denoiser.pixel_head.")
    assert tensors["weights"]["denoiser.pixel_head.convs.4.weight"].abs().sum() > 0  # it trained from zero
    with pytest.raises(ExportError, match=r"pixel head \(model.pixel_head=8\).*no such layer") as info:
        export_run(tmp_path / "straight", tmp_path / "export")
    assert "\n" not in str(info.value) and not (tmp_path / "export").exists()
