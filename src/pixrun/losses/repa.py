"""REPA: align a denoiser block's image tokens with a frozen DINO teacher's patch tokens (Yu et al. 2024).

    loss = −mean over tokens n of cos(projector(h_n), f_n(x₀))

h is the output of `denoiser.blocks[block]` (the denoiser returns it with `hidden_at=block`), f the teacher's patch
tokens of the clean image resized so that the teacher's patch grid equals the denoiser's token grid (grid x the
teacher's patch: 14 for DINOv2, 16 for DINOv3, whatever the denoiser's patch). Under TREAD the block sees only the
kept tokens; `kept_index` picks the teacher tokens at the same positions.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixrun.losses.dino import DINO_HUB_ID, DinoFeatures


@dataclass
class REPAConfig:
    weight: float = 0.0  # λ; 0 switches it off; the recipe uses 0.5
    block: int = 7  # index into denoiser.blocks whose output is aligned (the recipe's "block 8")
    until_step: int | None = None  # switched off from this step on; None: the whole run
    hidden: int = 2048  # projector width
    teacher: str = DINO_HUB_ID  # hub id or local directory of a DINOv2 (with or without registers) or DINOv3 ViT
    random_init: bool = False  # a tiny random ViT teacher: tests / CPU demo only, results are meaningless

    def validate(self) -> None:
        if self.weight < 0 or self.block < 0 or self.hidden < 1:
            raise ValueError("repa.weight and repa.block must be >= 0 and repa.hidden >= 1")

    def active(self, step: int) -> bool:
        return self.weight > 0 and (self.until_step is None or step < self.until_step)


def load_teacher(config: REPAConfig) -> DinoFeatures:
    config.validate()
    return DinoFeatures.load(config.teacher, config.random_init, "repa.teacher", "repa.random_init")


class REPA(nn.Module):
    """The trainable part: a 3-layer SiLU MLP from the denoiser's width to the teacher's token width."""

    def __init__(self, width: int, teacher_dim: int, hidden: int = 2048):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, teacher_dim)
        )

    def forward(
        self, tokens: torch.Tensor, teacher_tokens: torch.Tensor, kept_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, N_kept, width) from the block; teacher_tokens (B, N, D) on the full grid in raster order;
        kept_index (B, N_kept) the grid positions of `tokens` (None: all N, in order). Returns (B,) −cos means."""
        if kept_index is not None:
            teacher_tokens = teacher_tokens.gather(1, kept_index[..., None].expand(-1, -1, teacher_tokens.shape[-1]))
        projected = self.projector(tokens)
        return -F.cosine_similarity(projected.float(), teacher_tokens.float(), dim=-1).mean(1)
