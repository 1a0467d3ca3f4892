"""VGG16's convolutional trunk in plain PyTorch, with torchvision's layer indices.

`features` is numbered exactly as torchvision's `vgg16().features` (convs at 0, 2, 5, 7, 10, ..., 28; max-pools at
4, 9, 16, 23, 30), so the standard ImageNet state dict (`features.0.weight` ... `features.28.bias`) loads with
strict checking. The forward pass returns the five activations LPIPS compares.
"""

import torch
from torch import nn

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
CHANNELS = [64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512, "pool"]
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    def __init__(self):
        super().__init__()
        layers, in_channels = [], 3
        for c in CHANNELS:
            if c == "pool":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU()]
                in_channels = c
        self.features = nn.Sequential(*layers)
        for m in self.features:
            if isinstance(m, nn.Conv2d):  # torchvision's init, so random_init runs see sane activations
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def load_imagenet(self, state: dict[str, torch.Tensor]) -> None:
        """torchvision's full vgg16 state dict; its classifier head is not part of the trunk and is dropped."""
        self.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: ImageNet-normalised (B, 3, H, W) -> the five tap activations (the last pool is never needed)."""
        taps = []
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps
