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

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any rank (so all ranks stop at the same step)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.size


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


def resolve_strategy(config: ParallelConfig, world: World) -> str:
    if config.strategy == "auto":
        return "fsdp" if world.distributed else "single"
    if config.strategy != "single" and not world.distributed:
        return "single"  # the same config runs in one process; DDP or FSDP over one rank is a no-op
    if config.strategy == "single" and world.distributed:
        raise ValueError("parallel.strategy 'single' cannot run with several processes; use ddp or fsdp")
    return config.strategy


def parallelize(denoiser: nn.Module, others: list[nn.Module], config: ParallelConfig, world: World,
                device: torch.device, bf16: bool) -> str:
    """Checkpoint, compile, then replicate or shard the trainable modules in place; returns the strategy used.
    `others` are the other trained modules (a jointly trained text encoder, REPA's projector), each one unit;
    frozen networks (a pretrained text encoder, loss networks) are simply replicated."""
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
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if world.size % config.replicate_degree:
            raise ValueError(f"parallel.replicate_degree {config.replicate_degree} does not divide {world.size} ranks")
        if config.replicate_degree > 1:
            mesh = init_device_mesh(device.type, (config.replicate_degree, world.size // config.replicate_degree),
                                    mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(device.type, (world.size,), mesh_dim_names=("shard",))
        # fp32 master weights and gradient reduction; bf16 weights for compute when bf16 is on
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for block in denoiser.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=config.reshard_after_forward)
        for module in modules:
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=config.reshard_after_forward)
    return strategy


def _checkpoint_activations(block: nn.Module) -> None:
    """Recompute the block in backward. Wrapping `forward` (not the module) keeps the parameter names."""
    forward = block.forward

    def checkpointed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed
