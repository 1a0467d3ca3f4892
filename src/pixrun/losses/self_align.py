"""Teacher-free alignment, as SRA does (Jiang et al. 2025, "Diffusion transformers can provide representation
guidance by themselves"): an earlier block of the denoiser is aligned with a later block of its own EMA, which sees
the same sample with less noise.

    loss = −mean over tokens n of cos(projector(h_n), g_n)

h is the output of `denoiser.blocks[block]` on x_t (the step's noisy input); g the output of
`ema_denoiser.blocks[target_block]` on x_t' = (1 − t') x₀ + t' ε with the step's own x₀ and ε and t' = max(t −
interval, 0): the same sample, less noisy, as SRA's teacher sees it (its ablations find a lower noise level for the
teacher better than the same one; interval 0 gives the same). The EMA runs without gradient, dense, and stops after
`target_block`. Under TREAD the student's block may see only the kept tokens; the teacher's tokens at the same
positions are taken (`kept_index`), as REPA does.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixrun.losses import LossConfig, LossInputs, LossTerm, counted_flops, register_loss
from pixrun.model import ModelConfig, RoutePlan


@dataclass
class SelfAlignConfig(LossConfig):
    weight: float = 0.0  # λ; 0 switches it off
    block: int = 1  # the student's block (index into denoiser.blocks) whose output is projected
    target_block: int = 3  # the EMA denoiser's block whose output is the target; later than `block`
    interval: float = 0.1  # the EMA sees the sample at t − interval (less noise), clamped at 0
    hidden: int = 1024  # projector width

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.block < self.target_block:
            raise ValueError(f"block must be >= 0 and below target_block, got {self.block} and {self.target_block}")
        if not 0 <= self.interval < 1 or self.hidden < 1:
            raise ValueError(f"interval must lie in [0, 1) and hidden be >= 1, got {self.interval} and {self.hidden}")

    def fits(self, model: ModelConfig) -> None:
        if self.target_block >= model.depth:
            raise ValueError(f"target_block {self.target_block} is not a block of a depth-{model.depth} model")


class Projector(nn.Module):
    """The trainable part: a 2-layer SiLU MLP from the denoiser's width to itself."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))

    def forward(self, tokens: torch.Tensor, target: torch.Tensor, kept_index: torch.Tensor | None) -> torch.Tensor:
        """tokens (B, N_kept, width) from the student's block; target (B, N, width) the EMA's on the full grid;
        kept_index (B, N_kept) the grid positions of `tokens` (None: all N, in order). Returns (B,) −cos means."""
        if kept_index is not None:
            target = target.gather(1, kept_index[..., None].expand(-1, -1, target.shape[-1]))
        return -F.cosine_similarity(self.mlp(tokens).float(), target.float(), dim=-1).mean(1)


@register_loss
class SelfAlignTerm(LossTerm):
    """SRA per sample: the projected output of block `self_align.block` against the EMA denoiser's output of
    `self_align.target_block` at t − interval. Its projector trains with the model."""

    name = "self_align"
    config_class = SelfAlignConfig

    def __init__(self, config: SelfAlignConfig, projector: Projector):
        super().__init__(config)
        self.projector = projector

    @classmethod
    def build(cls, config: SelfAlignConfig, width: int, device: torch.device, shared: dict) -> "SelfAlignTerm":
        return cls(config, Projector(width, config.hidden).to(device))

    def hidden_block(self) -> int:
        return self.config.block

    @classmethod
    def ema_blocks(cls, config: SelfAlignConfig) -> int:
        return config.target_block + 1

    def trainable(self) -> dict[str, nn.Module]:
        return {"self_align_projector": self.projector}

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        target = inputs.ema_hidden((inputs.t - self.config.interval).clamp(min=0), self.config.target_block)
        kept = inputs.routing.tokens_at(self.config.block) if inputs.routing is not None else None
        return self.projector(inputs.hidden, target, kept)

    @classmethod
    def flops(cls, config: SelfAlignConfig, model: ModelConfig, resolution: int, grid: int,
              routing: RoutePlan | None) -> int:
        """The projector trained on the tokens that reached block `self_align.block`; the EMA forward to
        `target_block` is counted by pixrun.flops (`ema_blocks`), which knows the step's text length."""
        kept = routing.tokens_at(config.block) if routing is not None else None
        with torch.device("meta"):
            projector = Projector(model.width, config.hidden)
            tokens = torch.empty(1, grid * grid if kept is None else kept.shape[1], model.width, requires_grad=True)
            target = torch.empty(1, grid * grid, model.width)
        return counted_flops(lambda: projector(tokens, target, kept).sum().backward())
