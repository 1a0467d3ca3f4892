"""Running pixrun as a user does (a subprocess, or torchrun), for the scale-out and fault tests."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
