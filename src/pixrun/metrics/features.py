"""Feature networks for the quality metrics, behind one interface: a module that maps images in [-1, 1],
(B, 3, H, W), to features (B, D), and whose `key` names its weights for the reference cache (None: random).

- Inception pool3 (FID, KID): the FID Inception-v3 of pixrun.metrics.inception.
- CLIP image embeddings (CMMD): CLIPVisionModelWithProjection, default openai/clip-vit-large-patch14-336 as in
  CMMD; the whole image resized (bicubic) to the model's input size, CLIP's normalisation, L2-normalised.
- DINOv2 or DINOv3 (DINO-MMD): Dinov2Model / DINOv3ViTModel, default facebook/dinov2-base; the whole image
  resized (bicubic) to 224, the checkpoint's normalisation, the final-layer-normed CLS token, L2-normalised.
"""

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from pixrun.errors import WeightsMissingError
from pixrun.losses.dino import DinoFeatures, dino_config
from pixrun.metrics.inception import FIDInceptionV3, load_fid_inception

CLIP_DEFAULT = "openai/clip-vit-large-patch14-336"
DINO_DEFAULT = "facebook/dinov2-base"
DINO_INPUT_SIZE = 224  # DINOv2's evaluation crop; its position embeddings interpolate to any size

NETWORK_OF_METRIC = {"fid": "inception", "kid": "inception", "cmmd": "clip", "dino_mmd": "dino"}


class InceptionFeatures(nn.Module):
    def __init__(self, inception: FIDInceptionV3, key: str | None):
        super().__init__()
        self.inception = inception
        self.key = key

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inception(images)


def _resize_and_normalise(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    x = (x + 1) / 2
    mean, std = torch.tensor(mean, device=x.device), torch.tensor(std, device=x.device)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


class ClipFeatures(nn.Module):
    def __init__(self, model: transformers.CLIPVisionModelWithProjection, key: str | None):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = _resize_and_normalise(images, self.model.config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        return F.normalize(self.model(pixel_values=pixels).image_embeds, dim=-1)


class DinoClsEmbedding(nn.Module):
    """DINO-MMD's feature: the L2-normalised CLS token at DINO_INPUT_SIZE, through the one DINO wrapper
    (pixrun.losses.dino), whose patch tokens the losses use."""

    def __init__(self, dino: DinoFeatures, key: str | None):
        super().__init__()
        self.dino, self.key = dino, key

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.dino.cls_embedding(images, (DINO_INPUT_SIZE, DINO_INPUT_SIZE))


def load_transformers_model(model_class, config_class, name_or_path: str, random_init: bool, metric: str) -> nn.Module:
    try:
        if random_init:
            return model_class(config_class.from_pretrained(name_or_path))
        return model_class.from_pretrained(name_or_path)
    except OSError:
        raise WeightsMissingError(
            f"cannot load the {metric} network {name_or_path!r}: download it (`hf download {name_or_path}`, or "
            f"save_pretrained into a folder) and set its hub id or local folder in the metrics config"
        ) from None


def build_feature_network(network: str, weights: str, random_init: bool = False) -> nn.Module:
    """`network`: inception | clip | dino. `weights`: path or URL (inception), hub id or local folder (clip,
    dino). `random_init` (tests only): random weights; for clip and dino `weights` still supplies the config."""
    key = None if random_init else weights  # random weights name no features worth caching
    if network == "inception":
        model = InceptionFeatures(FIDInceptionV3() if random_init else load_fid_inception(weights), key)
    elif network == "clip":
        clip = load_transformers_model(
            transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig, weights, random_init, "CMMD"
        )
        model = ClipFeatures(clip, key)
    elif network == "dino":
        # DINOv2 or DINOv3, by the checkpoint's model_type, as the losses load them
        dino = (DinoFeatures.from_config(dino_config(weights, False, "metrics.dino", "metrics.random_init"))
                if random_init else DinoFeatures.load(weights, False, "metrics.dino", "metrics.random_init"))
        model = DinoClsEmbedding(dino, key)
    else:
        raise ValueError(f"unknown feature network {network!r}; expected inception, clip or dino")
    return model.eval().requires_grad_(False)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to 8 bits, as saving them would: generated and reference images then score alike
    whether they come from memory or from PNG files."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def extract_features(network: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> float64 (N, D), batch by batch on the network's device."""
    device = next(network.parameters()).device
    chunks = [
        network(quantize(images[start : start + batch_size]).to(device)).double().cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).numpy()
