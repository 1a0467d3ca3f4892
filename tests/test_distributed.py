"""The same `pixrun train` on 1 process and on 2 under torchrun (gloo on CPU): DDP and FSDP2 train the same model
as one process with the same global batch, and a 2-process checkpoint resumes in 1 process."""

import shutil

import pytest
import torch

from pixrun.checkpoint import list_checkpoints, load_optimizer_tensors, load_tensors
from tests.helpers import last_record_per_step, pixrun_command, run, torchrun_command

pytestmark = pytest.mark.slow
STEPS = ["train.steps=20", "train.checkpoint_every=10", "train.sample_every=20"]


def assert_same_state(a, b, atol=1e-5):
    for name in ("weights", "ema"):
        ta, tb = load_tensors(a, name), load_tensors(b, name)
        assert ta.keys() == tb.keys()
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=1e-4, msg=f"{name}:{key}")
    oa, ob = load_optimizer_tensors(a), load_optimizer_tensors(b)
    assert oa.keys() == ob.keys()
    for key in oa:
        torch.testing.assert_close(oa[key].float(), ob[key].float(), atol=atol, rtol=1e-4, msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run(pixrun_command(run_dir, *STEPS))
    return run_dir


@pytest.mark.parametrize("strategy,extra", [("fsdp", []), ("ddp", []), ("fsdp", ["parallel.replicate_degree=2"])],
                         ids=["fsdp", "ddp", "hsdp"])
def test_two_processes_train_the_same_model_as_one(strategy, extra, one_process, tmp_path):
    run_dir = tmp_path / strategy
    done = run(torchrun_command(2, run_dir, *STEPS, f"parallel.strategy={strategy}", *extra))
    assert f"x 2 ({strategy})" in done.stdout
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000010", "step_0000020"]
    assert_same_state(list_checkpoints(one_process)[-1], list_checkpoints(run_dir)[-1])
    ours, theirs = last_record_per_step(run_dir), last_record_per_step(one_process)
    assert sorted(ours) == list(range(1, 21))
    for step in ours:
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], rel=1e-4)


def test_a_two_process_fsdp_checkpoint_resumes_in_one_process(one_process, tmp_path):
    sharded = tmp_path / "sharded"
    run(torchrun_command(2, sharded, "train.steps=10", "train.checkpoint_every=10", "train.sample_every=20",
                         "parallel.strategy=fsdp"))
    assert load_tensors(list_checkpoints(sharded)[-1], "weights")  # written whole, not in shards
    run(pixrun_command(sharded, *STEPS, resume=True))
    assert_same_state(list_checkpoints(one_process)[-1], list_checkpoints(sharded)[-1])

    # and a 1-process checkpoint resumes on 2 processes
    copy = tmp_path / "regrown"
    shutil.copytree(one_process, copy)
    shutil.rmtree(list_checkpoints(copy)[-1])
    run(torchrun_command(2, copy, *STEPS, "parallel.strategy=fsdp", resume=True))
    assert_same_state(list_checkpoints(one_process)[-1], list_checkpoints(copy)[-1])
