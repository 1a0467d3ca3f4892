"""Parallelism, compilation and activation checkpointing, applied to the model from outside.

One code path for a single process, DDP and FSDP2 (with an optional HSDP mesh) under `torchrun`. The model
files never mention ranks: `parallelize` changes the modules in place (composable `replicate`/`fully_shard`,
`Module.compile`), so parameter names, and with them checkpoints, are the same at any world size.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

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


@dataclass
class World:
    """This process's place among the `torchrun` processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.size

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """`flag` (a bool tensor on the device) and-ed over ranks, left on the device: no host round trip."""
        if not self.distributed:
            return flag
        value = flag.to(torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value.bool()

    def gather_to_main(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `tensor` (the same shape everywhere) concatenated along dim 0 on rank 0; None elsewhere."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)] if self.is_main else None
        dist.gather(tensor.contiguous(), parts, dst=0)
        return torch.cat(parts) if self.is_main else None

    def share_slice(self, count: int) -> tuple[slice, int]:
        """This rank's contiguous part of `count` items and the padded length every rank uses, so that ranks
        running a sharded model do the same number of forward passes."""
        per_rank = -(-count // self.size)
        first = min(count, self.rank * per_rank)
        return slice(first, min(count, first + per_rank)), per_rank


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


def init_world(config: ParallelConfig, device_name: str) -> tuple[World, torch.device]:
    """Join the process group `torchrun` set up in the environment, and pick this process's device."""
    world = World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                  int(os.environ.get("LOCAL_RANK", "0")))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world.distributed and not dist.is_initialized():
        backend = config.backend if config.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timedelta(minutes=config.timeout_minutes), device_id=(
            device if device.type == "cuda" else None))
    return world, device


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def device_mesh(config: ParallelConfig, world: World, device: torch.device):
    """The FSDP2 mesh: ("shard",), or ("replicate", "shard") for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    if world.size % config.replicate_degree:
        raise ValueError(f"parallel.replicate_degree {config.replicate_degree} does not divide {world.size} ranks")
    if config.replicate_degree > 1:
        return init_device_mesh(device.type, (config.replicate_degree, world.size // config.replicate_degree),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world.size,), mesh_dim_names=("shard",))


def resolve_strategy(config: ParallelConfig, world: World) -> str:
    if config.strategy == "auto":
        return "fsdp" if world.distributed else "single"
    if config.strategy != "single" and not world.distributed:
        return "single"  # the same config runs in one process; DDP or FSDP over one rank is a no-op
    if config.strategy == "single" and world.distributed:
        raise ValueError("parallel.strategy 'single' cannot run with several processes; use ddp or fsdp")
    return config.strategy


def parallelize(denoiser: nn.Module, others: list[nn.Module], config: ParallelConfig, world: World,
                device: torch.device, bf16: bool, mesh=None) -> str:
    """Checkpoint, compile, then replicate or shard the trainable modules in place; returns the strategy used.
    `others` are the other trained modules (a jointly trained text encoder, REPA's projector), each one unit;
    frozen networks (a pretrained text encoder, loss networks) are simply replicated. `mesh`: FSDP's, built here
    when not given (pass the same one to `shard_copy`)."""
    if config.activation_checkpointing:
        for block in denoiser.blocks:
            _checkpoint_activations(block)
    if config.compile:
        for block in denoiser.blocks:
            block.compile()
    strategy = resolve_strategy(config, world)
    modules = [*others, denoiser]
    if strategy == "ddp":
        from torch.distributed._composable import replicate

        for module in modules:
            replicate(module, device_ids=[device.index] if device.type == "cuda" else None)
    elif strategy == "fsdp":
        _fully_shard(denoiser, others, mesh or device_mesh(config, world, device), bf16,
                     config.reshard_after_forward)
    return strategy


def shard_copy(denoiser: nn.Module, others: list[nn.Module], config: ParallelConfig, world: World, mesh,
               bf16: bool) -> None:
    """Shard a copy of the trained modules (the EMA weights) exactly like them, so each rank keeps its shard of
    the copy and generation with it gathers one block at a time, as training does. Replicated strategies keep
    the copy whole on every rank, as they keep the model."""
    if resolve_strategy(config, world) == "fsdp":
        _fully_shard(denoiser, others, mesh, bf16, reshard_after_forward=True)


def _fully_shard(denoiser: nn.Module, others: list[nn.Module], mesh, bf16: bool, reshard_after_forward: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
