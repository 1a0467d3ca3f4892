"""A loss term and a data source added from outside pixrun, through its registries alone: they configure, train,
resume bit-exactly and count their FLOPs like the built-in ones, without a line of pixrun changed."""

import json
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from pixrun.config import ConfigError, load_config
from pixrun.data.source import DATA_SOURCES, DataSource, HeldOut, LocalBatch, register_source
from pixrun.flops import training_flops
from pixrun.losses import LOSS_TERMS, LossConfig, LossInputs, LossTerm, counted_flops, register_loss
from pixrun.train import Trainer, train
from tests.conftest import TINY_OVERRIDES
from tests.helpers import assert_resumed_as_straight


@dataclass
class ProbeConfig(LossConfig):
    block: int = 0  # the denoiser block whose tokens the probe reads


class ProbeTerm(LossTerm):
    """Keeps a block's tokens small, as read by a trained linear probe: needs a hidden state, owns trained state."""

    name = "probe"
    config_class = ProbeConfig

    def __init__(self, config: ProbeConfig, probe: nn.Linear):
        super().__init__(config)
        self.probe = probe

    @classmethod
    def build(cls, config, width, device, shared):
        return cls(config, nn.Linear(width, 1).to(device))

    def hidden_block(self):
        return self.config.block

    def trainable(self):
        return {"probe": self.probe}

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        return self.probe(inputs.hidden.float()).pow(2).mean((1, 2))

    @classmethod
    def flops(cls, config, model, resolution, grid, routing):
        kept = routing.tokens_at(config.block).shape[1] if routing is not None else grid * grid
        with torch.device("meta"):
            probe = nn.Linear(model.width, 1)
            tokens = torch.empty(1, kept, model.width, requires_grad=True)
        return counted_flops(lambda: probe(tokens).sum().backward())


@dataclass
class StripesConfig:
    stripe_colors: list[str] = field(default_factory=lambda: ["red", "blue"])

    def validate(self, config) -> None:
        unknown = set(self.stripe_colors) - set(StripesSource.RGB)
        if unknown:
            raise ValueError(f"data.stripe_colors: no colour {min(unknown)!r}")


class StripesSource(DataSource):
    """Vertical stripes of a colour at a width, drawn from (seed, step, row); counts the batches it served, which a
    resumed run must continue from."""

    name = "stripes"
    config_class = StripesConfig
    RGB: ClassVar[dict] = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}

    def __init__(self, colors, seed, rank, world_size):
        self.colors, self.seed, self.rank, self.world_size, self.served = colors, seed, rank, world_size, 0

    @classmethod
    def build(cls, config, world, text_tower=None, autoencoder=None, pin_memory=False):
        return cls(config.data.stripe_colors, config.train.seed, world.rank, world.size)

    @classmethod
    def tokenizer_captions(cls, config):
        return [f"{color} stripes of width {width}" for color in config.data.stripe_colors for width in (1, 2, 4)]

    def draw(self, step, row, resolution):
        rng = np.random.default_rng([self.seed, step, row])
        color, width = self.colors[rng.integers(len(self.colors))], int(rng.choice([1, 2, 4]))
        image = np.full((resolution, resolution, 3), 255, dtype=np.uint8)
        for x in range(0, resolution, 2 * width):
            image[:, x:x + width] = self.RGB[color]
        return torch.from_numpy(image).permute(2, 0, 1), f"{color} stripes of width {width}"

    def batch(self, step, stage, stage_start):
        per_rank = stage.batch_size // self.world_size
        rows = [self.draw(step, self.rank * per_rank + i, stage.resolution) for i in range(per_rank)]
        self.served += 1
        return LocalBatch(torch.stack([image for image, _ in rows]), [caption for _, caption in rows])

    def held_out(self, stage, count, seed):
        rows = [self.draw(seed, 10**6 + i, stage.resolution) for i in range(count)]  # rows no batch has
        return HeldOut(torch.stack([image for image, _ in rows]), [c for _, c in rows], [str(i) for i in range(count)])

    def grid_samples(self, stage, count):
        return self.held_out(stage, count, 0)

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.served = state["served"]


@pytest.fixture
def registered():
    """The two extensions, registered for one test only."""
    register_loss(ProbeTerm)
    register_source(StripesSource)
    try:
        yield
    finally:
        del LOSS_TERMS["probe"], DATA_SOURCES["stripes"]


def stripes_config(tmp_path, run, *overrides):
    return load_config(None, [*TINY_OVERRIDES, f"run_dir={tmp_path / run}", "data.source=stripes",
                              "data.stripe_colors=[red, green]", "probe.weight=0.5", "probe.block=1",
                              "train.checkpoint_every=2", "train.sample_every=2", *overrides])


def test_a_loss_term_and_a_data_source_from_outside_train_resume_and_count(registered, tmp_path):
    straight = stripes_config(tmp_path, "straight", "train.steps=4")
    assert straight.probe == ProbeConfig(weight=0.5, block=1) and straight.data.section == StripesConfig(
        ["red", "green"])
    trainer = Trainer(straight)
    assert "probe" in trainer.state.trained and isinstance(trainer.state.source, StripesSource)
    metrics = trainer.step(0)
    assert metrics["probe"] > 0 and torch.isfinite(metrics["loss"])
    trainer.close()
    train(stripes_config(tmp_path, "straight", "train.steps=4"))
    train(stripes_config(tmp_path, "resumed", "train.steps=2"))
    resumed = Trainer(stripes_config(tmp_path, "resumed", "train.steps=4"), resume="auto")
    assert resumed.state.source.served == 2  # its state came back with the checkpoint
    resumed.run()
    resumed.close()
    assert_resumed_as_straight(tmp_path / "straight", tmp_path / "resumed", "probe.")
    straight_log, resumed_log = ((tmp_path / run / "metrics.jsonl").read_text().splitlines()
                                 for run in ("straight", "resumed"))
    assert [json.loads(r)["probe"] for r in straight_log] == [json.loads(r)["probe"] for r in resumed_log]
    assert (tmp_path / "straight" / "samples" / "step_0000004.png").is_file()  # its held-out samples lead the grid

    # 16 image tokens (32 px in 8-px patches) through the probe: forward, and the backward to its weight and input
    flops = training_flops(straight, 0, 8)
    assert flops.terms["probe"] == 3 * 2 * 16 * straight.model.width
    assert flops.total == flops.denoiser + flops.terms["probe"]
    assert training_flops(stripes_config(tmp_path, "off", "train.steps=4", "probe.until_step=2"), 2, 8).terms == {
        "lpips": 0, "pdino": 0, "repa": 0, "shapes_perceptual": 0, "self_align": 0,
        "probe": 0}


def test_an_outside_source_and_term_are_configured_and_checked_like_the_built_in_ones(registered, tmp_path):
    with pytest.raises(ConfigError, match="probe.max_t must lie in"):
        stripes_config(tmp_path, "run", "probe.max_t=0")
    with pytest.raises(ConfigError, match="data.stripe_colors: no colour 'pink'"):
        stripes_config(tmp_path, "run", "data.stripe_colors=[red, pink]")
    with pytest.raises(ConfigError, match="unknown config key 'data.stripe_width'.*stripe_colors"):
        stripes_config(tmp_path, "run", "data.stripe_width=2")
    staged = stripes_config(tmp_path, "run", "train.steps=4",
                            "stages=[{until_step: 4, resolution: 32, batch_size: 8, losses: [probe]}]")
    assert staged.stages[0].uses("probe")
    with pytest.raises(ConfigError, match="'probes' is not one of lpips, pdino, repa, self_align, shapes_perceptual, probe"):
        stripes_config(tmp_path, "run", "train.steps=4",
                       "stages=[{until_step: 4, resolution: 32, batch_size: 8, losses: [probes]}]")
    with pytest.raises(ValueError, match="data.shards is already a key of data"):
        register_source(type("Clash", (StripesSource,), {"name": "clash", "config_class": ShardsLike}))


@dataclass
class ShardsLike:
    shards: str = ""
