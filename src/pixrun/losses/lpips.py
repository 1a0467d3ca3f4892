"""LPIPS v0.1 with the VGG16 trunk (Zhang et al. 2018), as a per-sample training loss on x̂₀ against x₀.

    d(x, y) = sum over taps l of  mean over (h, w) of  w_l · (f̂_l(x) − f̂_l(y))²

f̂_l is the VGG activation at tap l unit-normalised over channels, w_l the learned non-negative 1x1 "lin" layer of
the official v0.1 weights (keys lin0.model.1.weight .. lin4.model.1.weight; index 0 of each was a dropout).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixrun.losses import (
    ImageDistanceTerm,
    LossConfig,
    load_weights,
    register_loss,
)
from pixrun.losses.vgg import TAP_CHANNELS, VGG16_URL, VGG16Features

LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
# ImageNet mean and std, written for inputs in [-1, 1] (the official ScalingLayer constants).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


@dataclass
class LPIPSConfig(LossConfig):
    weight: float = 0.0  # 0 switches it off; the recipe uses 0.1
    max_t: float = 1.0  # applied only where t <= max_t (t = 1 is noise); 1 = every noise level, PixelGen 0.7
    downsample: float = 0.5  # both images are resized by this factor before VGG (the recipe's 0.5x)
    vgg_weights: str = VGG16_URL  # torchvision's ImageNet vgg16 state dict: a URL or a local .pth/.safetensors
    lin_weights: str = LPIPS_URL  # the LPIPS v0.1 VGG linear layers: a URL or a local .pth/.safetensors
    random_init: bool = False  # random VGG and uniform lin weights: tests / CPU demo only, results are meaningless

    def validate(self) -> None:
        super().validate()
        if not 0 < self.downsample <= 1:
            raise ValueError("downsample must lie in (0, 1]")


class Lin(nn.Module):
    """One tap's channel weights; `model` mirrors the official (dropout, 1x1 conv) so `linN.model.1.weight` fits."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
        nn.init.constant_(self.model[1].weight, 1 / channels)  # a plain channel mean until real weights load


class LPIPS(nn.Module):
    def __init__(self, downsample: float = 0.5):
        super().__init__()
        self.downsample = downsample
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.vgg = VGG16Features()
        self.lins = nn.ModuleList(Lin(c) for c in TAP_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, config: LPIPSConfig) -> "LPIPS":
        """Frozen LPIPS with the pretrained weights; WeightsMissingError when they are not to be had."""
        config.validate()
        lpips = cls(config.downsample)
        if not config.random_init:
            vgg = "the ImageNet VGG16 weights (vgg16-397923af.pth)"
            lin = "the LPIPS v0.1 VGG weights (vgg.pth)"
            lpips.vgg.load_imagenet(load_weights(config.vgg_weights, vgg, "lpips.vgg_weights", "lpips.random_init"))
            lpips.load_lin(load_weights(config.lin_weights, lin, "lpips.lin_weights", "lpips.random_init"))
        return lpips

    def load_lin(self, state: dict[str, torch.Tensor]) -> None:
        """The official v0.1 file: lin0.model.1.weight .. lin4.model.1.weight, nothing else."""
        self.lins.load_state_dict({k.replace("lin", "", 1): v for k, v in state.items()}, strict=True)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen: a parent's .train() must not change it

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.float()  # x̂₀ may come out of autocast in bf16, which antialiased resizing does not take on CPU
        if self.downsample != 1:
            x = F.interpolate(x, scale_factor=self.downsample, mode="bilinear", antialias=True)
        taps = [f.float() for f in self.vgg((x - self.shift) / self.scale)]
        # eps inside the root too: a tap that is all zero at a pixel (common after ReLU) would give a NaN gradient
        return [f / (f.pow(2).sum(1, keepdim=True) + 1e-10).sqrt() for f in taps]

    def forward(self, x_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> (B,) distances; gradients flow to x_hat (x0 is the target)."""
        with torch.no_grad():
            target = self.features(x0)
        pred = self.features(x_hat)
        # the 1x1 conv written as a weighted channel sum, so autocast leaves it in fp32
        weights = [lin.model[1].weight for lin in self.lins]
        return sum((w * (p - q).pow(2)).sum(1).mean((1, 2)) for w, p, q in zip(weights, pred, target))


@register_loss
class LPIPSTerm(ImageDistanceTerm):
    """LPIPS(x̂₀, x₀) per sample: x̂₀ as an image."""

    name = "lpips"
    config_class = LPIPSConfig

    @classmethod
    def build(cls, config: LPIPSConfig, width: int, device: torch.device, shared: dict) -> "LPIPSTerm":
        return cls(config, LPIPS.from_config(config).to(device))

    @classmethod
    def meta_network(cls, config: LPIPSConfig) -> LPIPS:
        return LPIPS(config.downsample)
