"""Optimizer, learning-rate schedule and the EMA of the weights."""

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0


@dataclass
class EMAConfig:
    decay: float = 0.995
    every: int = 1  # update every N steps
    warmup: bool = True  # decay = min(decay, (1 + n) / (10 + n)) over the n-th update, so early EMA is not stale


def build_optimizer(params: dict[str, nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on biases, norms or embeddings' 1-D parts)."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), fused=False)


def lr_at(step: int, config: OptimConfig) -> float:
    """Linear warm-up, then constant (the recipe's schedule). A pure function of the step, so resume needs no state."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


class EMA:
    """Exponential moving average of named parameters, kept in fp32."""

    def __init__(self, params: dict[str, nn.Parameter], config: EMAConfig):
        self.config = config
        self.params = params
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}
        self.updates = 0

    def decay(self) -> float:
        if not self.config.warmup:
            return self.config.decay
        return min(self.config.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, step: int) -> None:
        if (step + 1) % self.config.every:
            return
        weight = 1 - self.decay()
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), weight)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
        self.updates = updates
