"""A folder of a few hundred images trains with the default settings, and bad data input of any kind stops
`pixrun train` with one line and exit code 2."""

import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from pixrun.cli import main
from pixrun.data.prepare import PrepareOptions, prepare_dataset
from pixrun.data.stream import INDEX_NAME
from tests.helpers import image_folder, pixrun_command, run, torchrun_command
from tests.test_distributed import assert_same_state, list_checkpoints


def photo_folder(root, count: int):
    """`count` distinct 400x400 JPEGs (large enough for prepare's default 512-px bucket) with captions."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((400, 400), Image.Resampling.BILINEAR).save(root / f"{i:03d}.jpg")
        (root / f"{i:03d}.txt").write_text(f"a photo of {['red', 'green', 'blue'][i % 3]} tiles number {i % 7}")
    return root


@pytest.mark.slow
def test_a_few_hundred_images_prepared_and_trained_with_the_defaults_on_one_and_two_processes(tmp_path):
    prepared = tmp_path / "prepared"
    run([sys.executable, "-m", "pixrun.cli", "data", "prepare", str(photo_folder(tmp_path / "images", 300)),
         str(prepared)], timeout=300)
    index = json.loads((prepared / INDEX_NAME).read_text())
    assert len(index["shards"]) == 1 and index["samples"] == 297  # one shard, far fewer than the 64 partitions
    # the default data settings (64 partitions, batch 64, 2 workers); a tiny model whose 32-px patches keep the
    # 512-px bucket cheap
    settings = ["data.source=shards", f"data.shards={prepared}", "train.batch_size=64", "model.patch_size=32",
                "data.resolution=64", "train.steps=2", "train.checkpoint_every=2", "train.sample_every=2"]
    run(pixrun_command(tmp_path / "one", *settings), timeout=600)
    run(torchrun_command(2, tmp_path / "two", *settings), timeout=600)
    assert_same_state(list_checkpoints(tmp_path / "one")[-1], list_checkpoints(tmp_path / "two")[-1])
    for run_dir in ("one", "two"):
        records = [json.loads(line) for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2] and all(r["data_skipped"] == 0 for r in records)


def damage(prepared, how: str) -> None:
    index = prepared / INDEX_NAME
    data = json.loads(index.read_text())
    if how == "not json":
        index.write_text("{not json")
    elif how == "another format":
        index.write_text(json.dumps({**data, "format": "something-else"}))
    elif how == "damaged entry":
        index.write_text(json.dumps({**data, "shards": [{"path": "x.tar", "bucket": "wide"}]}))
    elif how == "no captions":
        index.write_text(json.dumps({key: value for key, value in data.items() if key != "captions"}))
    elif how == "captions missing":
        (prepared / data["captions"]).unlink()
    elif how == "every sample bad":
        for shard in data["shards"]:
            (prepared / shard["path"]).write_bytes(b"\x01" * 4096)


TINY_RUN = ["model.patch_size=8", "data.resolution=32", "train.budget=", "data.num_workers=0", "model.width=32",
            "model.depth=1", "model.heads=2", "model.axes_dim=[8,8]", "text.width=32", "text.depth=1", "text.heads=2",
            "train.threads=1", "repa.weight=0", "shapes_perceptual.weight=0"]


@pytest.mark.parametrize("how, settings, message", [
    ("no folder", [], "cannot be read as a pixrun shard index"),
    ("not json", [], "cannot be read as a pixrun shard index"),
    ("another format", [], "is not a pixrun shard index"),
    ("damaged entry", [], "a shard entry is damaged"),
    ("no captions", [], "lists no captions"),
    ("captions missing", [], "captions.txt cannot be read"),
    ("too few samples", [], "yields no batch: a global batch takes 64 samples"),
    ("", ["train.batch_size=8"], r"data.partitions \(64\) must divide the global batch \(8\)"),
    # 24 images in two buckets, 4 partitions: an epoch of 6 steps, then the stream finds nothing good in it
    ("every sample bad", ["train.batch_size=4", "data.partitions=4", "train.steps=8"],
     "every sample of epoch 0 was skipped"),
])
def test_bad_data_input_is_one_line_and_exit_code_2(tmp_path, capsys, how, settings, message):
    prepared = tmp_path / "prepared"
    options = PrepareOptions(resolution=32, patch_size=8, min_side=16, processes=1, heldout=0)
    prepare_dataset(image_folder(tmp_path / "images", 12 if how == "too few samples" else 24), prepared, options)
    damage(prepared, how)
    shards = tmp_path / "nowhere" if how == "no folder" else prepared
    code = main(["train", f"run_dir={tmp_path / 'run'}", "data.source=shards", f"data.shards={shards}",
                 "train.steps=2", *TINY_RUN, *settings])
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]  # after the progress bar, when training had begun
    assert code == 2 and error.startswith("pixrun: error: ") and "Traceback" not in stderr, stderr
    assert re.search(message, error), error
