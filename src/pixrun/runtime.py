"""Where and how a process computes: its device, the precision and attention kernels there, and its place among
`torchrun`'s processes. A leaf: it imports nothing of pixrun, so any module may use it."""

import os
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA where there is one, else the CPU; anything else as torch reads it ("cpu", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles that oneDNN may use: torch's public CPU feature table, unless ONEDNN_MAX_CPU_ISA
    caps oneDNN below AMX (which the feature table does not see), so that setting it on an AMX machine makes pixrun
    take the path of a CPU without AMX (fp32), as docs/results.md measures it."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "DEFAULT").upper()
    capped = isa not in ("DEFAULT", "ALL") and "AMX" not in isa
    return not capped and bool(torch.cpu.get_capabilities().get("amx_tile", False))


def bf16_is_fast(device: torch.device) -> bool:
    """GPUs with bf16 support, and CPUs with AMX tiles, whose bf16 matmuls are several times faster than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_amx()
    return False


def uses_bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and bf16_is_fast(device))


@contextmanager
def compute_context(device: torch.device, precision: str):
    """bf16 autocast (weights stay fp32) where it is fast (auto), always (bf16), or never (fp32). On CPU,
    attention uses the plain math kernel: for pixrun's short sequences it beats the flash kernel, whose
    bf16 backward is several times slower than its fp32 one."""
    with ExitStack() as stack:
        if uses_bf16(device, precision):
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        stack.enter_context(attention_context(device))
        yield


def attention_context(device: torch.device):
    """The attention kernel choice, also for backward: blocks recomputed there (activation checkpointing) must
    run the kernel their forward ran."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()


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


def init_world(device_name: str, backend: str = "auto", timeout_minutes: int = 30) -> tuple[World, torch.device]:
    """Join the process group `torchrun` set up in the environment, and pick this process's device: `device_name`
    as resolve_device reads it, a bare "cuda" being the local rank's GPU. `backend` auto: nccl on CUDA, else gloo."""
    world = World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                  int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world.distributed and not dist.is_initialized():
        backend = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), device_id=(
            device if device.type == "cuda" else None))
    return world, device


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
