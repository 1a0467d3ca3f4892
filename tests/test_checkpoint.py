"""Checkpoints of sharded state: saved by 2 FSDP2 ranks (gloo on CPU), loaded into 1 and into 4; the whole weights
written by rank 0 alone; asynchronous saves; damage; rank 0 choosing the checkpoint for every rank; no pickles."""

import json
import os
import shutil
import struct
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pixrun.checkpoint import (
    SHARDED,
    Checkpointer,
    ModuleState,
    OptimizerState,
    TensorState,
    choose_resume,
    damage,
    latest_good_checkpoint,
    list_checkpoints,
    load_state,
    load_tensors,
)
from pixrun.config import ConfigError
from pixrun.runtime import World
from tests.helpers import counting_whole_tensors, free_port, load_optimizer_tensors

COUNTERS = {"ema_updates": 7, "nonfinite_steps": 2}
STATE = {"data": {"epoch": 1, "position": 3}}


class Record:
    """An owner whose state is JSON, as the data source's and the budget's are."""

    def __init__(self, state: dict | None = None):
        self.state = dict(state or {})

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def registry(model, ema, optimizer, counters, data: Record) -> dict:
    """The owners a run registers, with a stand-in for the data source."""
    return {"model": ModuleState(model), "ema": ModuleState(ema), "optimizer": OptimizerState(model, optimizer),
            "counters": TensorState(counters), "data": data}


def tiny_model(seed: int) -> nn.ModuleDict:
    """Two owners; the last layer has 3 rows, so on 4 ranks one rank holds an empty shard of it."""
    torch.manual_seed(seed)
    return nn.ModuleDict({
        "denoiser": nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 3)),
        "text_encoder": nn.Embedding(10, 16),
    })


def largest_whole_numel(model: nn.Module) -> int:
    return max(p.numel() for p in model.parameters())


def build(seed: int, world_size: int) -> tuple[nn.ModuleDict, nn.ModuleDict, torch.optim.Optimizer]:
    """Model, its EMA (other values, the same names and sharding) and AdamW, FSDP2-sharded over `world_size`."""
    model, ema = tiny_model(seed), tiny_model(seed + 100)
    ema.requires_grad_(False)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        for modules in (model, ema):
            for owner in modules.values():
                fully_shard(owner, mesh=mesh)
    return model, ema, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)


def train_one_step(model: nn.ModuleDict, optimizer: torch.optim.Optimizer) -> None:
    tokens = torch.arange(8).reshape(2, 4)
    model["denoiser"](model["text_encoder"](tokens).mean(1)).square().mean().backward()
    optimizer.step()


def whole_state(model, ema, optimizer, counters) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds, gathered whole (only for comparing: every rank takes part)."""
    def whole(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    state = {f"model.{n}": whole(p) for n, p in model.named_parameters()}
    state.update({f"ema.{n}": whole(p) for n, p in ema.named_parameters()})
    names = {p: n for n, p in model.named_parameters()}
    for p, slots in optimizer.state.items():
        state.update({f"optimizer.{names[p]}.{slot}": whole(value) for slot, value in slots.items()})
    state.update({f"counters.{name}": value.clone() for name, value in counters.items()})
    return state


class LargestPlainTensor(TorchDispatchMode):
    """The most elements of any plain floating-point tensor an op makes on this thread (a DTensor's ops count by
    its local part, so this sees whole tensors being gathered; byte buffers of pickled plans do not count)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if type(t) is torch.Tensor and t.is_floating_point():
                self.numel = max(self.numel, t.numel())
        return out


def join(rank: int, world_size: int, port: int) -> World:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return World(rank, world_size)


def _save_on_two_ranks(rank: int, world_size: int, port: int, folder: str) -> None:
    world = join(rank, world_size, port)
    try:
        model, ema, optimizer = build(0, world_size)
        train_one_step(model, optimizer)
        counters = {name: torch.tensor(value) for name, value in COUNTERS.items()}
        run_dir = f"{folder}/run"
        states = registry(model, ema, optimizer, counters, Record(STATE["data"]))
        with LargestPlainTensor() as spy:
            Checkpointer(run_dir, world, keep=5, states=states).save(1)
        expected = whole_state(model, ema, optimizer, counters)
        with LargestPlainTensor() as gathering:  # the spy sees a gather: it can catch one in the save above
            next(model.parameters()).full_tensor()

        # the background write may only start once training has changed the values
        trained_on, write = threading.Event(), HuggingFaceStorageWriter.write_data
        waited = []

        def write_later(self, plan, planner):
            waited.append(trained_on.wait(timeout=20))
            return write(self, plan, planner)

        HuggingFaceStorageWriter.write_data = write_later
        background = Checkpointer(run_dir, world, keep=5, states=states, async_save=True)
        with counting_whole_tensors() as whole_bytes:
            pending = background.save(2)
            listed_before_wait = [p.name for p in list_checkpoints(run_dir)]
            with torch.no_grad():  # training goes on: the checkpoint keeps the values at save time
                for p in [*model.parameters(), *ema.parameters()]:
                    p.add_(1.0)
                counters["ema_updates"] += 1
            trained_on.set()
            assert background.wait() == pending
        report = {
            "whole_tensor_bytes": whole_bytes[0], "largest_plain_numel": spy.numel,
            "gathered_numel": gathering.numel, "listed_before_wait": listed_before_wait, "pending": pending.name,
            "returned_before_writing": waited == [True],
        }
        with open(f"{folder}/rank{rank}.json", "w") as f:
            json.dump(report, f)
        if world.is_main:
            save_file({k: v.contiguous() for k, v in expected.items()}, f"{folder}/expected.safetensors")
    finally:
        dist.destroy_process_group()


def _resume_on_four_ranks(rank: int, world_size: int, port: int, folder: str) -> None:
    world = join(rank, world_size, port)
    try:
        # the other ranks look at an empty folder: if they chose for themselves, "latest" would fail there
        run_dir = f"{folder}/run" if world.is_main else f"{folder}/elsewhere"
        try:
            choose_resume(run_dir, None, world)
            refused = ""
        except ConfigError as e:
            refused = str(e)
        path = choose_resume(run_dir, "latest", world)
        model, ema, optimizer = build(1, world_size)
        counters = {name: torch.tensor(0) for name in COUNTERS}
        with LargestPlainTensor() as spy:
            state = load_state(path)
            Checkpointer(f"{folder}/run", world, keep=5,
                         states=registry(model, ema, optimizer, counters, Record())).load(path, state)
        loaded = whole_state(model, ema, optimizer, counters)
        with open(f"{folder}/rank{rank}.json", "w") as f:
            json.dump({"refused": refused, "path": str(path), "state": state, "largest_plain_numel": spy.numel}, f)
        if world.is_main:
            save_file({k: v.contiguous() for k, v in loaded.items()}, f"{folder}/loaded.safetensors")
    finally:
        dist.destroy_process_group()


def spawn(worker, world_size: int, folder) -> list[dict]:
    # forked, so the workers start with torch and pixrun already imported (seconds each, spawned)
    mp.start_processes(worker, args=(world_size, free_port(), str(folder)), nprocs=world_size, start_method="fork")
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world_size)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A run saved by 2 FSDP2 ranks: step 1 synchronously, step 2 asynchronously, of the same state."""
    folder = tmp_path_factory.mktemp("two_ranks")
    reports = spawn(_save_on_two_ranks, 2, folder)
    return folder, reports, load_file(folder / "expected.safetensors")


def assert_equal_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_the_whole_weights_files_hold_the_unsharded_tensors(two_ranks):
    folder, _, expected = two_ranks
    first = list_checkpoints(folder / "run")[0]
    for name, prefix in (("weights", "model."), ("ema", "ema.")):
        whole = {prefix + key: value for key, value in load_tensors(first, name).items()}
        assert_equal_tensors(whole, {k: v for k, v in expected.items() if k.startswith(prefix)})
    assert "denoiser.0.weight" in load_tensors(first, "weights")  # the keys sample, eval and export read
    optimizer = {f"optimizer.{k}": v for k, v in load_optimizer_tensors(first).items()}
    assert_equal_tensors(optimizer, {k: v for k, v in expected.items() if k.startswith("optimizer.")})


def test_only_rank_0_materialises_whole_tensors(two_ranks):
    _, (main, other), expected = two_ranks
    whole_bytes = sum(v.nbytes for k, v in expected.items() if k.startswith(("model.", "ema.")))
    assert main["whole_tensor_bytes"] == whole_bytes and other["whole_tensor_bytes"] == 0
    largest = largest_whole_numel(tiny_model(0))
    assert main["gathered_numel"] == largest  # a gather would have been seen
    assert main["largest_plain_numel"] < largest and other["largest_plain_numel"] < largest


def test_an_async_save_becomes_a_checkpoint_once_waited_for_with_the_values_at_save_time(two_ranks):
    folder, reports, _ = two_ranks
    assert all(r["returned_before_writing"] and r["listed_before_wait"] == ["step_0000001"] for r in reports)
    first, second = list_checkpoints(folder / "run")
    assert second.name == reports[0]["pending"] == "step_0000002"
    for name in ("weights", "ema"):
        assert (first / f"{name}.safetensors").read_bytes() == (second / f"{name}.safetensors").read_bytes()
    assert_equal_tensors(load_optimizer_tensors(second), load_optimizer_tensors(first))
    assert load_state(second) == {**STATE, "step": 2, "sharded_files": load_state(first)["sharded_files"]}
    assert len(load_state(second)["sharded_files"]) == 2  # one file per rank
    assert not list((folder / "run" / "checkpoints").glob(".tmp-*"))


def test_nothing_in_a_checkpoint_folder_is_a_pickle(two_ranks):
    folder, _, _ = two_ranks
    for checkpoint in list_checkpoints(folder / "run"):
        files = [p for p in checkpoint.rglob("*") if p.is_file()]
        assert {p.suffix for p in files} == {".safetensors", ".json"}
        for file in files:
            if file.suffix == ".json":
                json.loads(file.read_text())
                continue
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                json.loads(f.read(header_len))  # a safetensors header, not a pickle
            with safe_open(file, "pt") as f:
                assert all(f.get_tensor(key) is not None for key in f.keys())  # noqa: SIM118


def test_a_two_rank_checkpoint_loads_into_one_process(two_ranks, tmp_path):
    folder, _, expected = two_ranks
    model, ema, optimizer = build(1, 1)  # other values, no optimizer state: all must come from disk
    counters = {name: torch.tensor(0) for name in COUNTERS}
    data = Record()
    checkpointer = Checkpointer(tmp_path, World(), keep=1, states=registry(model, ema, optimizer, counters, data))
    path = list_checkpoints(folder / "run")[0]
    state = load_state(path)
    with counting_whole_tensors() as whole_bytes:
        checkpointer.load(path, state)
    assert state == {**STATE, "step": 1, "sharded_files": state["sharded_files"]}
    assert data.state == STATE["data"]  # each owner takes back its own state
    assert_equal_tensors(whole_state(model, ema, optimizer, counters), expected)
    assert whole_bytes[0] == 0


def test_a_two_rank_checkpoint_loads_into_four_ranks_from_rank_0s_choice(two_ranks, tmp_path):
    folder, _, expected = two_ranks
    shutil.copytree(folder / "run", tmp_path / "run")
    latest = list_checkpoints(tmp_path / "run")[-1]
    shard = latest / SHARDED / load_state(latest)["sharded_files"][-1]
    shard.write_bytes(shard.read_bytes()[:-10])  # a write cut short: rank 0 falls back to step 1
    reports = spawn(_resume_on_four_ranks, 4, tmp_path)
    assert {r["path"] for r in reports} == {str(list_checkpoints(tmp_path / "run")[0])}
    assert all("already has checkpoints" in r["refused"] for r in reports)  # rank 0's refusal, on every rank
    assert all(r["state"]["step"] == 1 for r in reports)
    assert all(r["largest_plain_numel"] < largest_whole_numel(tiny_model(0)) for r in reports)
    assert_equal_tensors(load_file(tmp_path / "loaded.safetensors"), expected)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(two_ranks, tmp_path, capsys):
    folder, _, _ = two_ranks

    def truncate(file):
        file.write_bytes(file.read_bytes()[:-10])

    damages = {
        "a cut shard": lambda c: truncate(c / SHARDED / load_state(c)["sharded_files"][0]),
        "a missing shard": lambda c: (c / SHARDED / load_state(c)["sharded_files"][1]).unlink(),
        "cut weights": lambda c: truncate(c / "weights.safetensors"),
        "a missing ema": lambda c: (c / "ema.safetensors").unlink(),
        "broken state.json": lambda c: (c / "state.json").write_text("{"),
    }
    for name, harm in damages.items():
        run_dir = tmp_path / name.replace(" ", "_")
        shutil.copytree(folder / "run", run_dir)
        first, latest = list_checkpoints(run_dir)
        harm(latest)
        assert damage(latest) is not None, name
        assert latest_good_checkpoint(run_dir) == first, name
        assert choose_resume(run_dir, "auto", World()) == first, name
        assert f"skipping damaged checkpoint {latest.name}" in capsys.readouterr().out
        weights_only = name in ("a cut shard", "a missing shard")  # sample, eval and export need no shards
        assert (latest_good_checkpoint(run_dir, optimizer=False) == latest) == weights_only, name
    with pytest.raises(ConfigError, match="nothing to resume"):
        choose_resume(tmp_path / "empty", "latest", World())
    assert choose_resume(tmp_path / "empty", "auto", World()) is None
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        choose_resume(tmp_path, str(tmp_path / "empty"), World())
