"""A run as a text-to-image pipeline: the pieces built from a config, and a trained run loaded back."""

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pixrun.checkpoint import latest_good_checkpoint, load_tensors
from pixrun.config import Config, ConfigError, load_config
from pixrun.data.shapes import ShapesWorld
from pixrun.flow import Flow
from pixrun.model import Denoiser
from pixrun.sampler import SampleConfig, generate
from pixrun.text import TextTower


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_world(config: Config) -> ShapesWorld:
    d = config.data
    try:
        return ShapesWorld(kinds=d.kinds, colors=d.colors, heldout=d.heldout, task_weights=d.task_weights)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None


def bf16_is_fast(device: torch.device) -> bool:
    """GPUs with bf16 support, and CPUs with AMX tiles, whose bf16 matmuls are several times faster than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return False


def uses_bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and bf16_is_fast(device))


@contextmanager
def compute_context(device: torch.device, precision: str):
    """bf16 autocast (weights stay fp32) where it is fast (auto), always (bf16), or never (fp32). On CPU,
    attention uses the plain math kernel: for pixrun's short sequences it beats the flash kernel, whose
    bf16 backward is several times slower than its fp32 one."""
    with ExitStack() as stack:
        if uses_bf16(device, precision):
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        stack.enter_context(attention_context(device))
        yield


def attention_context(device: torch.device):
    """The attention kernel choice, also for backward: blocks recomputed there (activation checkpointing) must
    run the kernel their forward ran."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()


@dataclass
class Pipeline:
    config: Config
    denoiser: Denoiser
    text_tower: TextTower
    flow: Flow

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
        """Images in [-1, 1] at `resolution` (default: data.resolution); image i from the noise of seed + i."""
        device = next(self.denoiser.parameters()).device
        with compute_context(device, self.config.train.precision):
            return generate(
                self.denoiser, self.text_tower, self.flow, prompts, resolution or self.config.data.resolution,
                sample or self.config.sample, seed, routing=self.config.tread,
            )


def build_pipeline(config: Config, vocabulary: list[str], run_dir: Path | None = None) -> Pipeline:
    """Fresh weights. The denoiser's text width comes from the text tower."""
    text_tower = TextTower.build(config.text, vocabulary, run_dir)
    config.model.context_dim = text_tower.dim
    return Pipeline(config, Denoiser(config.model), text_tower, Flow(config.flow))


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
    text_tower = TextTower.load(config.text, run_dir)
    pipeline = Pipeline(config, Denoiser(config.model), text_tower, Flow(config.flow))
    pipeline.load_weights(load_tensors(checkpoint, weights))
    return pipeline.to(device).eval()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
