"""Text–image alignment of generated images with their prompts, through CLIP models. Higher is better.

- CLIPScore (Hessel et al. 2021): 100 * max(cos(image, prompt), 0), averaged over the pairs; CLIPModel default
  openai/clip-vit-large-patch14, torchmetrics' default.
- PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(image, prompt), averaged; yuvalkirstain/PickScore_v1,
  a CLIP ViT-H/14 fine-tuned on human preferences, whose tokenizer is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's.

Images reach the model as CLIPImageProcessor would give them (done here in torch): the shortest edge resized to
the model's image size (bicubic, antialiased), centre-cropped square, CLIP's mean and std.
"""

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from pixrun.errors import WeightsMissingError
from pixrun.metrics.features import load_transformers_model

CLIP_SCORE_DEFAULT = "openai/clip-vit-large-patch14"
PICKSCORE_DEFAULT = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_DEFAULT = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_SCORE_WEIGHT = 100.0  # Hessel et al. take w = 2.5; torchmetrics and most papers report 100 * cos

ALIGNMENT_METRICS = ("clip_score", "pickscore")
METRIC_NAMES = {"clip_score": "CLIPScore", "pickscore": "PickScore"}


def pil_bicubic_resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """8-bit pixel values (floats in [0, 255]) resized as PIL resizes 8-bit images, which CLIPImageProcessor uses:
    antialiased bicubic, the horizontal pass first, each pass's output rounded and clipped to 8 bits (one float
    pass would differ by up to 20 levels where the first pass overshoots)."""
    horizontal = F.interpolate(pixels, size=(pixels.shape[2], width), mode="bicubic", antialias=True)
    horizontal = horizontal.round().clamp(0, 255)
    return F.interpolate(horizontal, size=(height, width), mode="bicubic", antialias=True).round().clamp(0, 255)


def clip_pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> CLIP's input: 8-bit pixels, as a saved image has, the shortest edge resized
    to `size`, the centre `size` x `size` crop, normalised with CLIP's mean and std."""
    height, width = images.shape[2:]
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    pixels = pil_bicubic_resize(pixels, new_height, new_width)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    pixels = pixels[:, :, top : top + size, left : left + size] / 255
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


class ClipAlignment(nn.Module):
    """A CLIP model and its tokenizer: the `metric`'s score (clip_score or pickscore) of each image with its
    prompt."""

    def __init__(self, model: transformers.CLIPModel, tokenizer, metric: str):
        super().__init__()
        if metric not in ALIGNMENT_METRICS:
            raise ValueError(f"unknown alignment metric {metric!r}; expected one of {', '.join(ALIGNMENT_METRICS)}")
        self.model, self.tokenizer, self.metric = model, tokenizer, metric

    def cosines(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """cos(image i, prompt i), (B,): images in [-1, 1] (B, 3, H, W), prompts truncated to CLIP's context."""
        device = self.model.logit_scale.device
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings).to(device)
        pixels = clip_pixel_values(images.to(device), self.model.config.vision_config.image_size)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        return (out.image_embeds * out.text_embeds).sum(-1)  # both unit vectors

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = self.cosines(images, prompts)
        if self.metric == "clip_score":
            return CLIP_SCORE_WEIGHT * cos.clamp(min=0)
        return self.model.logit_scale.exp() * cos


def load_clip_tokenizer(source: str, vocab_size: int, metric: str, setting: str):
    """The CLIP tokenizer at `source`. transformers makes a 3-token tokenizer, without a word of error, from a
    place that holds none: one that does not have the model's vocabulary counts as missing."""
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(source)
    except OSError:
        tokenizer = None
    if tokenizer is None or len(tokenizer) != vocab_size:
        raise WeightsMissingError(
            f"cannot load the {metric} tokenizer from {source!r} (none with the model's {vocab_size} tokens there): "
            f"download it (`hf download {source}`) and set metrics.{setting} to its hub id or local folder"
        )
    return tokenizer


def build_alignment_network(metric: str, model_source: str, tokenizer_source: str,
                            random_init: bool = False) -> ClipAlignment:
    """`metric`: clip_score | pickscore. `model_source`: hub id or local folder of a transformers CLIPModel;
    `tokenizer_source`: of its tokenizer (for CLIPScore the same place). `random_init` (tests only): random weights
    from the model's config."""
    name = METRIC_NAMES[metric]
    model = load_transformers_model(transformers.CLIPModel, transformers.CLIPConfig, model_source, random_init, name)
    setting = "pickscore_processor" if metric == "pickscore" else metric
    tokenizer = load_clip_tokenizer(tokenizer_source, model.config.text_config.vocab_size, name, setting)
    return ClipAlignment(model, tokenizer, metric).eval().requires_grad_(False)


@torch.no_grad()
def alignment_scores(images: torch.Tensor, prompts: list[str], networks: dict[str, nn.Module],
                     batch_size: int = 32) -> dict[str, float]:
    """{metric: mean score} of images ([-1, 1], (N, 3, H, W)) with their prompts, batch by batch, for each network
    (a ClipAlignment, by the name of its metric)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    scores = {}
    for metric, network in networks.items():
        total = sum(
            network(images[start : start + batch_size], prompts[start : start + batch_size]).double().sum()
            for start in range(0, len(images), batch_size)
        )
        scores[metric] = float(total) / len(images)
    return scores
