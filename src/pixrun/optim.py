"""Optimizer (AdamW, or Muon for the blocks' matrices with AdamW for the rest), learning-rate schedule and the EMA of
the weights. Both take `apply`, a bool on the device: a step where it is False changes nothing, and the host never
waits to find out. Sharded (FSDP2/HSDP) matrices are orthogonalised once each, by one rank of their shard group."""

import math
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.optim.adamw import adamw

MUON_LR_SCALING = {
    "match_rms_adamw": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),
    "original": lambda rows, cols: math.sqrt(max(1.0, rows / cols)),
}
# fp32 Newton-Schulz iterates on the Gram matrix when a matrix is this many times wider than tall (after
# transposing): with 5 steps it costs (4 r + 34) m^3 FLOPs against the plain iteration's 5 (4 r + 2) m^3, even at
# r = 1.5; at r = 3 (the default's QKV) 46 against 70, at r = 6 (adaLN) 58 against 130
GRAM_ITERATION_RATIO = 2
NS_BATCH_ELEMENTS = 1 << 26  # Newton-Schulz on at most this many values at once (256 MB in fp32)
BLOCK_MATRIX = re.compile(r"(^|\.)blocks\.\d+\.")  # denoiser.blocks.N.*, not the text tower's encoder.block.N.*
# the jointly trained text tower's projections (T5: SelfAttention.q/k/v/o, DenseReluDense.wi/wo), not its embeddings
TEXT_BLOCK_MATRIX = re.compile(r"^text_encoder\.encoder\.block\.\d+\.layer\.\d+\.\w+\.(q|k|v|o|wi|wi_0|wi_1|wo)\.weight$")


@dataclass
class OptimConfig:
    name: str = "muon"  # muon | adamw (Muon for the 2-D weights inside the denoiser's blocks, AdamW for the rest)
    lr: float = 5e-4  # AdamW's
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    cooldown: float = 0.2  # share of train.steps at the end over which the lr falls linearly toward 0 (WSD)
    grad_clip: float = 1.0
    muon_lr: float = 1e-3  # the CPU default's; the recipe (configs/prx-speedrun.yaml) uses 1e-4
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_text: bool = False  # Muon also for the small text tower's projections (trained jointly), at muon_lr
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


def build_optimizer(params: dict[str, nn.Parameter], config: OptimConfig,
                    ns_dtype: torch.dtype = torch.bfloat16) -> "MuonAdamW":
    """One MuonAdamW: AdamW with weight decay only on matrices; for `name: muon`, Muon on the blocks' matrices (with
    `muon_text`, the text tower's projections too), its Newton-Schulz iteration in `ns_dtype` (the trainer passes its
    compute precision).

    Every group carries "muon", so `set_lr` knows which learning rate it takes."""
    muon = [p for name, p in params.items() if p.dim() == 2 and (BLOCK_MATRIX.search(name) or (
        config.muon_text and TEXT_BLOCK_MATRIX.search(name)))]
    muon = muon if config.name == "muon" else []
    muon_ids = {id(p) for p in muon}
    adamw_group = {"lr": config.lr, "betas": list(config.betas), "eps": 1e-8, "muon": False}
    groups = [
        {**adamw_group, "params": [p for p in params.values() if p.dim() >= 2 and id(p) not in muon_ids],
         "weight_decay": config.weight_decay},
        {**adamw_group, "params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    if config.name == "muon":
        groups.insert(0, {
            "params": muon, "muon": True, "lr": config.muon_lr, "weight_decay": config.muon_weight_decay,
            "momentum": config.muon_momentum, "nesterov": config.muon_nesterov, "ns_steps": config.muon_ns_steps,
            "ns_dtype": str(ns_dtype).removeprefix("torch."),
            "lr_scaling": config.muon_lr_scaling,
        })
    return MuonAdamW(groups)


def schedule_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Linear warm-up, constant, then (with optim.cooldown) a linear fall over the last steps: warmup-stable-decay.
    A pure function of the step, so resume needs no state."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    decay = cooldown_steps(config, total_steps)
    if decay == 0:
        return warmup
    return warmup * min(1.0, (total_steps - step) / decay)


def cooldown_steps(config: OptimConfig, total_steps: int) -> int:
    """The steps at the end of a `total_steps` run over which the learning rate falls to 0."""
    return round(config.cooldown * total_steps)


def set_lr(optimizer: torch.optim.Optimizer, factor: float, config: OptimConfig) -> float:
    """The schedule's `factor` on every group: Muon's groups from optim.muon_lr, the others from optim.lr; returns
    the latter."""
    for group in optimizer.param_groups:
        group["lr"] = (config.muon_lr if group["muon"] else config.lr) * factor
    return config.lr * factor


def orthogonalize(matrices: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T of each matrix = U S V^T (a matrix, or a stack of same-shape matrices, which go through
    together: one batched product instead of many small ones) by the quintic Newton-Schulz iteration of Muon, in
    `dtype`: bf16 where its matrix products are fast, fp32 where they are not (CPUs without AMX).

    The coefficients trade exactness for speed: singular values end up in roughly [0.7, 1.2], not exactly 1."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrices.to(dtype)
    single = x.dim() == 2
    if single:
        x = x[None]
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # Frobenius >= spectral norm: singular values <= 1
    if dtype == torch.float32 and x.shape[-1] >= GRAM_ITERATION_RATIO * x.shape[-2]:
        x = gram_iteration(x, steps, (a, b, c))
    else:
        for _ in range(steps):  # x <- a x + (b G + c G^2) x with G = x x^T; baddbmm rounds once per product
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return x[0] if single else x


def gram_iteration(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float]) -> torch.Tensor:
    """The same iteration on the m x m Gram matrix of wide (m x n, n >= 2m) matrices: each step multiplies x by
    Q = a I + b G + c G^2, a polynomial in G = x x^T, so G becomes Q G Q and x is (Q_k ... Q_1) x_0 at the end;
    x itself is touched twice instead of three times a step. Equal to the plain iteration up to rounding in fp32
    (tests/test_optim.py); in bf16 the rounding compounds through G, so bf16 keeps the plain iteration."""
    a, b, c = coefficients
    gram = x @ x.mT
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    product = None
    for step in range(steps):
        q = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) + a * identity
        product = q if product is None else q @ product
        if step < steps - 1:
            gram = q @ gram @ q
    return product @ x


def same_shape_chunks(matrices: list[torch.Tensor], owners: int = 1) -> list[list[int]]:
    """Indices of `matrices` grouped by shape, in chunks that `owners` ranks orthogonalise together, each at most
    NS_BATCH_ELEMENTS values at once: what Newton-Schulz takes at a time, so the whole directions of a sharded
    model never all exist at the same time."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    chunks = []
    for shape, indices in by_shape.items():
        per_chunk = owners * max(1, NS_BATCH_ELEMENTS // math.prod(shape))
        chunks += [indices[first : first + per_chunk] for first in range(0, len(indices), per_chunk)]
    return chunks


def row_shard_mesh_dim(p: DTensor) -> int:
    """The mesh dimension over which `p`'s rows are split: FSDP2's Shard(0), replicated over any other (HSDP)."""
    shard = [dim for dim, placement in enumerate(p.placements) if placement == Shard(0)]
    if len(shard) != 1 or not all(pl.is_replicate() for dim, pl in enumerate(p.placements) if dim != shard[0]):
        raise ValueError(f"Muon takes matrices sharded on their rows over one mesh dimension, got {p.placements}")
    return shard[0]


def orthogonalize_sharded(shards: list[torch.Tensor], shape: torch.Size, mesh: DeviceMesh, mesh_dim: int,
                          steps: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """`orthogonalize` of same-shape matrices whose rows are split over `mesh_dim` of `mesh` as torch.chunk splits
    them (FSDP2's Shard(0): ceil(rows / N) rows per rank, the last ranks fewer or none); `shards` are this rank's
    rows of each. Matrix k goes whole to rank k % N, which orthogonalises its matrices as one batch, and each rank
    gets its rows of every result back: two all-to-alls, so Newton-Schulz work and the bytes a rank receives are
    1/N of all matrices'. Sent in `dtype`, what Newton-Schulz rounds to first anyway: the same result as one process."""
    group, size, rank = mesh.get_group(mesh_dim), mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    rows, cols = shape
    rows_per_rank = -(-rows // size)
    shard_rows = [max(0, min(rows_per_rank, rows - r * rows_per_rank)) for r in range(size)]
    if any(s.shape != (shard_rows[rank], cols) for s in shards):
        raise ValueError(f"shards of a {rows}x{cols} matrix over {size} ranks must hold torch.chunk's rows")
    owned = [range(owner, len(shards), size) for owner in range(size)]
    mine = len(owned[rank])
    send = torch.cat([shards[k].to(dtype).flatten() for matrices in owned for k in matrices])
    to_owners = [len(matrices) * shard_rows[rank] * cols for matrices in owned]
    from_shards = [mine * n * cols for n in shard_rows]
    received = send.new_empty(sum(from_shards))
    dist.all_to_all_single(received, send, from_shards, to_owners, group=group)
    whole = torch.cat([part.view(mine, n, cols) for part, n in zip(received.split(from_shards), shard_rows)], dim=1)
    ortho = orthogonalize(whole, steps, dtype) if mine else whole  # a rank without a matrix here only relays
    send_back = torch.cat([part.flatten() for part in ortho.split(shard_rows, dim=1)])
    returned = send.new_empty(sum(to_owners))
    dist.all_to_all_single(returned, send_back, to_owners, from_shards, group=group)
    results = {}
    for matrices, part in zip(owned, returned.split(to_owners)):
        results.update(zip(matrices, part.view(len(matrices), shard_rows[rank], cols)))
    return [results[k] for k in range(len(shards))]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view: in-place changes reach it), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _where(apply: torch.Tensor | None, updated: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """`updated` where the step applies, else `current`: a skipped step's NaN in `updated` goes nowhere."""
    return updated if apply is None else torch.where(apply, updated, current)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the param groups with "muon": True, AdamW on the others: one optimizer, one state dict ("step",
    "exp_avg", "exp_avg_sq" per AdamW parameter as torch.optim.AdamW keeps them; "momentum_buffer" per Muon matrix).

    `step(apply=...)` takes a 0-dim bool tensor on the parameters' device: where it is False the step changes nothing
    (parameters, moments, momentum, step counts), decided on the device, so the caller never waits for it.

    Muon keeps a momentum buffer, takes its Nesterov step and replaces it by its orthogonalisation. Newton-Schulz needs
    the whole matrix: FSDP2-sharded matrices (DTensors, rows split over the shard group of N ranks) are spread over
    the group, each orthogonalised once, by one rank (`orthogonalize_sharded`); plain tensors (one process, DDP)
    are orthogonalised where they are. Momentum and AdamW's moments stay sharded. The AdamW groups run torch's fused
    AdamW (its step counts live on the parameters' device, as "fused" groups declare for loading)."""

    def __init__(self, groups: list[dict]):
        super().__init__(groups, defaults={})
        for group in self.param_groups:
            if not group["muon"]:
                group["fused"] = True

    @torch.no_grad()
    def step(self, closure=None, *, apply: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_updates(params, group, apply)
            elif params:
                self._adamw_updates(params, group, apply)
        return loss

    def _muon_updates(self, params: list[torch.Tensor], group: dict, apply: torch.Tensor | None) -> None:
        plain = [p for p in params if not isinstance(p, DTensor)]
        for indices in same_shape_chunks(plain):
            chunk = [plain[i] for i in indices]
            directions = torch.stack([self._muon_direction(p, group, apply) for p in chunk])
            ortho = orthogonalize(directions, group["ns_steps"], getattr(torch, group["ns_dtype"]))
            self._muon_apply(chunk, ortho, group, apply)
        sharded = [p for p in params if isinstance(p, DTensor)]
        if not sharded:
            return
        if len({(p.device_mesh, p.placements) for p in sharded}) > 1:
            raise ValueError("Muon's sharded matrices must share one device mesh and placement")
        mesh, mesh_dim = sharded[0].device_mesh, row_shard_mesh_dim(sharded[0])
        for indices in same_shape_chunks(sharded, owners=mesh.size(mesh_dim)):
            chunk = [sharded[i] for i in indices]
            directions = [self._muon_direction(p, group, apply) for p in chunk]
            orthos = orthogonalize_sharded(directions, chunk[0].shape, mesh, mesh_dim, group["ns_steps"],
                                           getattr(torch, group["ns_dtype"]))
            self._muon_apply(chunk, orthos, group, apply)

    def _muon_direction(self, p: torch.Tensor, group: dict, apply: torch.Tensor | None) -> torch.Tensor:
        """The momentum step and the (Nesterov) direction, this rank's part of it."""
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        momentum, buffer, grad = group["momentum"], _local(state["momentum_buffer"]), _local(p.grad)
        buffer.copy_(_where(apply, buffer.lerp(grad, 1 - momentum), buffer))
        return grad.lerp(buffer, momentum) if group["nesterov"] else buffer

    @staticmethod
    def _muon_apply(params: list[torch.Tensor], orthos: list[torch.Tensor] | torch.Tensor, group: dict,
                    apply: torch.Tensor | None) -> None:
        """Decoupled weight decay and the orthogonalised step, scaled for the matrices' (whole) shape."""
        scale = group["lr"] * MUON_LR_SCALING[group["lr_scaling"]](*params[0].shape)
        for p, ortho in zip(params, orthos):
            p = _local(p)
            updated = p.mul(1 - group["lr"] * group["weight_decay"]).add_(ortho.to(p.dtype), alpha=-scale)
            p.copy_(_where(apply, updated, p))

    def _adamw_updates(self, params: list[torch.Tensor], group: dict, apply: torch.Tensor | None) -> None:
        """torch's fused AdamW through its documented functional form (`torch.optim.adamw.adamw(fused=True)`), on
        the whole group at once; a skipped step goes in as its `found_inf` (GradScaler's mechanism): the kernel then
        leaves parameters and moments alone and the step counts are put back, all on the device."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        adamw(
            [_local(p) for p in params], [_local(p.grad) for p in params], [_local(s["exp_avg"]) for s in states],
            [_local(s["exp_avg_sq"]) for s in states], [], [s["step"] for s in states], fused=True,
            found_inf=None if apply is None else (~apply).float(), amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )


class EMA:
    """Exponential moving average of the trained parameters, kept in `shadow`: the parameters of a separate copy of
    the trained modules, by the same names, placed like `params` (sharded the same way, or plain tensors).

    All on the device: `updates` (a 0-dim int64 tensor, the number of updates applied; the checkpoint saves and
    loads it in place) sets the warm-up decay, and a skipped step (`apply` False) leaves shadow and count alone."""

    def __init__(self, params: dict[str, torch.Tensor], shadow: dict[str, torch.Tensor], config: EMAConfig):
        if params.keys() != shadow.keys():
            raise ValueError("the EMA copy must have the trained parameters, by the same names")
        self.config = config
        self.params = params
        self.shadow = shadow
        self.updates = torch.zeros((), dtype=torch.int64, device=next(iter(shadow.values())).device)

    def weight(self) -> torch.Tensor:
        """1 - decay, with the warm-up decay min(decay, (1 + n) / (10 + n)) after n updates."""
        n = self.updates.float()
        if not self.config.warmup:
            return torch.full_like(n, 1 - self.config.decay)
        return (9 / (10 + n)).clamp(min=1 - self.config.decay)

    @torch.no_grad()
    def update(self, step: int, apply: torch.Tensor | None = None) -> None:
        """After optimizer step `step` (counted from 0): every `every` steps, where `apply` (0-dim bool) holds."""
        if (step + 1) % self.config.every:
            return
        weight = self.weight() if apply is None else self.weight() * apply  # 0: the shadow stays bit-identical
        # a tensor weight: no host read; torch's multi-tensor lerp runs these same kernels for a 0-dim weight
        for name, shadow in self.shadow.items():
            _local(shadow).lerp_(_local(self.params[name]).detach(), weight)
        self.updates += 1 if apply is None else apply
