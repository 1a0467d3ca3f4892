"""P-DINO: a perceptual loss in DINO's patch-token space (DINOv2 or DINOv3 ViT), as in PRX's speedrun.

    d(x̂₀, x₀) = mean over patch tokens n of (1 − cos(f_n(x̂₀), f_n(x₀)))

with both images resized to 224 px (a 16x16 token grid for ViT-B/14, 14x14 for DINOv3's /16) and normalised as the
network's image processor does (ImageNet mean and std).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixrun.errors import ConfigError
from pixrun.losses import ImageDistanceTerm, LossConfig, register_loss
from pixrun.losses.dino import DINO_HUB_ID, DinoFeatures, dino_config


@dataclass
class PDinoConfig(LossConfig):
    weight: float = 0.0  # 0 switches it off; the recipe uses 0.01
    max_t: float = 1.0  # applied only where t <= max_t (t = 1 is noise); 1 = every noise level, PixelGen 0.7
    size: int = 224  # both images are resized to size x size before DINO
    source: str = DINO_HUB_ID  # hub id or local directory of a DINOv2 (with or without registers) or DINOv3 ViT
    random_init: bool = False  # a tiny random ViT instead: tests / CPU demo only, results are meaningless

    def validate(self) -> None:
        super().validate()
        if self.size < 14:
            raise ValueError("size must be at least one DINO patch (14 px)")


class PDino(nn.Module):
    def __init__(self, dino: DinoFeatures, size: int = 224):
        super().__init__()
        if size < max(dino.patch_size):
            raise ConfigError(f"pdino.size {size} is smaller than one patch of the DINO network ({dino.patch_size})")
        self.dino = dino
        self.size = size

    @classmethod
    def from_config(cls, config: PDinoConfig, dino: DinoFeatures | None = None) -> "PDino":
        """`dino`: an already loaded network to share (e.g. REPA's teacher, when both name the same source)."""
        config.validate()
        dino = dino or DinoFeatures.load(config.source, config.random_init, "pdino.source", "pdino.random_init")
        return cls(dino, config.size)

    def forward(self, x_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> (B,) losses; gradients flow to x_hat (x0 is the target)."""
        size = (self.size, self.size)
        with torch.no_grad():
            target = self.dino(x0, size)
        pred = self.dino(x_hat, size)
        return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean(1)


@register_loss
class PDinoTerm(ImageDistanceTerm):
    """P-DINO(x̂₀, x₀) per sample: x̂₀ as an image; its DINO network is shared with REPA's teacher when both name
    the same one."""

    name = "pdino"
    config_class = PDinoConfig

    @classmethod
    def build(cls, config: PDinoConfig, width: int, device: torch.device, shared: dict) -> "PDinoTerm":
        key = ("dino", config.source, config.random_init)
        network = PDino.from_config(config, dino=shared.get(key)).to(device)
        shared[key] = network.dino
        return cls(config, network)

    @classmethod
    def meta_network(cls, config: PDinoConfig) -> PDino:
        dino = DinoFeatures.from_config(dino_config(config.source, config.random_init, "pdino.source",
                                                    "pdino.random_init"))
        return PDino(dino, config.size)
