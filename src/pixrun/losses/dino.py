"""A frozen DINOv2 or DINOv3 ViT as a feature extractor: images in [-1, 1] -> patch tokens (B, N, D) or the CLS
embedding (B, D).

Loaded through transformers from a hub id or a local directory; the class (`Dinov2Model`,
`Dinov2WithRegistersModel` or `DINOv3ViTModel`) follows the checkpoint's config (`model_type`), and the
normalisation its image processor's mean and std (ImageNet's when the checkpoint has none). The tokens come as
CLS, the registers (DINOv3: 4), then the patches. Images are resized to the size asked for, so the same network
serves P-DINO (224 px: a 16x16 grid for patch 14, 14x14 for patch 16) and REPA (grid x patch, the denoiser's own
token grid).
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTModel,
    PretrainedConfig,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import cached_file

from pixrun.errors import ConfigError, WeightsMissingError

DINO_HUB_ID = "facebook/dinov2-with-registers-base"
MODEL_CLASSES = {
    "dinov2": Dinov2Model,
    "dinov2_with_registers": Dinov2WithRegistersModel,
    "dinov3_vit": DINOv3ViTModel,
}


def tiny_random_config() -> Dinov2WithRegistersConfig:
    """The ViT/14 of `random_init`: the results are meaningless anyway, so the CPU demo should be cheap."""
    return Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)


def dino_config(source: str, random_init: bool, config_key: str, random_key: str) -> PretrainedConfig:
    """The network's transformers config, from a hub id or a local directory (the tiny one under `random_init`);
    WeightsMissingError, naming `config_key`, when it is not to be had."""
    if random_init:
        return tiny_random_config()
    path = Path(source).expanduser()
    if source.startswith(("/", ".", "~")) and not path.is_dir():
        raise WeightsMissingError(
            f"no DINO checkpoint directory at {path}: save one there (docs/losses.md) or set {config_key} to "
            f"a directory or hub id (or {random_key}=true for a meaningless CPU demo)"
        )
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError:  # not in the cache, no network
        raise not_loadable(source, config_key, random_key) from None
    if config.model_type not in MODEL_CLASSES:
        raise ConfigError(f"{config_key}={source!r} is a {config.model_type} model, not a DINOv2 or DINOv3 ViT")
    return config


def normalisation(source: str) -> tuple[list[float], list[float]]:
    """The mean and std of the checkpoint's image processor (preprocessor_config.json), ImageNet's when it has
    none."""
    path = cached_file(
        source,
        "preprocessor_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    processor = json.loads(Path(path).read_text()) if path else {}
    return processor.get("image_mean", IMAGENET_DEFAULT_MEAN), processor.get("image_std", IMAGENET_DEFAULT_STD)


def not_loadable(source: str, config_key: str, random_key: str) -> WeightsMissingError:
    return WeightsMissingError(
        f"DINO {source!r} could not be loaded (not in the Hugging Face cache, no network, or an incomplete "
        f"directory): run `hf download {source}` with network and copy the cache here, or save the model to a "
        f"directory and set {config_key}=/that/dir (or {random_key}=true for a meaningless CPU demo)"
    )


class DinoFeatures(nn.Module):
    def __init__(self, model: nn.Module, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        super().__init__()
        self.model = model
        patch = model.config.patch_size  # DINOv3's config may give (height, width)
        self.patch_size = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
        self.prefix = 1 + getattr(model.config, "num_register_tokens", 0)  # CLS, then the registers
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> "DinoFeatures":
        """Random weights of the network `config` describes (on the default device: `torch.device("meta")` for
        shapes only)."""
        return cls(MODEL_CLASSES[config.model_type](config))

    @classmethod
    def load(cls, source: str, random_init: bool, config_key: str, random_key: str) -> "DinoFeatures":
        """From a hub id or a local directory; WeightsMissingError, naming `config_key`, when it is not to be had."""
        config = dino_config(source, random_init, config_key, random_key)
        if random_init:
            return cls.from_config(config)
        try:
            model = MODEL_CLASSES[config.model_type].from_pretrained(source, config=config, dtype=torch.float32)
        except OSError:  # the weights missing, not in the cache, no network
            raise not_loadable(source, config_key, random_key) from None
        return cls(model, *normalisation(source))

    def train(self, mode: bool = True) -> "DinoFeatures":
        return super().train(False)  # frozen: a parent's .train() must not change it

    def encode(self, images: torch.Tensor, size: tuple[int, int]):
        """images (B, 3, H, W) in [-1, 1], resized to `size` pixels and normalised, through the network:
        its transformers output. Gradients flow to `images`; wrap in no_grad for targets."""
        # float: x̂₀ may come out of autocast in bf16, which antialiased resizing does not take on CPU
        x = F.interpolate((images.float() + 1) / 2, size=size, mode="bicubic", antialias=True)
        return self.model(pixel_values=(x - self.mean) / self.std)

    def forward(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, N, D) of `images` at `size` pixels, CLS and registers dropped."""
        return self.encode(images, size).last_hidden_state[:, self.prefix :]

    def cls_embedding(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The final-layer-normed CLS token (B, D), L2-normalised: the DINO-MMD feature."""
        return F.normalize(self.encode(images, size).pooler_output, dim=-1)

    def grid_tokens(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens on a (rows, cols) grid, in raster order: the input is resized to grid x patch size."""
        return self(images, (grid[0] * self.patch_size[0], grid[1] * self.patch_size[1]))
