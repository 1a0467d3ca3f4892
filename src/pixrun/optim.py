"""Optimizer (AdamW, or Muon for the blocks' matrices with AdamW for the rest), learning-rate schedule and the EMA of
the weights."""

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.adamw import adamw

MUON_LR_SCALING = {
    "match_rms_adamw": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),
    "original": lambda rows, cols: math.sqrt(max(1.0, rows / cols)),
}
NS_BATCH_ELEMENTS = 1 << 26  # Newton-Schulz on at most this many values at once (256 MB in fp32)
BLOCK_MATRIX = re.compile(r"(^|\.)blocks\.\d+\.")  # denoiser.blocks.N.*, not the text tower's encoder.block.N.*


@dataclass
class OptimConfig:
    name: str = "muon"  # muon | adamw (Muon for the 2-D weights inside the denoiser's blocks, AdamW for the rest)
    lr: float = 5e-4  # AdamW's
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    cooldown: float = 0.0  # share of train.steps at the end over which the lr falls linearly toward 0 (WSD)
    grad_clip: float = 1.0
    muon_lr: float = 1e-3  # the CPU default's; the recipe (configs/prx-speedrun.yaml) uses 1e-4
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_weight_decay: float = 0.0
    # How the orthogonalised update is scaled per matrix (A x B): "match_rms_adamw" = 0.2 * sqrt(max(A, B)), so its
    # RMS is AdamW's and the recipe's lr 1e-4 carries over (Moonshot); "original" = sqrt(max(1, A / B)) (Keller Jordan).
    muon_lr_scaling: str = "match_rms_adamw"

    def validate(self) -> None:
        if self.name not in ("adamw", "muon"):
            raise ValueError(f"optim.name must be adamw or muon, got {self.name!r}")
        if self.muon_lr_scaling not in MUON_LR_SCALING:
            known = ", ".join(MUON_LR_SCALING)
            raise ValueError(f"optim.muon_lr_scaling must be one of {known}, got {self.muon_lr_scaling!r}")
        if not 0 <= self.cooldown <= 1:
            raise ValueError(f"optim.cooldown must lie in [0, 1], got {self.cooldown}")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1 or self.muon_ns_steps < 1:
            raise ValueError("optim.muon_lr and optim.muon_ns_steps must be positive, optim.muon_momentum in [0, 1)")


@dataclass
class EMAConfig:
    decay: float = 0.995
    every: int = 1  # update every N steps
    warmup: bool = True  # decay = min(decay, (1 + n) / (10 + n)) over the n-th update, so early EMA is not stale


def build_optimizer(params: dict[str, nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay only on matrices; or, for `name: muon`, one MuonAdamW with Muon on the blocks' matrices.

    Every group carries "muon", so `set_lr` knows which learning rate it takes."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    if config.name == "adamw":
        groups = [
            {"params": decay, "weight_decay": config.weight_decay, "muon": False},
            {"params": no_decay, "weight_decay": 0.0, "muon": False},
        ]
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), fused=False)
    muon = [p for name, p in params.items() if p.dim() == 2 and BLOCK_MATRIX.search(name)]
    muon_ids = {id(p) for p in muon}
    adamw_group = {"lr": config.lr, "betas": list(config.betas), "eps": 1e-8, "muon": False}
    return MuonAdamW([
        {
            "params": muon, "muon": True, "lr": config.muon_lr, "weight_decay": config.muon_weight_decay,
            "momentum": config.muon_momentum, "nesterov": config.muon_nesterov, "ns_steps": config.muon_ns_steps,
            "lr_scaling": config.muon_lr_scaling,
        },
        {**adamw_group, "params": [p for p in decay if id(p) not in muon_ids], "weight_decay": config.weight_decay},
        {**adamw_group, "params": no_decay, "weight_decay": 0.0},
    ])


def schedule_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Linear warm-up, constant, then (with optim.cooldown) a linear fall over the last steps: warmup-stable-decay.
    A pure function of the step, so resume needs no state."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cooldown_steps = round(config.cooldown * total_steps)
    if cooldown_steps == 0:
        return warmup
    return warmup * min(1.0, (total_steps - step) / cooldown_steps)


def set_lr(optimizer: torch.optim.Optimizer, step: int, config: OptimConfig, total_steps: int) -> float:
    """The schedule on every group: Muon's groups from optim.muon_lr, the others from optim.lr; returns the latter."""
    factor = schedule_factor(step, config, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = (config.muon_lr if group["muon"] else config.lr) * factor
    return config.lr * factor


def orthogonalize(matrices: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately U V^T of each matrix = U S V^T (a matrix, or a stack of same-shape matrices, which go through
    together: one batched product instead of many small ones) by the quintic Newton-Schulz iteration of Muon, in bf16.

    The coefficients trade exactness for speed: singular values end up in roughly [0.7, 1.2], not exactly 1."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrices.bfloat16()
    single = x.dim() == 2
    if single:
        x = x[None]
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # Frobenius >= spectral norm: singular values <= 1
    for _ in range(steps):  # x <- a x + (b G + c G^2) x with G = x x^T; baddbmm rounds once per product in bf16
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return x[0] if single else x


def same_shape_chunks(matrices: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `matrices` grouped by shape, in chunks of at most NS_BATCH_ELEMENTS values: what Newton-Schulz takes
    at once, so the gathered directions of a sharded model never all exist at the same time."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    chunks = []
    for shape, indices in by_shape.items():
        per_chunk = max(1, NS_BATCH_ELEMENTS // math.prod(shape))
        chunks += [indices[first : first + per_chunk] for first in range(0, len(indices), per_chunk)]
    return chunks


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the param groups with "muon": True, AdamW on the others: one optimizer, one state dict.

    Muon keeps a momentum buffer, takes its Nesterov step and replaces it by its orthogonalisation. Newton-Schulz needs
    the whole matrix: an FSDP2-sharded parameter (a DTensor) has its update gathered, orthogonalised identically on
    every rank, and each rank keeps its own shard. Momentum and AdamW's moments stay sharded."""

    def __init__(self, groups: list[dict]):
        super().__init__(groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_updates(params, group)
            elif params:
                self._adamw_updates(params, group)
        return loss

    def _muon_updates(self, params: list[torch.Tensor], group: dict) -> None:
        for indices in same_shape_chunks(params):
            chunk = [params[i] for i in indices]
            rows, cols = chunk[0].shape
            scale = group["lr"] * MUON_LR_SCALING[group["lr_scaling"]](rows, cols)
            directions = torch.stack([self._muon_direction(p, group) for p in chunk])
            for p, ortho in zip(chunk, orthogonalize(directions, group["ns_steps"])):
                ortho = ortho.to(p.dtype)
                if isinstance(p, DTensor):  # keep this rank's slice: no communication
                    ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(ortho, alpha=-scale)

    def _muon_direction(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The momentum step and the (Nesterov) direction, whole: a sharded one is gathered."""
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        momentum, buffer = group["momentum"], state["momentum_buffer"]
        buffer.lerp_(p.grad, 1 - momentum)
        direction = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        return direction.full_tensor() if isinstance(direction, DTensor) else direction

    def _adamw_updates(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's own AdamW, on the whole group at once (multi-tensor kernels)."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], foreach=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )


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
        shadows = list(self.shadow.values())
        torch._foreach_lerp_(shadows, [self.params[name].detach().float() for name in self.shadow], weight)
        self.updates += 1
