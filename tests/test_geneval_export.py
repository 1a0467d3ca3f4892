import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pixrun.geneval_export import export_geneval, read_geneval_metadata
from pixrun.pipeline import Pipeline, build_world, to_uint8
from pixrun.text import TextTower

ENTRIES = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {
        "tag": "colors",
        "include": [{"class": "square", "count": 1, "color": "red"}],
        "prompt": "a photo of a red square",
    },
    {
        "tag": "position",
        "include": [{"class": "cross", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a circle left of a cross",
    },
]


@pytest.fixture
def metadata_file(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in ENTRIES) + "\n")  # a trailing blank line
    return path


@pytest.fixture
def tiny_pipeline(tiny_config):
    config = tiny_config()
    torch.manual_seed(0)
    pipeline = Pipeline.from_config(config, TextTower.build(config.text, build_world(config).vocabulary())).eval()
    with torch.no_grad():  # the final layer starts at zero; random values make images differ by prompt and seed
        for p in pipeline.denoiser.final_layer.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return pipeline


def read_like_geneval(image_dir):
    """What GenEval's evaluate_images.py reads: numbered folders, their metadata.jsonl, samples/<digits>.png."""
    found = {}
    for subfolder in sorted(os.listdir(image_dir)):
        folder = image_dir / subfolder
        if not folder.is_dir() or not subfolder.isdigit():
            continue
        with open(folder / "metadata.jsonl") as fp:
            metadata = json.load(fp)
        images = sorted(n for n in os.listdir(folder / "samples") if re.match(r"\d+\.png", n))
        found[subfolder] = (metadata, images)
    return found


def test_export_writes_the_layout_geneval_reads(tiny_pipeline, metadata_file, tmp_path):
    out = tmp_path / "geneval"
    assert export_geneval(tiny_pipeline, metadata_file, out, images_per_prompt=2, seed=10, batch_size=4) == 3
    found = read_like_geneval(out)
    assert list(found) == ["00000", "00001", "00002"]
    for (metadata, images), entry in zip(found.values(), ENTRIES):
        assert metadata == entry
        assert images == ["0000.png", "0001.png"]
    image = Image.open(out / "00002" / "samples" / "0001.png")
    assert image.mode == "RGB" and image.size == (32, 32)


def test_image_k_of_prompt_n_uses_its_own_seed_whatever_the_batch(tiny_pipeline, metadata_file, tmp_path):
    for batch_size in (1, 6):
        export_geneval(tiny_pipeline, metadata_file, tmp_path / f"b{batch_size}", images_per_prompt=2, seed=10,
                       batch_size=batch_size)
    expected = to_uint8(tiny_pipeline.generate([ENTRIES[2]["prompt"]], seed=10 + 2 * 2 + 1))[0]
    for batch_size in (1, 6):
        written = np.asarray(Image.open(tmp_path / f"b{batch_size}" / "00002" / "samples" / "0001.png"))
        assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
    first = np.asarray(Image.open(tmp_path / "b6" / "00000" / "samples" / "0000.png"))
    second = np.asarray(Image.open(tmp_path / "b6" / "00000" / "samples" / "0001.png"))
    assert not np.array_equal(first, second)


def test_a_line_that_is_not_a_geneval_prompt_is_rejected(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ENTRIES[0]) + "\n" + json.dumps({"prompt": "no tag"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_geneval_metadata(path)
