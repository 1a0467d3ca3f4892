"""An LPIPS-style perceptual loss on x̂₀ in the feature space of the shapes world's own network
(pixrun.losses.shapes_teacher), for where no pretrained network can be downloaded:

    d(x̂₀, x₀) = mean over the network's three stages l of  mean over (h, w) of  ‖f̂_l(x̂₀) − f̂_l(x₀)‖²

f̂_l is stage l's feature map unit-normalised over channels (as LPIPS does, with uniform channel weights), so each
stage adds between 0 and 4. The network is the one `repa.teacher: shapes` uses; both share one copy.
"""

from dataclasses import dataclass

import torch
from torch import nn

from pixrun.losses import (
    ImageDistanceTerm,
    LossConfig,
    register_loss,
    shapes_teacher,
)
from pixrun.losses.shapes_teacher import ShapesFeatures


@dataclass
class ShapesPerceptualConfig(LossConfig):
    weight: float = 0.0  # 0 switches it off
    max_t: float = 1.0  # applied only where t <= max_t (t = 1 is noise); 1 = every noise level


class ShapesPerceptual(nn.Module):
    def __init__(self, network: ShapesFeatures):
        super().__init__()
        self.network = network

    @staticmethod
    def normalised(taps: list[torch.Tensor]) -> list[torch.Tensor]:
        # eps inside the root: a tap that is all zero at a pixel would give a NaN gradient
        return [f / (f.pow(2).sum(1, keepdim=True) + 1e-10).sqrt() for f in taps]

    def forward(self, x_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> (B,) distances; gradients flow to x_hat (x0 is the target)."""
        with torch.no_grad():
            target = self.normalised(self.network.taps(x0))
        pred = self.normalised(self.network.taps(x_hat))
        return sum((p - q).pow(2).sum(1).mean((1, 2)) for p, q in zip(pred, target)) / len(pred)


@register_loss
class ShapesPerceptualTerm(ImageDistanceTerm):
    """The shapes network's perceptual distance between x̂₀ and x₀ per sample: x̂₀ as an image."""

    name = "shapes_perceptual"
    config_class = ShapesPerceptualConfig

    @classmethod
    def build(cls, config: ShapesPerceptualConfig, width: int, device: torch.device,
              shared: dict) -> "ShapesPerceptualTerm":
        key = ("shapes",)  # as REPA's shapes teacher: one network for both
        if key not in shared:
            shared[key] = shapes_teacher.load_teacher()[0].to(device)
        return cls(config, ShapesPerceptual(shared[key]))

    @classmethod
    def meta_network(cls, config: ShapesPerceptualConfig) -> ShapesPerceptual:
        spec = shapes_teacher.DEFAULT_SPEC
        return ShapesPerceptual(ShapesFeatures(spec.widths, spec.resolution).requires_grad_(False))
