"""Multi-resolution stages and training from prepared shards, each resumed mid-run to the same weights."""

import json
import math
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pixrun.checkpoint import list_checkpoints, load_state
from pixrun.cli import _caption_embedder
from pixrun.config import ConfigError
from pixrun.data.prepare import PrepareOptions, prepare_dataset
from pixrun.runtime import World
from pixrun.train import build_source, train
from tests.helpers import image_folder, tiny_t5
from tests.test_faults import assert_identical
from tests.test_prepare import OPTIONS as BAD_DATA_OPTIONS
from tests.test_prepare import make_bad_data_folder

STAGES = "[{until_step: 4, resolution: 16, batch_size: 8}, {until_step: 8, resolution: 32, batch_size: 4}]"


def resume_from(run_dir, step, tmp_path, name):
    """A copy of a finished run that stopped after `step`: later checkpoints and logs removed."""
    copy = tmp_path / name
    shutil.copytree(run_dir, copy)
    for checkpoint in list_checkpoints(copy):
        if int(checkpoint.name.split("_")[1]) > step:
            shutil.rmtree(checkpoint)
    (copy / "metrics.jsonl").unlink()
    return copy


def test_stages_change_resolution_and_batch_and_resume_across_the_boundary(tiny_config, tmp_path):
    common = {"train__steps": 8, "stages": STAGES, "train__checkpoint_every": 2, "train__keep_checkpoints": 10,
              "train__sample_every": 100}
    straight = tiny_config("straight", **common)
    source = build_source(straight, World())
    assert [tuple(source.batch(step, *straight.stage_at(step)).images.shape) for step in (3, 4)] == [
        (8, 3, 16, 16), (4, 3, 32, 32)]
    train(straight)
    records = [json.loads(line) for line in Path(straight.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    resumed = resume_from(straight.run_dir, 2, tmp_path, "resumed")
    train(tiny_config("resumed", **common), resume="auto")
    assert_identical(list_checkpoints(straight.run_dir)[-1], list_checkpoints(resumed)[-1])
    with pytest.raises(ConfigError, match="last stage ends at step 8, but train.steps is 9"):
        tiny_config(train__steps=9, stages=STAGES)
    with pytest.raises(ConfigError, match="data.resolution"):
        tiny_config(train__steps=8, stages=STAGES.replace("resolution: 32", "resolution: 24"))


@pytest.mark.parametrize("embeddings", [False, True])
def test_training_on_prepared_shards_resumes_without_repeating_or_skipping(tiny_config, tmp_path, embeddings):
    encoder = str(tiny_t5(tmp_path / "t5"))
    options = PrepareOptions(resolution=32, patch_size=8, min_side=16, processes=1)
    embed, identity = _caption_embedder(encoder, 32, "float32") if embeddings else (None, None)
    report = prepare_dataset(image_folder(tmp_path / "images", 40), tmp_path / "prepared", options, embed, identity)
    assert report.kept == 40
    common = {"data__source": "shards", "data__shards": str(tmp_path / "prepared"), "data__num_workers": 0,
              "data__partitions": 1,
              "text__encoder": encoder, "text__dtype": "float32", "train__steps": 6, "train__batch_size": 4,
              "train__checkpoint_every": 2, "train__keep_checkpoints": 10, "train__sample_every": 100}
    straight = tiny_config("straight", **common)
    train(straight)
    assert load_state(list_checkpoints(straight.run_dir)[-1])["data"]["stream"]  # the stream's position is saved
    resumed = resume_from(straight.run_dir, 2, tmp_path, "resumed")
    train(tiny_config("resumed", **common), resume="auto")
    assert_identical(list_checkpoints(straight.run_dir)[-1], list_checkpoints(resumed)[-1])


def test_the_small_encoder_trains_on_a_prepared_folder_shown_and_measured_on_held_out_samples(tiny_config, tmp_path):
    """No downloaded encoder: the tokenizer is learnt from the folder's captions; the grid shows held-out
    captions beside their real images, and the metrics and MSE by t are taken on the held-out images."""
    options = PrepareOptions(resolution=32, patch_size=8, min_side=16, processes=1, heldout=6, heldout_share=0.5)
    prepare_dataset(image_folder(tmp_path / "images", 40), tmp_path / "prepared", options)
    common = {"data__source": "shards", "data__shards": str(tmp_path / "prepared"), "data__num_workers": 0,
              "data__partitions": 1, "train__batch_size": 4, "train__sample_every": 2, "train__checkpoint_every": 2}
    config = tiny_config(**common, train__steps=4, train__metrics_every=4, metrics__random_init=True,
                         metrics__metrics="[fid,kid]", metrics__num_images=4, metrics__cache_dir="''")
    run_dir = Path(train(config))
    grid = Image.open(run_dir / "samples" / "step_0000004.png")
    grid_prompts = 2  # sample.grid_prompts of the tiny config: as many held-out rows, each real + 1 generated
    assert grid.height == grid_prompts * (2 * 32 + 2)
    quality = [json.loads(line) for line in (run_dir / "quality.jsonl").read_text().splitlines()]
    assert {"fid", "kid", "mse_t0.0-0.3"} <= set(quality[-1]) and math.isfinite(quality[-1]["fid"])
    vocabulary = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "Ġphoto" in vocabulary  # a word of the folder's captions, not of the shapes world's
    train(tiny_config(**common, train__steps=6), resume="auto")
    assert list_checkpoints(run_dir)[-1].name == "step_0000006"


def test_prepare_and_train_complete_on_the_bad_data_corpus(tiny_config, tmp_path):
    good, bad = make_bad_data_folder(tmp_path / "src")
    report = prepare_dataset(tmp_path / "src", tmp_path / "prepared", BAD_DATA_OPTIONS)
    assert {item["item"]: item["reason"] for item in report.bad_items} == bad and report.kept == len(good)
    # and one image goes bad inside a shard after preparing: the loader skips it, counts it, training goes on
    shard = next((tmp_path / "prepared" / "shards" / "64x64").glob("*.tar"))
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data : member.offset_data + member.size] = b"\0" * member.size
    shard.write_bytes(bytes(data))
    config = tiny_config(data__source="shards", data__shards=str(tmp_path / "prepared"), data__num_workers=0,
                         data__partitions=1, data__resolution=64, text__encoder=str(tiny_t5(tmp_path / "t5")),
                         text__dtype="float32",
                         train__steps=6, train__batch_size=2, train__sample_every=100)
    train(config)
    records = [json.loads(line) for line in Path(config.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[-1]["data_skipped"] >= 1  # once per epoch it comes round
    assert all(math.isfinite(r["loss"]) for r in records)
