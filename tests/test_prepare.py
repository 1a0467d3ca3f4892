import io
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

import pixrun.data.prepare as prepare_module
from pixrun.config import ConfigError
from pixrun.data.buckets import make_buckets, parse_bucket
from pixrun.data.prepare import PrepareOptions, perceptual_hash, prepare_dataset
from pixrun.data.shards import read_captions, read_held_out
from pixrun.data.stream import EmptyDatasetError, ShardStream, TarSample, read_tar_samples
from pixrun.text import TextConfig, TextTower
from tests.helpers import image_folder

OPTIONS = PrepareOptions(resolution=64, patch_size=16, min_side=32, processes=1)
SMALL = PrepareOptions(resolution=32, patch_size=8, min_side=16, processes=1, chunk_size=4)


def pattern(seed: int, width: int, height: int) -> np.ndarray:
    """A smooth random RGB picture: distinct seeds give distinct perceptual hashes."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def encoded(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **kwargs)
    return buffer.getvalue()


def jpeg(seed: int, width: int = 80, height: int = 80) -> bytes:
    return encoded(Image.fromarray(pattern(seed, width, height)), "JPEG", quality=95)


def make_bad_data_folder(root):
    """Every case of the bad-data corpus; returns ({good item: caption}, {bad item: reason})."""
    (root / "sub").mkdir(parents=True)
    good, bad = {}, {}

    def add(name, image_bytes, caption, caption_file="txt", reason=None):
        """caption: the text of the caption file (None: no file); a dict is written as JSON."""
        (root / name).write_bytes(image_bytes)
        if caption is not None:
            data = json.dumps(caption).encode() if isinstance(caption, dict) else caption
            data = data.encode() if isinstance(data, str) else data
            (root / f"{name.rsplit('.', 1)[0]}.{caption_file}").write_bytes(data)
        if reason:
            bad[name] = reason
        else:
            good[name] = caption.get("caption", caption.get("text")) if isinstance(caption, dict) else caption

    add("plain.jpg", jpeg(1), "a plain photo")
    add("wide.jpg", jpeg(2, 120, 70), {"caption": "a wide photo", "url": "x"}, "json")
    add("text_key.jpg", jpeg(3, 70, 110), {"text": "a tall photo"}, "json")
    rgba = np.dstack([pattern(4, 80, 80), np.full((80, 80), 255, np.uint8)])
    rgba[:, :40, 3] = 0  # left half transparent: must become white
    add("alpha.png", encoded(Image.fromarray(rgba, "RGBA"), "PNG"), "a half transparent picture")
    add("cmyk.jpg", encoded(Image.fromarray(pattern(5, 80, 80)).convert("CMYK"), "JPEG"), "a CMYK picture")
    sixteen = pattern(6, 80, 80)[..., 0].astype(np.uint16) * 257
    add("sixteen.png", encoded(Image.fromarray(sixteen), "PNG"), "a 16-bit picture")
    add("gray.jpg", encoded(Image.fromarray(pattern(7, 80, 80)[..., 1]), "JPEG"), "a grey picture")
    add("sub/nested.jpg", jpeg(8), "a picture in a subfolder")

    add("truncated.jpg", jpeg(20)[:400], "cut short", reason="unreadable image")
    add("empty.jpg", b"", "nothing", reason="empty file")
    add("one_pixel.png", encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "a dot", reason="too small")
    add("strip.jpg", jpeg(21, 400, 40), "a strip", reason="too elongated")
    add("no_caption.jpg", jpeg(22), None, reason="missing caption")
    add("latin1.jpg", jpeg(23), "caf\xe9".encode("latin-1"), reason="caption not UTF-8")
    add("small.jpg", jpeg(24, 40, 40), "small", reason="needs too much upscaling")
    # After plain.jpg in file order: the later copy is the one dropped.
    add("plain_again.png", encoded(Image.open(io.BytesIO(jpeg(1))), "PNG"), "the plain photo again", reason="duplicate")
    return good, bad


def read_output(out, part: str = "shards") -> dict[str, TarSample]:
    """Kept samples by source item, checked against the index: its training shards, or its held-out ones."""
    index = json.loads((out / "index.json").read_text())
    samples = {}
    for shard in index[part]:
        with open(out / shard["path"], "rb") as stream:
            items = list(read_tar_samples(stream, shard["path"]))
        assert len(items) == shard["count"]
        for place, sample in enumerate(items):
            assert isinstance(sample, TarSample)
            prefix = "heldout_" if part == "heldout" else ""
            assert sample.key == f"{prefix}{shard['bucket']}_{shard['path'][-10:-4]}_{place:06d}"
            with Image.open(io.BytesIO(sample.members["jpg"])) as image:
                assert image.mode == "RGB" and image.size == parse_bucket(shard["bucket"])
            samples[json.loads(sample.members["json"])["source"]] = sample
    if part == "shards":
        assert index["samples"] == len(samples)
    return samples


def test_bad_data_corpus_every_bad_item_reported_and_no_good_item_lost(tmp_path):
    good, bad = make_bad_data_folder(tmp_path / "src")
    report = prepare_dataset(tmp_path / "src", tmp_path / "out", OPTIONS)
    assert {item["item"]: item["reason"] for item in report.bad_items} == bad
    samples = read_output(tmp_path / "out")
    assert {source: s.members["txt"].decode() for source, s in samples.items()} == good
    assert report.kept == len(good)
    assert sum(report.dropped.values()) == len(bad)
    assert sum(b["kept"] for b in report.buckets.values()) == len(good)
    assert report.buckets["64x64"]["dropped"] == {"needs too much upscaling": 1, "duplicate": 1}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["kept"] == len(good) and saved["dropped"] == report.dropped
    summary = report.summary()
    assert f"kept {len(good)} of {len(good) + len(bad)}" in summary and "unreadable image" in summary

    def pixels(name):
        return np.asarray(Image.open(io.BytesIO(samples[name].members["jpg"])), dtype=np.float64)

    alpha = pixels("alpha.png")
    assert alpha[:, :28].min() > 240  # the transparent half is white
    sixteen = pixels("sixteen.png")[..., 0]
    expected = np.asarray(Image.fromarray(pattern(6, 80, 80)[..., 0]).resize((64, 64)), dtype=np.float64)
    assert abs(sixteen.mean() - expected.mean()) < 8  # scaled from 16 bits, not clipped to white
    assert pixels("wide.jpg").shape == (48, 80, 3) and pixels("text_key.jpg").shape == (80, 48, 3)


def img2dataset_shard(path, samples):
    with TarWriter(str(path), encoder=False) as writer:
        for key, image, caption in samples:
            record = {"__key__": key, "jpg": image, "json": json.dumps({"caption": caption, "url": "u"}).encode()}
            if key.endswith("1"):
                record["txt"] = caption.encode()
            writer.write(record)


def corrupt_member_header(path, member_name):
    with tarfile.open(path) as tar:
        offset = tar.getmember(member_name).offset_data - tarfile.BLOCKSIZE  # its own header, after any PAX header
    data = bytearray(path.read_bytes())
    data[offset:offset + 100] = b"\xff" * 100
    path.write_bytes(bytes(data))


def test_webdataset_shards_with_corrupt_member_and_truncation(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    first = [(f"00000{i}", jpeg(30 + i), f"caption {i}") for i in range(5)]
    img2dataset_shard(src / "00000.tar", first)
    corrupt_member_header(src / "00000.tar", "000002.jpg")
    second = [(f"10000{i}", jpeg(40 + i), f"second {i}") for i in range(4)]
    img2dataset_shard(src / "00001.tar", second)
    whole = (src / "00001.tar").read_bytes()
    with tarfile.open(src / "00001.tar") as tar:
        cut = tar.getmember("100003.jpg").offset_data + 100
    (src / "00001.tar").write_bytes(whole[:cut])

    report = prepare_dataset(src, tmp_path / "out", OPTIONS)
    reasons = {item["item"].split("@")[0]: (item["reason"], item["detail"]) for item in report.bad_items}
    jpeg_blocks = -(-len(first[2][1]) // 512)
    assert reasons == {
        "00000.tar": ("corrupt tar member", f"bad header, skipped {512 * (1 + jpeg_blocks)} bytes"),
        "00000.tar:000002": ("missing image", ""),  # its caption JSON survived
        "00001.tar": ("corrupt tar member", "stream ends inside member 100003.jpg"),
    }
    samples = read_output(tmp_path / "out")
    kept = {f"{shard}.tar:{key}": caption for shard, group in (("00000", first), ("00001", second))
            for key, _, caption in group}
    del kept["00000.tar:000002"], kept["00001.tar:100003"]
    assert {source: s.members["txt"].decode() for source, s in samples.items()} == kept


def test_parquet_source(tmp_path):
    images = [jpeg(50 + i) for i in range(5)] + [b"not an image"]
    captions = [f"row {i}" for i in range(5)] + ["broken"]
    captions[3] = None
    table = pa.table({"image": [{"bytes": b, "path": "p"} for b in images], "caption": captions})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=4)
    report = prepare_dataset(tmp_path / "data.parquet", tmp_path / "out", OPTIONS)
    assert {i["item"]: i["reason"] for i in report.bad_items} == {
        "data.parquet:row3": "missing caption", "data.parquet:row5": "unreadable image"
    }
    samples = read_output(tmp_path / "out")
    assert {s: v.members["txt"].decode() for s, v in samples.items()} == {
        f"data.parquet:row{i}": f"row {i}" for i in (0, 1, 2, 4)
    }


def test_embeddings_are_stored_beside_each_sample(tmp_path):
    good, _ = make_bad_data_folder(tmp_path / "src")
    calls = []

    def embed(captions):
        calls.append(len(captions))
        return [np.full((3, 4), len(c), dtype=np.float32) for c in captions]

    encoder = {"encoder": "org/t5", "encoder_class": "auto", "dtype": "bfloat16", "max_tokens": 32, "clean": "basic",
               "class": "T5EncoderModel", "weights": "0123abcd"}
    prepare_dataset(tmp_path / "src", tmp_path / "out", OPTIONS, embed=embed, text_encoder=encoder)
    samples = read_output(tmp_path / "out")
    for sample in samples.values():
        array = np.load(io.BytesIO(sample.members["emb.npy"]))
        assert array.dtype == np.float16 and array.shape == (3, 4)
        assert array[0, 0] == len(sample.members["txt"].decode())
    assert sum(calls) == len(good)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["embeddings"] is True and index["text_encoder"] == encoder
    # Embeddings say which encoder made them; another encoder's cannot be added to the same folder.
    with pytest.raises(ValueError, match="embed and text_encoder go together"):
        prepare_dataset(tmp_path / "src", tmp_path / "other", OPTIONS, embed=embed)
    with pytest.raises(ValueError, match="other inputs or options"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", OPTIONS, embed, {**encoder, "weights": "ffff0000"})


def test_prepare_resumes_without_redoing_finished_chunks(tmp_path, monkeypatch):
    make_bad_data_folder(tmp_path / "src")
    options = PrepareOptions(**{**OPTIONS.__dict__, "chunk_size": 3})
    prepare_dataset(tmp_path / "src", tmp_path / "full", options)
    prepare_dataset(tmp_path / "src", tmp_path / "out", options)
    # Interrupted during the last chunk: its record was never written, its shards may be half written.
    records = sorted((tmp_path / "out" / "state").glob("chunk_*.json"))
    last = json.loads(records[-1].read_text())
    records[-1].unlink()
    for shard in last["shards"]:
        (tmp_path / "out" / shard["path"]).write_bytes(b"half a shard")
    (tmp_path / "out" / "index.json").unlink()

    processed = []
    real = prepare_module.process_task
    monkeypatch.setattr(prepare_module, "process_task", lambda task, options: processed.append(task) or real(task, options))
    report = prepare_dataset(tmp_path / "src", tmp_path / "out", options)
    assert [task.number for task in processed] == [last["chunk"]]
    assert (tmp_path / "out" / "index.json").read_text() == (tmp_path / "full" / "index.json").read_text()
    assert (tmp_path / "out" / "report.json").read_text() == (tmp_path / "full" / "report.json").read_text()
    assert report.kept == len(read_output(tmp_path / "out"))

    # A finished run re-run does nothing; other options into the same folder are refused.
    processed.clear()
    prepare_dataset(tmp_path / "src", tmp_path / "out", options)
    assert processed == []
    with pytest.raises(ValueError, match="other inputs or options"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", PrepareOptions(**{**options.__dict__, "jpeg_quality": 80}))


@pytest.mark.slow  # about 10 s: each spawned worker imports torch
def test_parallel_processes_give_the_same_output(tmp_path):
    make_bad_data_folder(tmp_path / "src")
    serial = PrepareOptions(**{**OPTIONS.__dict__, "chunk_size": 4})
    parallel = PrepareOptions(**{**serial.__dict__, "processes": 2})
    prepare_dataset(tmp_path / "src", tmp_path / "serial", serial)
    prepare_dataset(tmp_path / "src", tmp_path / "parallel", parallel)
    for name in ("index.json", "report.json"):
        assert (tmp_path / "serial" / name).read_text() == (tmp_path / "parallel" / name).read_text()
    index = json.loads((tmp_path / "serial" / "index.json").read_text())
    for shard in index["shards"]:
        assert (tmp_path / "serial" / shard["path"]).read_bytes() == (tmp_path / "parallel" / shard["path"]).read_bytes()


def test_perceptual_hash_matches_the_same_pixels_and_separates_pictures():
    picture = Image.fromarray(pattern(60, 64, 64))
    for format in ("PNG", "BMP", "TIFF"):
        assert perceptual_hash(Image.open(io.BytesIO(encoded(picture, format)))) == perceptual_hash(picture)
    hashes = {perceptual_hash(Image.fromarray(pattern(seed, 64, 64))) for seed in range(50)}
    assert len(hashes) == 50


def test_source_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("no images here")
    with pytest.raises(EmptyDatasetError, match="holds no images"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", OPTIONS)


def test_buckets_used_are_those_of_the_options(tmp_path):
    make_bad_data_folder(tmp_path / "src")
    prepare_dataset(tmp_path / "src", tmp_path / "out", OPTIONS)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert {parse_bucket(s["bucket"]) for s in index["shards"]} <= set(make_buckets(64, 16))


def test_output_folder_inside_the_source_is_not_read_as_input(tmp_path):
    good, _ = make_bad_data_folder(tmp_path / "src")
    first = prepare_dataset(tmp_path / "src", tmp_path / "src" / "prepared", OPTIONS)
    again = prepare_dataset(tmp_path / "src", tmp_path / "src" / "prepared", OPTIONS)
    assert first.kept == again.kept == len(good)


def test_held_out_samples_are_kept_apart_and_readable(tmp_path):
    images = image_folder(tmp_path / "images", 30)
    options = PrepareOptions(**{**SMALL.__dict__, "heldout": 6, "heldout_share": 0.5})
    report = prepare_dataset(images, tmp_path / "out", options)
    assert report.kept == 30 and report.heldout == 6 and "6 of them held out" in report.summary()
    training, held_out = read_output(tmp_path / "out"), read_output(tmp_path / "out", "heldout")
    assert len(held_out) == 6 and not set(training) & set(held_out)
    assert set(training) | set(held_out) == {p.name for p in images.glob("*.jpg")}
    # The training stream never reads a held-out sample.
    def pixels(sample: TarSample) -> bytes:
        return np.asarray(Image.open(io.BytesIO(sample.members["jpg"])).convert("RGB")).tobytes()

    stream = ShardStream(str(tmp_path / "out"), 2, partitions=1, num_workers=0)
    streamed = {image.permute(1, 2, 0).numpy().tobytes()
                for _, batch in zip(range(len(stream)), stream.batches()) for image in batch.images}
    assert len(streamed) == 2 * len(stream) and streamed <= {pixels(sample) for sample in training.values()}
    assert not streamed & {pixels(sample) for sample in held_out.values()}
    # The tokenizer's captions are the training captions, none held out.
    captions = (tmp_path / "out" / "captions.txt").read_text().splitlines()
    assert read_captions(str(tmp_path / "out")) == captions
    assert Counter(captions) == Counter(s.members["txt"].decode() for s in training.values())

    grid = read_held_out(str(tmp_path / "out"), 16)
    assert grid.images.shape == (6, 3, 16, 16) and grid.images.dtype == torch.uint8
    by_key = {s.key: s for s in held_out.values()}
    assert grid.captions == [by_key[key].members["txt"].decode() for key in grid.keys]
    first = np.asarray(Image.open(io.BytesIO(by_key[grid.keys[0]].members["jpg"])).convert("RGB"))
    side = min(first.shape[:2])  # centre-cropped to a square, then resized
    top, left = (first.shape[0] - side) // 2, (first.shape[1] - side) // 2
    expected = Image.fromarray(first[top:top + side, left:left + side]).resize((16, 16), Image.Resampling.LANCZOS)
    assert np.abs(grid.images[0].permute(1, 2, 0).numpy().astype(int) - np.asarray(expected)).max() <= 2
    assert -1 <= grid.floats().min() < grid.floats().max() <= 1
    assert read_held_out(str(tmp_path / "out"), 16, count=4).keys == grid.keys[:4]

    # The choice depends on the inputs' names alone: another split of the work holds out the same images.
    other = PrepareOptions(**{**options.__dict__, "chunk_size": 1000})
    prepare_dataset(images, tmp_path / "other", other)
    assert set(read_output(tmp_path / "other", "heldout")) == set(held_out)


def test_small_folder_holds_nothing_out_by_default_and_captions_are_bounded(tmp_path):
    images = image_folder(tmp_path / "images", 40)  # 1% of 40 inputs is none
    prepare_dataset(images, tmp_path / "out", PrepareOptions(**{**SMALL.__dict__, "captions": 7}))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["heldout"] == [] and index["samples"] == 40
    assert len(read_held_out(str(tmp_path / "out"), 16).captions) == 0
    assert len(read_captions(str(tmp_path / "out"))) == 7
    with pytest.raises(ValueError, match="heldout_share"):
        prepare_dataset(images, tmp_path / "bad", PrepareOptions(**{**SMALL.__dict__, "heldout_share": 2.0}))


def test_tar_and_parquet_inputs_are_held_out_by_name(tmp_path):
    """Held-out inputs are chosen before anything is read but names: the names must be those samples get."""
    (tmp_path / "tars").mkdir()
    img2dataset_shard(tmp_path / "tars" / "00000.tar", [(f"00000{i}", jpeg(70 + i), f"tar {i}") for i in range(6)])
    img2dataset_shard(tmp_path / "tars" / "00001.tar", [(f"10000{i}", jpeg(80 + i), f"tar {i}") for i in range(6)])
    table = pa.table({"image": [jpeg(90 + i) for i in range(12)], "caption": [f"row {i}" for i in range(12)]})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=5)
    for source in (tmp_path / "tars", tmp_path / "data.parquet"):
        options = PrepareOptions(**{**OPTIONS.__dict__, "heldout": 4, "heldout_share": 0.5})
        report = prepare_dataset(source, tmp_path / f"out_{source.stem}", options)
        assert report.kept == 12 and report.heldout == 4


def test_small_encoder_learns_its_tokenizer_from_a_prepared_folder(tmp_path):
    prepare_dataset(image_folder(tmp_path / "images", 12), tmp_path / "out", SMALL)
    config = TextConfig(width=32, depth=1, heads=2)
    tower = TextTower.build(config, read_captions(str(tmp_path / "out")), run_dir=tmp_path / "run")
    tokenizer = tower.tokenizer
    assert tokenizer.tokenize("a photo of a green square") == ["Ġa", "Ġphoto", "Ġof", "Ġa", "Ġgreen", "Ġsquare"]
    unseen = tokenizer("a zebra").input_ids[:-1]
    assert len(unseen) > 2 and tokenizer.unk_token_id not in unseen
    again = TextTower.load(config, tmp_path / "run")
    prompts = ["a photo of a zebra", "a blue circle", ""]
    assert again.tokenizer(prompts).input_ids == tokenizer(prompts).input_ids


def test_an_index_without_captions_is_a_clear_error(tmp_path):
    prepare_dataset(image_folder(tmp_path / "images", 4), tmp_path / "out", SMALL)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    del index["captions"], index["heldout"]  # as an earlier pixrun wrote it
    (tmp_path / "out" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="prepare it again"):
        read_captions(str(tmp_path / "out"))
    assert read_held_out(str(tmp_path / "out"), 16).images.shape == (0, 3, 16, 16)
