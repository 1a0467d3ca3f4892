"""Parallelism, compilation and activation checkpointing, applied to the model from outside.

One code path for a single process, DDP and FSDP2 (with an optional HSDP mesh) under `torchrun`. The model
files never mention ranks: `parallelize` changes the modules in place (composable `replicate`/`fully_shard`,
`Module.compile`), so parameter names, and with them checkpoints, are the same at any world size.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from pixrun.runtime import World

STRATEGIES = ("auto", "single", "ddp", "fsdp")


@dataclass
class ParallelConfig:
    strategy: str = "auto"  # auto: fsdp when launched with several processes, else single | single | ddp | fsdp
    replicate_degree: int = 1  # HSDP: shard within world/replicate_degree ranks, replicate across the groups
    reshard_after_forward: bool = True  # FSDP: free gathered weights after forward (less memory, more traffic)
    compile: bool = False  # torch.compile each denoiser block
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_minutes: int = 30

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.replicate_degree < 1:
            raise ValueError(f"parallel.replicate_degree must be at least 1, got {self.replicate_degree}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.backend must be auto, nccl or gloo, got {self.backend!r}")


class StopVote:
    """Agrees on a stop request across ranks without a device round trip: the vote of step k travels over a CPU
    (gloo) group while step k + 1 runs, and its result ends the run after step k + 1 on every rank alike."""

    def __init__(self, world: World):
        self.world = world
        self.group = dist.new_group(backend="gloo") if world.distributed else None
        self.pending: tuple[torch.Tensor, dist.Work] | None = None

    def cast(self, requested: bool) -> bool:
        """Send this step's vote; returns whether the previous step's vote asked to stop (on any rank)."""
        if self.group is None:
            return requested
        previous = self._result()
        vote = torch.tensor([int(requested)], dtype=torch.int32)
        self.pending = (vote, dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return previous

    def settle(self) -> bool:
        """The outstanding vote's result (to finish the run cleanly)."""
        return self._result()

    def _result(self) -> bool:
        if self.pending is None:
            return False
        vote, work = self.pending
        work.wait()
        self.pending = None
        return bool(vote.item())  # a CPU tensor: no device involved


def device_mesh(config: ParallelConfig, world: World, device: torch.device):
    """The FSDP2 mesh: ("shard",), or ("replicate", "shard") for HSDP."""
    if world.size % config.replicate_degree:
        raise ValueError(f"parallel.replicate_degree {config.replicate_degree} does not divide {world.size} ranks")
    if config.replicate_degree > 1:
        return init_device_mesh(device.type, (config.replicate_degree, world.size // config.replicate_degree),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world.size,), mesh_dim_names=("shard",))


def resolve_strategy(config: ParallelConfig, world: World) -> str:
    """The run's strategy for `world` (ddp | fsdp | single; HSDP is fsdp over parallel.replicate_degree): the one
    place that decides it."""
    if config.strategy == "auto":
        return "fsdp" if world.distributed else "single"
    if config.strategy != "single" and not world.distributed:
        return "single"  # the same config runs in one process; DDP or FSDP over one rank is a no-op
    if config.strategy == "single" and world.distributed:
        raise ValueError("parallel.strategy 'single' cannot run with several processes; use ddp or fsdp")
    return config.strategy


def parallelize(denoiser: nn.Module, others: list[nn.Module], config: ParallelConfig, strategy: str,
                device: torch.device, bf16: bool, mesh=None) -> None:
    """Checkpoint, compile, then replicate or shard the trainable modules in place, as `strategy` says (the
    run's, from `resolve_strategy`). `others` are the other trained modules (a jointly trained text encoder,
    REPA's projector), each one unit; frozen networks (a pretrained text encoder, loss networks) are simply
    replicated. `mesh`: FSDP's (`device_mesh`; pass the same one to `shard_copy`)."""
    if config.activation_checkpointing:
        for block in denoiser.blocks:
            _checkpoint_activations(block)
    if config.compile:
        for block in denoiser.blocks:
            block.compile()
    modules = [*others, denoiser]
    if strategy == "ddp":
        # A private API, on purpose: torch 2.13 has no public DDP applied in place. DistributedDataParallel wraps
        # the module (forward must go through the wrapper, yet the text tower and the auxiliary losses call the
        # trained modules themselves), and fully_shard over a (world, 1) mesh makes every parameter a DTensor
        # (Muon, clipping and checkpoints would take their sharded paths). tests/test_parallel.py checks that
        # `replicate` still keeps the module and its parameter names and averages the gradients. Imported here, so
        # that only DDP runs depend on the private module.
        from torch.distributed._composable import replicate

        for module in modules:
            replicate(module, device_ids=[device.index] if device.type == "cuda" else None)
    elif strategy == "fsdp":
        _fully_shard(denoiser, others, mesh, bf16, config.reshard_after_forward)


def shard_copy(denoiser: nn.Module, others: list[nn.Module], strategy: str, mesh, bf16: bool) -> None:
    """Shard a copy of the trained modules (the EMA weights) exactly like them, so each rank keeps its shard of
    the copy and generation with it gathers one block at a time, as training does. Replicated strategies keep
    the copy whole on every rank, as they keep the model."""
    if strategy == "fsdp":
        _fully_shard(denoiser, others, mesh, bf16, reshard_after_forward=True)


def _fully_shard(denoiser: nn.Module, others: list[nn.Module], mesh, bf16: bool, reshard_after_forward: bool):
    # fp32 master weights and gradient reduction; bf16 weights for compute when bf16 is on
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in denoiser.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for module in [*others, denoiser]:
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def _checkpoint_activations(block: nn.Module) -> None:
    """Recompute the block in backward. Wrapping `forward` (not the module) keeps the parameter names."""
    forward = block.forward

    def checkpointed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed
