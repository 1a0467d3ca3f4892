"""The same `pixrun train` on 1 process and on 2 or 4 under torchrun (gloo on CPU): DDP, FSDP2 and HSDP train the
same model as one process with the same global batch, a 2-process checkpoint resumes in 1 process, and a run on
prepared shards continues its data order on another world size."""

import shutil
from functools import partial

import pytest
import torch

from pixrun.checkpoint import list_checkpoints, load_tensors
from pixrun.data.prepare import PrepareOptions, prepare_dataset
from tests.helpers import (
    image_folder,
    last_record_per_step,
    load_optimizer_tensors,
    pixrun_command,
    run,
    tiny_t5,
    torchrun_command,
)

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


def test_four_processes_train_the_same_model_as_one(one_process, tmp_path):
    run_dir = tmp_path / "fsdp4"
    run(torchrun_command(4, run_dir, *STEPS, "parallel.strategy=fsdp"), timeout=600)
    assert_same_state(list_checkpoints(one_process)[-1], list_checkpoints(run_dir)[-1])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two aspect-ratio buckets in shards of 4 images (enough shards for 4 partitions in each bucket), and a
    pretrained text encoder to train with (the small one knows only the shapes world's words)."""
    root = tmp_path_factory.mktemp("data")
    options = PrepareOptions(resolution=32, patch_size=8, min_side=16, processes=1, chunk_size=4)
    prepare_dataset(image_folder(root / "images", 96), root / "prepared", options)
    return root / "prepared", tiny_t5(root / "t5")


def test_a_shard_run_resumes_its_data_order_on_another_world_size(prepared, tmp_path):
    """Stopped at step 10 on 2 processes, continued on 1 and on 4: each ends where one process running all 20
    steps ends, so every step saw the same samples in the same rows."""
    shards, encoder = prepared
    data = [f"data.shards={shards}", "data.source=shards", "data.partitions=4", "data.num_workers=1",
            f"text.encoder={encoder}", "text.dtype=float32"]
    straight = tmp_path / "straight"
    run(pixrun_command(straight, *STEPS, *data))
    first_half = tmp_path / "two"
    run(torchrun_command(2, first_half, "train.steps=10", "train.checkpoint_every=10", "train.sample_every=20",
                         *data))
    for processes in (1, 4):
        resumed = tmp_path / f"on{processes}"
        shutil.copytree(first_half, resumed)
        command = pixrun_command if processes == 1 else partial(torchrun_command, processes)
        run(command(resumed, *STEPS, *data, resume=True), timeout=600)
        assert_same_state(list_checkpoints(straight)[-1], list_checkpoints(resumed)[-1])


def test_a_released_latent_pipeline_fine_tunes_on_two_fsdp_processes_as_on_one(tmp_path):
    from tests.test_finetune import saved_pipeline

    folder = saved_pipeline("PRXPipeline", tmp_path / "prx")
    init = [f"init={folder}", "optim.name=muon", "train.steps=4", "train.checkpoint_every=4", "train.sample_every=4"]
    run(pixrun_command(tmp_path / "one", *init))
    run(torchrun_command(2, tmp_path / "two", *init, "parallel.strategy=fsdp"))
    assert_same_state(list_checkpoints(tmp_path / "one")[-1], list_checkpoints(tmp_path / "two")[-1])


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_sprint_and_self_alignment_train_on_two_processes_as_on_one(strategy, tmp_path):
    """SPRINT's fusion (a root-level layer, sharded with the denoiser's own parameters) and self_align's EMA
    forward (the sharded EMA copy, stopped after a block) give the same model on 2 processes as on 1."""
    steps = ["train.steps=6", "train.checkpoint_every=6", "train.sample_every=6", "model.depth=3",
             "tread.enabled=true", "tread.fusion=sprint", "self_align.weight=0.5", "self_align.block=0",
             "self_align.target_block=2", "self_align.hidden=16"]
    run(pixrun_command(tmp_path / "one", *steps))
    run(torchrun_command(2, tmp_path / "two", *steps, f"parallel.strategy={strategy}"))
    one, two = list_checkpoints(tmp_path / "one")[-1], list_checkpoints(tmp_path / "two")[-1]
    assert {"denoiser.sprint_fusion.mask_token", "self_align_projector.mlp.0.weight"} <= load_tensors(one, "weights").keys()
    assert_same_state(one, two)
    ours, theirs = last_record_per_step(tmp_path / "two"), last_record_per_step(tmp_path / "one")
    for step in ours:
        assert ours[step]["self_align"] == pytest.approx(theirs[step]["self_align"], rel=1e-4, abs=1e-6)
