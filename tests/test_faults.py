"""Never lose work: SIGKILL at random steps, a rank killed under torchrun, preemption by SIGTERM, a damaged
checkpoint, and non-finite losses."""

import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from pixrun.checkpoint import list_checkpoints, load_tensors
from pixrun.train import Trainer, TrainingError
from tests.helpers import (
    last_record_per_step,
    load_optimizer_tensors,
    pixrun_command,
    run,
    start,
    stop,
    torchrun_command,
    wait_for_step,
)
from tests.test_distributed import assert_same_state

STEPS = ["train.steps=16", "train.checkpoint_every=2", "train.sample_every=100", "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run(pixrun_command(run_dir, *STEPS))
    return run_dir


def assert_identical(a, b):
    for name in ("weights", "ema"):
        ta, tb = load_tensors(a, name), load_tensors(b, name)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{name} differs"
    oa, ob = load_optimizer_tensors(a), load_optimizer_tensors(b)
    assert all(torch.equal(oa[k], ob[k]) for k in oa), "optimizer state differs"


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_weights(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    rng = random.Random(7)
    kills = 0
    for target in sorted(rng.sample(range(2, 15), 3)):
        process = start(pixrun_command(run_dir, *STEPS, resume=True), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        try:
            wait_for_step(run_dir, target, process)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.wait()
        finally:
            stop(process)
    assert kills >= 2
    run(pixrun_command(run_dir, *STEPS, resume=True))
    assert_identical(list_checkpoints(uninterrupted)[-1], list_checkpoints(run_dir)[-1])
    # every step trained on its own batch once in the final history: nothing repeated, nothing skipped
    ours, theirs = last_record_per_step(run_dir), last_record_per_step(uninterrupted)
    assert sorted(ours) == list(range(1, 17))
    assert [ours[s]["loss"] for s in ours] == [theirs[s]["loss"] for s in ours]


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_comes_back_and_continues(uninterrupted, tmp_path):
    run_dir = tmp_path / "elastic"
    command = torchrun_command(2, run_dir, *STEPS, "parallel.strategy=fsdp", resume=True, max_restarts=1)
    launcher = start(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 5, launcher)
        workers = worker_pids(launcher.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=240)
    finally:
        stop(launcher)
    assert launcher.returncode == 0, output[-3000:]
    assert list_checkpoints(run_dir)[-1].name == "step_0000016"
    assert "steps 0->16" in output and re.search(r"steps [1-9][0-9]*->16", output)  # restarted from a checkpoint
    assert_same_state(list_checkpoints(uninterrupted)[-1], list_checkpoints(run_dir)[-1])


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(uninterrupted, tmp_path):
    run_dir = tmp_path / "preempted"
    overrides = [*STEPS[:1], "train.checkpoint_every=1000", "train.sample_every=1000"]
    process = start(pixrun_command(run_dir, *overrides, resume=True), stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True)
    try:
        wait_for_step(run_dir, 3, process)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        stop(process)
    assert process.returncode == 0
    saved = list_checkpoints(run_dir)
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("_")[1]) < 16
    assert "stopped by a signal" in output
    run(pixrun_command(run_dir, *STEPS, resume=True))
    assert_identical(list_checkpoints(uninterrupted)[-1], list_checkpoints(run_dir)[-1])


def test_a_damaged_latest_checkpoint_is_skipped_for_the_one_before(tmp_path, tiny_config, capsys):
    config = tiny_config(train__steps=4, train__checkpoint_every=2, train__sample_every=100)
    Trainer(config).run()
    latest = list_checkpoints(config.run_dir)[-1]
    weights = latest / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a write cut short
    resumed = Trainer(tiny_config(train__steps=4, train__checkpoint_every=2, train__sample_every=100), "auto")
    assert resumed.start == 2
    assert "skipping damaged checkpoint step_0000004" in capsys.readouterr().out


def test_non_finite_losses_skip_their_step_and_too_many_stop_the_run(tiny_config):
    trainer = Trainer(tiny_config(train__steps=10, train__max_nonfinite_in_row=3))
    trainer.step(0)
    before = {name: p.detach().clone() for name, p in trainer.state.params.items()}
    real_loss = trainer.state.pipeline.flow.loss
    trainer.state.pipeline.flow.loss = lambda *args: real_loss(*args) * float("nan")
    trainer.step(1)
    assert all(torch.equal(before[name], p) for name, p in trainer.state.params.items())
    assert int(trainer.state.nonfinite_total) == 1
    trainer.step(2)
    trainer.check_health(2)  # two in a row: the run goes on
    trainer.step(3)
    with pytest.raises(TrainingError, match="non-finite 3 steps in a row"):
        trainer.check_health(3)  # read on the next logging step
    trainer.state.pipeline.flow.loss = real_loss
    trainer.step(4)
    trainer.check_health(4)
    assert int(trainer.state.nonfinite_total) == 3
    assert not all(torch.equal(before[name], p) for name, p in trainer.state.params.items())


def worker_pids(launcher: int, timeout: float = 30) -> list[int]:
    """The pixrun processes torchrun started (its other children, such as helpers, are not workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read()
            except OSError:
                continue
            if parent == launcher and b"pixrun.cli" in command:
                workers.append(int(entry))
        if len(workers) >= 2:
            return sorted(workers)
        time.sleep(0.1)
    return []


def test_sampling_needs_only_the_weights_of_a_checkpoint(tiny_config):
    from pixrun.checkpoint import SHARDED, latest_good_checkpoint
    from pixrun.pipeline import load_run

    config = tiny_config(train__steps=2, train__checkpoint_every=2, train__sample_every=100)
    Trainer(config).run()
    shutil.rmtree(list_checkpoints(config.run_dir)[-1] / SHARDED)  # e.g. weights copied without the state
    assert load_run(config.run_dir).generate(["a photo of a circle"]).shape == (1, 3, 32, 32)
    assert latest_good_checkpoint(config.run_dir, warn=lambda message: None) is None  # but training cannot resume
