"""Running pixrun as a user does (a subprocess, or torchrun), for the scale-out and fault tests."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pixrun.checkpoint import SHARDED, ShardReader
from tests.conftest import TINY_OVERRIDES

# fp32 and AdamW, so that runs split over processes add up the same numbers as one process, within float
# rounding: Muon's Newton-Schulz runs in bf16, where a last-bit difference in a gradient sum can round the other
# way (Muon on sharded parameters has its own test in test_optim.py)
FAULT_OVERRIDES = [*TINY_OVERRIDES, "train.precision=fp32", "optim.name=adamw", "sample.steps=2"]


def env() -> dict[str, str]:
    # restarted workers must not read the previous round's addresses from a shared store (pytorch#135712)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixrun_command(run_dir: Path, *overrides: str, resume: bool = False) -> list[str]:
    command = [sys.executable, "-m", "pixrun.cli", "train", f"run_dir={run_dir}", *FAULT_OVERRIDES, *overrides]
    return command + (["--resume", "auto"] if resume else [])


def torchrun_command(processes: int, run_dir: Path, *overrides: str, resume: bool = False,
                     max_restarts: int = 0) -> list[str]:
    # c10d rendezvous, as for elastic jobs: each restart round gets a fresh rendezvous
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    train = pixrun_command(run_dir, *overrides, resume=resume)[1:]  # drop the python executable
    return launcher + train


def start(command: list[str], **kwargs) -> subprocess.Popen:
    """In its own process group, so that `stop` also ends the workers a launcher started."""
    return subprocess.Popen(command, env=env(), start_new_session=True, **kwargs)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    process = start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        stop(process)
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def metric_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in metric_records(run_dir)):
            return
        if process.poll() is not None:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{run_dir} did not reach step {step}")


def last_record_per_step(run_dir: Path) -> dict[int, dict]:
    """A resumed run logs the steps after its last checkpoint again; the last record of each step counts."""
    return {r["step"]: r for r in metric_records(run_dir)}


class HostReads:
    """Counts reads of tensor values by the host while active: `.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
    `bool()`, `int()`, `float()` of a tensor from Python, and `aten._local_scalar_dense` (what they come down to
    in C++ too). On a GPU each one waits for the device; a CPU run shows the same calls."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        self.calls: list[str] = []

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class LocalScalars(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.calls.append(f"aten._local_scalar_dense at {caller()}")
                return func(*args, **(kwargs or {}))

        def counted(name, original):
            def method(tensor, *args, **kwargs):
                counter.calls.append(f"Tensor.{name} at {caller()}")
                return original(tensor, *args, **kwargs)
            return method

        self.originals = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, counted(name, original))
        self.mode = LocalScalars()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


def caller() -> str:
    """The innermost frame outside this file and torch's own Python: who asked for the value."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("helpers.py"):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"


def tiny_t5(path: Path, seed: int = 0) -> Path:
    """A T5 encoder of random weights with a tokenizer for the shapes world's words, saved as a hub folder is."""
    import transformers

    words = ["a", "photo", "of", "red", "green", "blue", "circle", "square"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, num_heads=2, num_layers=1, d_ff=32)
    torch.manual_seed(seed)
    transformers.T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def image_folder(root: Path, count: int) -> Path:
    """`count` noise images in two aspect ratios, each with a caption file."""
    import numpy as np
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue"]
    for i in range(count):
        w, h = (48, 40) if i % 3 else (40, 56)
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.jpg")
        (root / f"{i:03d}.txt").write_text(f"a photo of a {colors[i % 3]} {'circle' if i % 2 else 'square'}")
    return root


def load_optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The optimizer state of a checkpoint as whole tensors ("{param}.{slot}"), read in one process."""
    prefix = "optimizer."
    with ShardReader(Path(path) / SHARDED) as shards:
        return {key[len(prefix):]: shards.whole(key) for key in shards.names() if key.startswith(prefix)}


@contextmanager
def counting_whole_tensors():
    """Counts the bytes of the whole tensors this process assembles from shards (rank 0 writing the whole
    weights), in a one-item list."""
    counted, assemble = [0], ShardReader.whole

    def whole(reader, key):
        tensor = assemble(reader, key)
        counted[0] += tensor.nbytes
        return tensor

    ShardReader.whole = whole
    try:
        yield counted
    finally:
        ShardReader.whole = assemble


def assert_resumed_as_straight(straight: Path, resumed: Path, holds: str) -> dict[str, dict[str, torch.Tensor]]:
    """The last checkpoints of a run trained straight and of one stopped and resumed hold bit-identical weights
    and EMA, among them a tensor whose name starts with `holds`; returns the straight run's, by kind."""
    from pixrun.checkpoint import list_checkpoints, load_tensors

    a, b = list_checkpoints(straight)[-1], list_checkpoints(resumed)[-1]
    assert a.name == b.name
    tensors = {}
    for name in ("weights", "ema"):
        ta, tb = load_tensors(a, name), load_tensors(b, name)
        assert any(key.startswith(holds) for key in ta) and ta.keys() == tb.keys()
        assert all(torch.equal(ta[key], tb[key]) for key in ta), f"{name} differs after resume"
        tensors[name] = ta
    return tensors
