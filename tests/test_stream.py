import io
import itertools
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from pixrun.data.prepare import PrepareOptions, prepare_dataset
from pixrun.data.stream import INDEX_FORMAT, EmptyDatasetError, ShardStream, read_tar_samples

SIZES = {"16x16": (16, 16), "32x16": (32, 16)}


def write_dataset(root, layout, embeddings=False):
    """Shards as prepare writes them; layout: (bucket, sample count) per shard. Captions are the keys."""
    root.mkdir(exist_ok=True)
    shards = []
    for number, (bucket, count) in enumerate(layout):
        path = f"shards/{bucket}/{number:06d}.tar"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        with TarWriter(str(root / path), encoder=False) as writer:
            for place in range(count):
                key = f"{bucket}_{number:06d}_{place:06d}"
                pixels = np.full((*SIZES[bucket][::-1], 3), (number * 37 + place * 11) % 256, dtype=np.uint8)
                image = io.BytesIO()
                Image.fromarray(pixels).save(image, "JPEG")
                sample = {"__key__": key, "jpg": image.getvalue(), "txt": key.encode(), "json": b"{}"}
                if embeddings:
                    array = io.BytesIO()
                    np.save(array, np.full((2, 3), place, dtype=np.float16))
                    sample["emb.npy"] = array.getvalue()
                writer.write(sample)
        shards.append({"path": path, "bucket": bucket, "count": count})
    index = {"format": INDEX_FORMAT, "embeddings": embeddings, "samples": sum(c for _, c in layout), "shards": shards}
    (root / "index.json").write_text(json.dumps(index))
    return root


LAYOUT = [("16x16", 12), ("32x16", 8), ("16x16", 8), ("32x16", 12), ("16x16", 4)]  # 24 and 20 per bucket


def epoch_keys(stream, epochs=1):
    return [batch.keys for batch in itertools.islice(stream, len(stream) * epochs)]


def test_epoch_across_two_ranks_covers_every_sample_once_in_single_bucket_batches(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    ranks = [ShardStream(str(root), batch_size=2, seed=3, rank=r, world_size=2, num_workers=0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 11  # 24 // 4 + 20 // 4
    per_rank = [list(itertools.islice(stream, len(stream))) for stream in ranks]
    seen = Counter()
    for first, second in zip(*per_rank):
        assert first.bucket == second.bucket  # every rank works on the same bucket at the same step
        for batch in (first, second):
            width, height = batch.bucket
            assert batch.images.shape == (2, 3, height, width) and batch.images.dtype == torch.float32
            assert -1 <= batch.images.min() and batch.images.max() <= 1
            assert batch.captions == batch.keys and batch.embeddings is None and batch.skipped == {}
            assert all(key.startswith(f"{width}x{height}_") for key in batch.keys)
            seen.update(batch.keys)
    everything = {f"{b}_{n:06d}_{p:06d}" for n, (b, count) in enumerate(LAYOUT) for p in range(count)}
    assert set(seen) == everything and set(seen.values()) == {1}


def test_remainders_are_dropped_not_repeated_and_differ_between_epochs(tmp_path):
    root = write_dataset(tmp_path / "data", [("16x16", 7), ("32x16", 6)])
    stream = ShardStream(str(root), batch_size=2, seed=0, rank=0, world_size=1, num_workers=0)
    assert len(stream) == 6
    first, second = epoch_keys(stream), epoch_keys(stream)
    for epoch in (first, second):
        keys = [key for batch in epoch for key in batch]
        assert len(keys) == len(set(keys)) == 12
    assert first != second  # another shuffle each epoch
    dropped = [{f"16x16_000000_{p:06d}" for p in range(7)} - {k for b in epoch for k in b} for epoch in (first, second)]
    assert all(len(d) == 1 for d in dropped)


def test_same_seed_same_order_other_seed_other_order(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    make = lambda seed: ShardStream(str(root), batch_size=2, seed=seed, num_workers=0)
    assert epoch_keys(make(5), 2) == epoch_keys(make(5), 2)
    assert epoch_keys(make(5)) != epoch_keys(make(6))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_order_does_not_depend_on_num_workers(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    orders = [
        epoch_keys(ShardStream(str(root), batch_size=2, seed=1, rank=1, world_size=2, num_workers=n), 2)
        for n in (0, 1, 3)
    ]
    assert orders[0] == orders[1] == orders[2]


@pytest.mark.parametrize("stop", [1, 6, 11, 15])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(tmp_path, stop):
    root = write_dataset(tmp_path / "data", LAYOUT)
    make = lambda: ShardStream(str(root), batch_size=2, seed=7, rank=0, world_size=2, num_workers=0)
    uninterrupted = epoch_keys(make(), 2)
    first_run = make()
    taken = [batch.keys for batch in itertools.islice(first_run, stop)]
    state = json.loads(json.dumps(first_run.state_dict()))  # saved as JSON with the checkpoint
    assert state["epoch"] * len(first_run) + state["batches_taken"] == stop
    resumed = make()
    resumed.load_state_dict(state)
    rest = [batch.keys for batch in itertools.islice(resumed, 2 * len(resumed) - stop)]
    assert taken + rest == uninterrupted


def test_resume_with_another_world_size_is_refused(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    state = ShardStream(str(root), batch_size=2, world_size=2, num_workers=0).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        ShardStream(str(root), batch_size=2, world_size=1, num_workers=0).load_state_dict(state)


def corrupt(path, member, how):
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = bytearray(path.read_bytes())
    if how == "data":
        data[info.offset_data + 20:info.offset_data + info.size - 2] = b"\x00" * (info.size - 22)
    else:
        data[info.offset_data - 512:info.offset_data - 412] = b"\xff" * 100
    path.write_bytes(bytes(data))


def without_member(path, member):
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers() if info.name != member]
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_inside_shards_are_skipped_and_counted(tmp_path, caplog):
    root = write_dataset(tmp_path / "data", LAYOUT)
    corrupt(root / "shards/16x16/000000.tar", "16x16_000000_000003.jpg", "data")
    corrupt(root / "shards/32x16/000001.tar", "32x16_000001_000005.jpg", "header")
    without_member(root / "shards/16x16/000002.tar", "16x16_000002_000001.txt")
    bad = {"16x16_000000_000003", "32x16_000001_000005", "16x16_000002_000001"}
    stream = ShardStream(str(root), batch_size=2, seed=2, num_workers=0)
    keys = [key for batch in epoch_keys(stream) for key in batch]
    everything = {f"{b}_{n:06d}_{p:06d}" for n, (b, count) in enumerate(LAYOUT) for p in range(count)}
    assert sorted(keys) == sorted(everything - bad)
    assert stream.skipped == {"unreadable image": 1, "missing caption": 1, "missing image": 1}
    assert stream.state_dict()["skipped"] == stream.skipped
    assert "32x16/000001.tar" in caplog.text and "bad header" in caplog.text


def test_truncated_shard_loses_only_its_tail(tmp_path):
    root = write_dataset(tmp_path / "data", [("16x16", 8)])
    path = root / "shards/16x16/000000.tar"
    with tarfile.open(path) as tar:
        cut = tar.getmember("16x16_000000_000006.jpg").offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])
    stream = ShardStream(str(root), batch_size=4, num_workers=0)
    keys = [key for batch in epoch_keys(stream) for key in batch]
    assert sorted(keys) == [f"16x16_000000_{p:06d}" for p in range(6)]
    assert stream.skipped == {"missing from shard": 2}


def test_empty_data_set_is_a_clear_error(tmp_path):
    root = write_dataset(tmp_path / "empty", [])
    with pytest.raises(EmptyDatasetError, match="yields no batch"):
        ShardStream(str(root), batch_size=2)
    small = write_dataset(tmp_path / "small", [("16x16", 3)])
    with pytest.raises(EmptyDatasetError, match="largest bucket holds 3 samples.*= 4"):
        ShardStream(str(small), batch_size=2, world_size=2)


def test_data_set_whose_every_sample_is_bad_is_a_clear_error(tmp_path):
    root = write_dataset(tmp_path / "data", [("16x16", 2)])
    (root / "shards/16x16/000000.tar").write_bytes(b"\x01" * 5000)
    stream = ShardStream(str(root), batch_size=2, num_workers=0)
    with pytest.raises(EmptyDatasetError, match="every sample of epoch 0 was skipped"):
        list(itertools.islice(stream, 3))


def test_shards_through_a_pipe_url(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    local = epoch_keys(ShardStream(str(root), batch_size=2, num_workers=0))
    piped = ShardStream(str(root), batch_size=2, num_workers=0, shard_url=f"pipe:cat {root}/{{path}}")
    assert epoch_keys(piped) == local


def test_shard_whose_pipe_fails_is_skipped_and_counted(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    (root / "shards/32x16/000001.tar").unlink()  # `cat` exits with an error for this one
    stream = ShardStream(str(root), batch_size=2, num_workers=0, shard_url=f"pipe:cat {root}/{{path}} 2>/dev/null")
    keys = {key for batch in epoch_keys(stream) for key in batch}
    lost = {f"32x16_000001_{p:06d}" for p in range(8)}
    everything = {f"{b}_{n:06d}_{p:06d}" for n, (b, count) in enumerate(LAYOUT) for p in range(count)}
    assert keys == everything - lost
    assert stream.skipped == {"missing from shard": 8}


def test_prepared_folder_streams_with_its_captions_and_embeddings(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for number in range(8):
        width, height = (96, 64) if number % 2 else (64, 64)
        coarse = np.random.default_rng(number).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height)).save(source / f"{number}.png")
        (source / f"{number}.txt").write_text(f"caption {number}")
    options = PrepareOptions(resolution=64, patch_size=16, min_side=32, processes=1)
    prepare_dataset(source, tmp_path / "out", options, embed=lambda caps: [np.ones((2, 4)) * len(c) for c in caps])
    stream = ShardStream(str(tmp_path / "out"), batch_size=2, num_workers=0)
    batches = list(itertools.islice(stream, len(stream)))
    assert sorted(c for b in batches for c in b.captions) == [f"caption {n}" for n in range(8)]
    for batch in batches:
        assert batch.bucket in ((64, 64), (80, 48))
        assert [e.dtype for e in batch.embeddings] == [torch.float16] * 2
        assert all(e.shape == (2, 4) for e in batch.embeddings)


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_reader_follows_long_member_names(tar_format):
    folder = "f" * 120
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for name in (f"{folder}/a_000000.jpg", f"{folder}/a_000000.txt", "b_000001.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    buffer.seek(0)
    samples = [(s.key, sorted(s.members)) for s in read_tar_samples(buffer, "long.tar")]
    assert samples == [(f"{folder}/a_000000", ["jpg", "txt"]), ("b_000001", ["txt"])]
