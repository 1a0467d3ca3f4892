"""A run as a text-to-image pipeline: the pieces built from a config, and a trained run loaded back."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pixrun.checkpoint import latest_good_checkpoint, load_tensors
from pixrun.config import Config, load_config
from pixrun.data.shapes import ShapesWorld
from pixrun.errors import ConfigError
from pixrun.flow import Flow
from pixrun.latent import Autoencoder
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


def denoiser_config(model: ModelConfig, text_dim: int, in_channels: int | None = None) -> ModelConfig:
    """The denoiser's settings: the run's model section, taking text states `text_dim` wide (the text tower's
    output) and inputs of `in_channels` (an autoencoder's latent channels; None: the model section's). Derived
    where a denoiser is made, never written back into the run's config."""
    return dataclasses.replace(model, context_dim=text_dim, in_channels=in_channels or model.in_channels)


def check_latent_sizes(config: Config, autoencoder: Autoencoder) -> None:
    """Every resolution the run trains or samples at must give whole patches of latents."""
    multiple = autoencoder.factor * config.model.patch_size
    for resolution in dict.fromkeys([config.data.resolution, *(s.resolution for s in config.stage_plan())]):
        if resolution % multiple:
            raise ConfigError(f"resolution {resolution} is not a multiple of {multiple}, the autoencoder's factor "
                              f"{autoencoder.factor} times model.patch_size {config.model.patch_size}")


@dataclass
class Pipeline:
    """What sampling needs, as a diffusers pipeline bundles it: the denoiser, the text tower, the flow, the run's
    sampling settings and, in latent space, the frozen autoencoder. `Pipeline.from_config` is the one way to make
    one, around a text tower (built from captions, or loaded from a run); `load_run` loads a trained run."""

    denoiser: Denoiser
    text_tower: TextTower
    flow: Flow
    sample: SampleConfig = field(default_factory=SampleConfig)
    precision: str = "auto"  # as train.precision: auto (bf16 autocast where it is fast) | fp32 | bf16
    routing: TokenRouting | None = None  # the run's TREAD setting: the routed pass of sample.self_guidance
    resolution: int = 64  # of generated images, unless asked otherwise (the run's data.resolution)
    autoencoder: Autoencoder | None = None  # latent space: the flow runs on its latents; None: pixel space

    @classmethod
    def from_config(cls, config: Config, text_tower: TextTower) -> "Pipeline":
        """A denoiser with fresh weights, taking `text_tower`'s states (and the autoencoder's latents when
        config.latent names one), and the run's flow and sampling settings."""
        autoencoder = Autoencoder.from_config(config.latent) if config.latent.enabled else None
        if autoencoder is not None:
            check_latent_sizes(config, autoencoder)
        in_channels = autoencoder.channels if autoencoder is not None else None
        denoiser = Denoiser(denoiser_config(config.model, text_tower.dim, in_channels),
                            config.tread.sprint_span(config.model.depth))
        return cls(denoiser, text_tower, Flow(config.flow), config.sample, config.train.precision, config.tread,
                   config.data.resolution, autoencoder)

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """What training changes, by the name its weights carry in checkpoints: "denoiser.*", and
        "text_encoder.*" when the text encoder is trained jointly."""
        trainable_text = {"text_encoder": self.text_tower.encoder} if self.text_tower.trainable else {}
        return {"denoiser": self.denoiser, **trainable_text}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        params = {f"{owner}.{name}": p for owner, module in self.trained_modules().items()
                  for name, p in module.named_parameters()}
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])

    def to(self, device) -> "Pipeline":
        self.denoiser.to(device)
        self.text_tower.to(device)
        if self.autoencoder is not None:
            self.autoencoder.to(device)
        return self

    def eval(self) -> "Pipeline":
        self.denoiser.eval()
        self.text_tower.eval()
        return self

    def generate(self, prompts: list[str], seed: int = 0, sample: SampleConfig | None = None,
                 resolution: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] at `resolution` (default: the pipeline's), sampled as `sample` says (default: the
        pipeline's settings); image i from the noise of seed + i. In latent space the noise is latent-shaped and
        the sampled latents are decoded outside autocast, as diffusers' PRXPipeline decodes them."""
        device = next(self.denoiser.parameters()).device
        resolution = resolution or self.resolution
        factor = self.autoencoder.factor if self.autoencoder is not None else 1
        with compute_context(device, self.precision):
            x = generate(self.denoiser, self.text_tower, self.flow, prompts, resolution // factor,
                         sample or self.sample, seed, routing=self.routing)
        if self.autoencoder is not None:
            x = self.autoencoder.decode(x)
        return x.clamp(-1, 1)


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
