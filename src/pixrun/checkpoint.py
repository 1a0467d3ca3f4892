"""Checkpoints: tensors in safetensors, everything else in JSON; nothing is ever unpickled.

One registry says what a checkpoint holds: each owner (the trained modules, their EMA, the optimizer, the
counters, the data source, the budget) is a `Stateful` by name, with its own `state_dict` / `load_state_dict`
(torch.distributed.checkpoint's protocol, as torchtitan's CheckpointManager uses it). Its tensors go to one DCP
state as "{owner}.{key}", the rest of it to state.json under "{owner}".

    RUN/checkpoints/step_0001000/
        sharded/                the owners' tensors as the ranks hold them: one DCP state in safetensors files,
                                one per rank ("shard-NNNNN-model-00001-of-00001"; a rank with nothing to write
                                after DCP's deduplication of replicas writes none): "model.{param}", "ema.{param}",
                                "optimizer.{param}.{slot}", "counters.{name}"; each rank writes and reads only its
                                own shards, and it loads onto any world size
        weights.safetensors     trainable weights, whole ("denoiser.*", "text_encoder.*"): what sample, eval and
                                export read; rank 0 alone assembles them from sharded/, one tensor at a time
        ema.safetensors         their EMA, same keys
        state.json              the step, the owners' JSON state ("data", "budget"), the files of sharded/
                                (rank 0, written last)

A checkpoint is written to a temporary folder and renamed into place, so a folder with a step name is complete;
with async_save the ranks write sharded/ in the background and `wait()` completes the folder. Rank 0 alone
chooses the checkpoint to resume (every file present, every safetensors file as long as its header says; a damaged
latest checkpoint is reported and the one before it used) and tells the other ranks.
"""

import json
import os
import shutil
import struct
import warnings
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from pixrun.errors import ConfigError
from pixrun.runtime import World

STEP_PREFIX = "step_"
SHARDED = "sharded"
FILES = ("weights.safetensors", "ema.safetensors", "state.json")
WHOLE = {"weights": "model", "ema": "ema"}  # whole-weights file -> the owner whose tensors it holds
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def damage(path: Path, optimizer: bool = True) -> str | None:
    """Why a checkpoint folder cannot be loaded (to resume training, or with optimizer=False only its whole
    weights), or None when it looks whole."""
    for name in FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        state = json.loads((path / "state.json").read_text())
    except (ValueError, UnicodeDecodeError):
        return "state.json is not valid JSON"
    files = [path / "weights.safetensors", path / "ema.safetensors"]
    if optimizer:
        shards = state.get("sharded_files") or []
        if not shards:
            return "state.json lists no sharded state"
        files += [path / SHARDED / name for name in shards]
    for file in files:
        if not file.is_file():
            return f"{file.relative_to(path)} is missing"
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


def choose_resume(run_dir: Path, resume: str | None, world: World) -> Path | None:
    """The checkpoint to resume from, chosen by rank 0 and sent to every rank (which never scan on their own).
    None: a fresh run (the run folder must have no checkpoints); "auto": the latest good checkpoint if any;
    "latest": it must exist; else a checkpoint folder. Raises ConfigError on every rank when rank 0 refuses."""
    choice: list[str | None] = [None, None]  # the folder, or the reason to refuse
    if world.is_main:
        try:
            found = _resume_point(Path(run_dir), resume)
            choice[0] = None if found is None else str(found)
        except ConfigError as e:
            choice[1] = str(e)
    if world.size > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[1] is not None:
        raise ConfigError(choice[1])
    return None if choice[0] is None else Path(choice[0])


def _resume_point(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        if list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already has checkpoints: pass --resume, or set run_dir to a new folder")
        return None
    if resume in ("auto", "latest"):
        found = latest_good_checkpoint(run_dir)
        if found is None and resume == "latest":
            raise ConfigError(f"nothing to resume: {run_dir} has no usable checkpoint")
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"{path} is not a checkpoint folder")
    return path


def load_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def load_tensors(path: Path, name: str, device="cpu") -> dict[str, torch.Tensor]:
    """`name` is weights or ema: whole tensors."""
    return load_file(Path(path) / f"{name}.safetensors", device=str(device))


class ModuleState:
    """A module's parameters, by name: DCP loads them in place."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.module.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(state[name])


class OptimizerState:
    """The optimizer's state of `model`'s parameters, flat: "{param}.{slot}" (its groups come from the config)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = get_optimizer_state_dict(self.model, self.optimizer)["state"]  # also allocates an empty one
        return {f"{name}.{slot}": torch.as_tensor(value) for name, slots in state.items()
                for slot, value in slots.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            name, slot = key.rsplit(".", 1)
            nested.setdefault(name, {})[slot] = value
        groups = get_optimizer_state_dict(self.model, self.optimizer)["param_groups"]
        set_optimizer_state_dict(self.model, self.optimizer, {"state": nested, "param_groups": groups})


class TensorState:
    """Named tensors (the device-side counters), filled in place."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in self.tensors.items():
            tensor.copy_(state[name])


@dataclass
class _PendingSave:
    tmp: Path
    final: Path
    state: dict
    written: Future | None  # this rank's part of sharded/ (async), then on rank 0 the whole weights


class Checkpointer:
    """Saves and restores the `states` of one run (owner name -> Stateful), on one rank or many; each rank writes
    and reads only its own shards. "model" and "ema" are the trained modules and their EMA (the same parameter
    names, sharded the same way): rank 0 also writes them whole.

    `world` has rank, size, is_main and barrier() (pixrun.runtime.World). With `async_save`, `save` returns once
    this rank's shards are copied to host memory and they are written in the background; `wait()` completes a
    pending checkpoint (call it before exiting; `save` calls it first).
    """

    def __init__(self, run_dir: Path, world: World, keep: int, states: dict[str, Stateful], async_save: bool = False):
        self.run_dir = Path(run_dir)
        self.world = world
        self.keep = keep
        self.states = states
        self.async_save = async_save
        self.pending: _PendingSave | None = None
        self.distributed = dist.is_initialized()
        # the background writes synchronise over their own gloo group: collectives of two threads on one group
        # could interleave, and DCP's async save needs a CPU backend even when training runs on NCCL
        self.async_group = dist.new_group(backend="gloo") if async_save and self.distributed else None

    def _split(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
        """Every owner's state: its tensors in one flat DCP state ("{owner}.{key}"), the rest for state.json."""
        tensors, records = {}, {}
        for owner, stateful in self.states.items():
            for key, value in stateful.state_dict().items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{owner}.{key}"] = value
                else:
                    records.setdefault(owner, {})[key] = value
        return tensors, records

    def save(self, step: int) -> Path:
        """Writes checkpoint `step` (with async_save, completed by the next `wait()`); returns its folder."""
        self.wait()
        root = checkpoint_dir(self.run_dir)
        final = root / f"{STEP_PREFIX}{step:07d}"
        tmp = root / f".tmp-{final.name}"
        if self.world.is_main:
            for unfinished in root.glob(".tmp-*"):  # left by a run that stopped while saving
                shutil.rmtree(unfinished)
            tmp.mkdir(parents=True)
        self.world.barrier()
        writer = dcp.HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True)
        tensors, records = self._split()
        with _single_process_quiet():
            if self.async_save:
                written = dcp.async_save(tensors, storage_writer=writer, process_group=self.async_group,
                                         no_dist=not self.distributed)
            else:
                dcp.save(tensors, storage_writer=writer, no_dist=not self.distributed)
                written = None
        if self.world.is_main:  # the whole weights need every rank's shards on disk first
            executor = ThreadPoolExecutor(1)
            whole = {file: [key for key in tensors if key.startswith(owner + ".")] for file, owner in WHOLE.items()}
            written = executor.submit(_write_whole_weights, tmp, whole, written)
            executor.shutdown(wait=False)
        self.pending = _PendingSave(tmp, final, {"step": step, **records}, written)
        if not self.async_save:
            self.wait()
        return final

    def wait(self) -> Path | None:
        """Completes the pending checkpoint, if any (every rank must call this): waits for its files, then rank 0
        writes state.json, renames the folder into place and removes the oldest beyond `keep`."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if pending.written is not None:
            pending.written.result()
        self.world.barrier()
        if self.world.is_main:
            shards = sorted(p.name for p in (pending.tmp / SHARDED).glob("*.safetensors"))
            (pending.tmp / "state.json").write_text(json.dumps({**pending.state, "sharded_files": shards}, indent=1))
            shutil.rmtree(pending.final, ignore_errors=True)
            os.replace(pending.tmp, pending.final)
            for old in list_checkpoints(self.run_dir)[:-self.keep]:
                shutil.rmtree(old)
        self.world.barrier()
        return pending.final

    def load(self, path: Path, saved: dict) -> None:
        """Every owner's state from this rank's part of checkpoint `path`, resharded to this world; `saved` is
        its state.json, read once by the caller (`load_state`)."""
        tensors, _ = self._split()  # the owners' own tensors: DCP loads into them
        with _single_process_quiet():
            dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(Path(path) / SHARDED)),
                     no_dist=not self.distributed)
        for owner, stateful in self.states.items():
            prefix = owner + "."
            own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            stateful.load_state_dict({**saved.get(owner, {}), **own})


def _write_whole_weights(tmp: Path, whole: dict[str, list[str]], written: Future | None) -> None:
    """Rank 0: weights.safetensors and ema.safetensors (`whole`: file -> its DCP keys), each tensor assembled from
    the shard files in turn, under the name it has in its owner."""
    if written is not None:
        written.result()
    with ShardReader(tmp / SHARDED) as shards:
        for file, keys in whole.items():
            layout = {key.split(".", 1)[1]: (shards.dtype(key), shards.size(key)) for key in keys}
            _stream_safetensors(tmp / f"{file}.safetensors", layout, (shards.whole(key) for key in keys))


class ShardReader:
    """A DCP folder's safetensors shards, open for reading whole tensors in one process."""

    def __init__(self, folder: Path):
        self.metadata = dcp.HuggingFaceStorageReader(str(folder)).read_metadata()
        self.pieces: dict[str, list[tuple[torch.Size, str]]] = {}
        for index, stored in self.metadata.storage_data.items():
            self.pieces.setdefault(index.fqn, []).append((index.offset, stored.relative_path))
        self.stack = ExitStack()
        self.files = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def names(self) -> list[str]:
        return list(self.pieces)

    def size(self, key: str) -> torch.Size:
        return self.metadata.state_dict_metadata[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def whole(self, key: str) -> torch.Tensor:
        whole = torch.empty(self.size(key), dtype=self.dtype(key))
        for offset, file in self.pieces[key]:
            if file not in self.files:
                self.files[file] = self.stack.enter_context(safe_open(file, "pt"))
            piece = self.files[file].get_tensor(key)
            whole[tuple(slice(o, o + n) for o, n in zip(offset, piece.shape))] = piece
        return whole


def _stream_safetensors(path: Path, layout: dict[str, tuple[torch.dtype, torch.Size]],
                        tensors: Iterable[torch.Tensor]) -> None:
    """A safetensors file written one tensor at a time (the header first, from `layout`: each name's dtype and
    size), so only one tensor is ever in memory; `tensors` yields them in the order of `layout`."""
    header, start = {}, 0
    for name, (dtype, size) in layout.items():
        end = start + size.numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(size), "data_offsets": [start, end]}
        start = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for (name, (dtype, size)), tensor in zip(layout.items(), tensors, strict=True):
            if (tensor.dtype, tensor.shape) != (dtype, size):
                raise ValueError(f"{name}: {tensor.dtype} {list(tensor.shape)}, declared {dtype} {list(size)}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


@contextmanager
def _single_process_quiet():
    """torch.distributed.checkpoint warns that it runs in one process; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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
