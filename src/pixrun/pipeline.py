"""A run as a text-to-image pipeline: the pieces built from a config, and a trained run loaded back."""

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pixrun.checkpoint import latest_good_checkpoint, load_tensors
from pixrun.config import Config, load_config
from pixrun.data.shapes import ShapesWorld
from pixrun.errors import ConfigError
from pixrun.flow import Flow
from pixrun.model import Denoiser, ModelConfig, TokenRouting
from pixrun.runtime import compute_context
from pixrun.sampler import SampleConfig, generate
from pixrun.text import TextTower


def build_world(config: Config) -> ShapesWorld:
    d = config.data
    try:
        return ShapesWorld(kinds=d.kinds, colors=d.colors, heldout=d.heldout, task_weights=d.task_weights)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None


def denoiser_config(model: ModelConfig, text_dim: int) -> ModelConfig:
    """The denoiser's settings: the run's model section, taking text states `text_dim` wide (the text tower's
    output). Derived where a denoiser is made, never written back into the run's config."""
    return dataclasses.replace(model, context_dim=text_dim)


@dataclass
class Pipeline:
    """What sampling needs, as a diffusers pipeline bundles it: the denoiser, the text tower, the flow, and the
    run's sampling settings. `Pipeline.from_config` makes one around a text tower; `load_run` loads a trained run."""

    denoiser: Denoiser
    text_tower: TextTower
    flow: Flow
    sample: SampleConfig = field(default_factory=SampleConfig)
    precision: str = "auto"  # as train.precision: auto (bf16 autocast where it is fast) | fp32 | bf16
    routing: TokenRouting | None = None  # the run's TREAD setting: the routed pass of sample.self_guidance
    resolution: int = 64  # of generated images, unless asked otherwise (the run's data.resolution)

    @classmethod
    def from_config(cls, config: Config, text_tower: TextTower) -> "Pipeline":
        """A denoiser with fresh weights, taking `text_tower`'s states, and the run's flow and sampling settings."""
        denoiser = Denoiser(denoiser_config(config.model, text_tower.dim))
        return cls(denoiser, text_tower, Flow(config.flow), config.sample, config.train.precision, config.tread,
                   config.data.resolution)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        params = {f"denoiser.{n}": p for n, p in self.denoiser.named_parameters()}
        if self.text_tower.trainable:
            params.update({f"text_encoder.{n}": p for n, p in self.text_tower.encoder.named_parameters()})
        return params

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters()
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])

    def to(self, device) -> "Pipeline":
        self.denoiser.to(device)
        self.text_tower.to(device)
        return self

    def eval(self) -> "Pipeline":
        self.denoiser.eval()
        self.text_tower.eval()
        return self

    def generate(self, prompts: list[str], seed: int = 0, sample: SampleConfig | None = None,
                 resolution: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] at `resolution` (default: the pipeline's), sampled as `sample` says (default: the
        pipeline's settings); image i from the noise of seed + i."""
        device = next(self.denoiser.parameters()).device
        with compute_context(device, self.precision):
            return generate(
                self.denoiser, self.text_tower, self.flow, prompts, resolution or self.resolution,
                sample or self.sample, seed, routing=self.routing,
            )


def build_pipeline(config: Config, captions: Iterable[str], run_dir: Path | None = None) -> Pipeline:
    """Fresh weights. The denoiser's text width comes from the text tower; the small text encoder's tokenizer is
    learnt from `captions` (the shapes world's words, or a prepared folder's caption sample)."""
    return Pipeline.from_config(config, TextTower.build(config.text, captions, run_dir))


def load_run_config(run_dir: Path) -> Config:
    if not (Path(run_dir) / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a pixrun run (no config.yaml)")
    return load_config(Path(run_dir) / "config.yaml")


def load_run(run_dir: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> Pipeline:
    """A trained run, from its config.yaml and latest checkpoint; `weights` is ema or weights (the raw ones)."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    checkpoint = latest_good_checkpoint(run_dir, optimizer=False)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
    pipeline = Pipeline.from_config(config, TextTower.load(config.text, run_dir))
    pipeline.load_weights(load_tensors(checkpoint, weights))
    return pipeline.to(device).eval()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
