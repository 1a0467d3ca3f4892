"""Checkpoints: tensors in safetensors, everything else in JSON; nothing is ever unpickled.

    RUN/checkpoints/step_0001000/
        weights.safetensors     trainable weights, whole ("denoiser.*", "text_encoder.*"): what sample, eval and
                                export read, and what every rank loads its shard from on resume
        ema.safetensors         their EMA, same keys
        optimizer/              optimizer state as each rank holds it, through torch.distributed.checkpoint in
                                safetensors files ("state.{param name}.{slot}"); loads onto any world size
        state.json              step, EMA update count, data position, world size (written last)

A checkpoint is written to a temporary folder and renamed into place, so a folder with a step name is complete.
On resume each candidate is checked (every file present, every safetensors file as long as its header says);
a damaged latest checkpoint is reported and the one before it used.
"""

import json
import os
import shutil
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

STEP_PREFIX = "step_"
FILES = ("weights.safetensors", "ema.safetensors", "state.json")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def damage(path: Path, optimizer: bool = True) -> str | None:
    """Why a checkpoint folder cannot be loaded (to resume training, or with optimizer=False only its weights),
    or None when it looks whole."""
    for name in FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((path / "state.json").read_text())
    except (ValueError, UnicodeDecodeError):
        return "state.json is not valid JSON"
    shards = sorted((path / "optimizer").glob("*.safetensors")) if optimizer else []
    if optimizer and not shards:
        return "optimizer/ holds no state"
    for file in [path / "weights.safetensors", path / "ema.safetensors", *shards]:
        problem = _safetensors_damage(file)
        if problem:
            return f"{file.relative_to(path)}: {problem}"
    return None


def latest_good_checkpoint(run_dir: Path, warn=print, optimizer: bool = True) -> Path | None:
    for path in reversed(list_checkpoints(run_dir)):
        problem = damage(path, optimizer)
        if problem is None:
            return path
        warn(f"pixrun: skipping damaged checkpoint {path.name}: {problem}")
    return None


def load_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def load_tensors(path: Path, name: str, device="cpu") -> dict[str, torch.Tensor]:
    """`name` is weights or ema: whole tensors."""
    return load_file(Path(path) / f"{name}.safetensors", device=str(device))


def load_optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The optimizer state of a checkpoint as whole tensors, read in one process (for inspection and tests)."""
    parts: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
    for shard in sorted((Path(path) / "optimizer").glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            offsets = json.loads((f.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for key in f.keys():  # noqa: SIM118 - a safetensors file is not iterable
                parts.setdefault(key, []).append((offsets.get(key, {}).get("saved_offsets", []), f.get_tensor(key)))
    tensors = {}
    for key, pieces in parts.items():
        first = pieces[0][1]
        shape = [max(o[d] + p.shape[d] for o, p in pieces) for d in range(first.dim())] if first.dim() else []
        whole = torch.empty(shape, dtype=first.dtype)
        for offset, piece in pieces:
            whole[tuple(slice(o, o + n) for o, n in zip(offset, piece.shape))] = piece
        tensors[key] = whole
    return tensors


class Checkpointer:
    """Saves and restores one run's trainable weights, their EMA and the optimizer, on one rank or many.

    `params` are the trainable parameters by name (plain tensors, or DTensors when sharded); `modules` maps the
    name prefixes ("denoiser", "text_encoder") to the modules owning them, so optimizer state is keyed by name.
    """

    def __init__(self, run_dir: Path, params: dict[str, nn.Parameter], modules: dict[str, nn.Module],
                 optimizer: torch.optim.Optimizer, is_main: bool, barrier, keep: int):
        self.run_dir = Path(run_dir)
        self.params = params
        self.owner = nn.ModuleDict(modules)
        self.optimizer = optimizer
        self.is_main = is_main
        self.barrier = barrier
        self.keep = keep

    def save(self, step: int, ema: dict[str, torch.Tensor], state: dict) -> Path:
        root = checkpoint_dir(self.run_dir)
        final = root / f"{STEP_PREFIX}{step:07d}"
        tmp = root / f".tmp-{final.name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        weights = {name: whole_tensor(p.detach()) for name, p in self.params.items()}
        if self.is_main:
            save_file(weights, tmp / "weights.safetensors")
        del weights
        ema_whole = {name: whole_tensor(t) for name, t in ema.items()}
        if self.is_main:
            save_file(ema_whole, tmp / "ema.safetensors")
        del ema_whole
        optimizer_state = _flatten(get_optimizer_state_dict(self.owner, self.optimizer)["state"])
        with _single_process_quiet():
            dcp.save(optimizer_state, storage_writer=dcp.HuggingFaceStorageWriter(
                str(tmp / "optimizer"), save_distributed=True), no_dist=not dist.is_initialized())
        self.barrier()
        if self.is_main:
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(self.run_dir)[:-self.keep]:
                shutil.rmtree(old)
        self.barrier()
        return final

    def load(self, path: Path, ema: dict[str, torch.Tensor]) -> dict:
        """Weights and EMA into this rank's shards, optimizer state resharded to this world; returns state.json."""
        _load_into(self.params, load_tensors(path, "weights"))
        _load_into(ema, load_tensors(path, "ema"))
        template = get_optimizer_state_dict(self.owner, self.optimizer)  # also allocates the optimizer's state
        flat = _flatten(template["state"])
        with _single_process_quiet():
            dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(Path(path) / "optimizer")),
                     no_dist=not dist.is_initialized())
        set_optimizer_state_dict(self.owner, self.optimizer,
                                 {"state": _unflatten(flat), "param_groups": template["param_groups"]})
        return load_state(path)


@contextmanager
def _single_process_quiet():
    """torch.distributed.checkpoint warns that it runs in one process; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor on the CPU (gathered across ranks when sharded; every rank must call this)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().contiguous().cpu()


@torch.no_grad()
def _load_into(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    for name, target in targets.items():
        source = tensors[name]
        if isinstance(target, DTensor):  # every rank holds the whole tensor, so each cuts its own shard
            source = distribute_tensor(source.to(target.device), target.device_mesh, target.placements,
                                       src_data_rank=None)
        target.copy_(source)


def _flatten(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"state.{name}.{slot}": torch.as_tensor(value) for name, slots in state.items()
            for slot, value in slots.items()}


def _unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, slot = key[len("state."):].rsplit(".", 1)
        state.setdefault(name, {})[slot] = value
    return state


def _safetensors_damage(file: Path) -> str | None:
    size = file.stat().st_size
    if size < 8:
        return "truncated"
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            return "truncated header"
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            return "unreadable header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        return f"{size} bytes where the header describes {8 + header_len + end}"
    return None
