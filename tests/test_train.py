import json
import math

import pytest
import torch

from pixrun.checkpoint import list_checkpoints, load_tensors
from pixrun.config import ConfigError
from pixrun.pipeline import load_run
from pixrun.train import Trainer, train
from tests.helpers import HostReads, load_optimizer_tensors


def test_resumed_run_continues_exactly_like_an_uninterrupted_one(tiny_config):
    straight = tiny_config("straight", train__steps=6, train__checkpoint_every=3, train__sample_every=3)
    train(straight)
    first_half = tiny_config("resumed", train__steps=3, train__checkpoint_every=3, train__sample_every=3)
    train(first_half)
    second_half = tiny_config("resumed", train__steps=6, train__checkpoint_every=3, train__sample_every=3)
    train(second_half, resume="latest")

    a, b = list_checkpoints(straight.run_dir)[-1], list_checkpoints(second_half.run_dir)[-1]
    assert a.name == b.name == "step_0000006"
    for name in ("weights", "ema", "optimizer"):
        ta, tb = ((load_optimizer_tensors(p) if name == "optimizer" else load_tensors(p, name)) for p in (a, b))
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}:{key} differs after resume"
    def losses(run):
        return [json.loads(line)["loss"] for line in open(f"{run}/metrics.jsonl")]
    assert losses(straight.run_dir) == losses(second_half.run_dir)


def test_training_reduces_the_loss_and_writes_a_complete_run(tiny_config):
    config = tiny_config(train__steps=80, train__checkpoint_every=40, train__sample_every=40, optim__warmup_steps=10)
    run_dir = train(config)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 80
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000040", "step_0000080"]
    assert (run_dir / "samples" / "step_0000080.png").is_file()
    assert any((run_dir / "tensorboard").iterdir())
    # the run loads back as a pipeline and draws
    pipeline = load_run(run_dir)
    images = pipeline.generate(["a photo of a red square"], seed=3)
    assert images.shape == (1, 3, 32, 32) and images.abs().max() <= 1
    assert torch.equal(images, pipeline.generate(["a photo of a red square"], seed=3))


def test_keeps_only_the_last_checkpoints(tiny_config):
    config = tiny_config(train__steps=4, train__checkpoint_every=1, train__sample_every=100, train__keep_checkpoints=2)
    train(config)
    assert [p.name for p in list_checkpoints(config.run_dir)] == ["step_0000003", "step_0000004"]


def test_refuses_to_overwrite_a_run_and_to_resume_with_another_model(tiny_config):
    train(tiny_config(train__steps=1))
    with pytest.raises(ConfigError, match="already has checkpoints"):
        train(tiny_config(train__steps=2))
    with pytest.raises(ConfigError, match="'model' section"):
        train(tiny_config(train__steps=2, model__depth=3), resume="latest")
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(tiny_config("empty", train__steps=2), resume="latest")


def test_quality_metrics_during_training_are_logged(tiny_config):
    config = tiny_config(
        train__steps=3, train__metrics_every=2, metrics__metrics="[fid,kid]", metrics__random_init="true",
        metrics__num_images=4, metrics__kid_subsets=2, metrics__kid_subset_size=4, metrics__cache_dir="''",
    )
    run_dir = train(config)
    records = [json.loads(line) for line in (run_dir / "quality.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 3]  # the untrained model, every 2 steps, and the last
    for record in records:
        assert {"fid", "kid", "mse_t0.0-0.3", "mse_t0.6-1.0"} <= set(record)
        assert all(math.isfinite(v) and v >= 0 for k, v in record.items() if k not in ("step", "time", "kid"))
    assert (run_dir / "samples" / "step_0000000.png").is_file()


@pytest.mark.parametrize("extra", [{}, {"tread__enabled": "true", "model__depth": 3}], ids=["plain", "tread"])
def test_an_ordinary_step_never_reads_the_device(tiny_config, extra):
    """No .item(), .cpu(), bool(tensor)... in a step that is not a logging step, even one that skips a non-finite
    update: on a GPU each would stall the host until the device caught up."""
    trainer = Trainer(tiny_config(train__steps=10, **extra))
    trainer.step(0)
    with HostReads() as reads:
        trainer.step(1)
        real_loss = trainer.state.pipeline.flow.loss
        trainer.state.pipeline.flow.loss = lambda *args: real_loss(*args) * float("nan")
        trainer.step(2)
    trainer.state.pipeline.flow.loss = real_loss
    assert reads.calls == []
    assert int(trainer.state.nonfinite_total) == 1



def test_a_latent_run_trains_on_latents_with_image_losses_on_the_decoded_prediction(tiny_config, tmp_path):
    from pixrun.losses.lpips import LPIPS
    from tests.test_latent import tiny_kl

    vae = tiny_kl(tmp_path / "vae")  # 2x, 4 channels: 32 px images are 16 x 16 latents, 4 x 4 tokens of 4 x 4
    config = tiny_config(**{"latent.vae": vae, "model.patch_size": 4, "lpips.weight": 0.5, "lpips.random_init": True,
                            "repa.weight": 0.5, "repa.block": 0, "repa.hidden": 16, "repa.random_init": True})
    trainer = Trainer(config)
    pipeline = trainer.state.pipeline
    assert pipeline.denoiser.config.in_channels == 4 and config.model.in_channels == 3  # derived, not written back
    seen = {}
    real_lpips = LPIPS.forward

    def lpips_sees(self, x0_hat, x0):
        seen["shapes"] = (tuple(x0_hat.shape), tuple(x0.shape), x0_hat.requires_grad)
        return real_lpips(self, x0_hat, x0)

    LPIPS.forward = lpips_sees
    try:
        before = [p.detach().clone() for p in pipeline.denoiser.parameters()]
        metrics = trainer.step(0)
    finally:
        LPIPS.forward = real_lpips
    assert seen["shapes"] == ((8, 3, 32, 32), (8, 3, 32, 32), True)  # images: decoded x̂₀ against the real ones
    assert all(torch.isfinite(metrics[name]) for name in ("flow_loss", "lpips", "repa"))
    assert any(not torch.equal(a, b) for a, b in zip(before, pipeline.denoiser.parameters()))
    trainer.close()
