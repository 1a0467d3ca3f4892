import io
import itertools
import json
import shutil
import tarfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

import pixrun.data.stream as stream_module
from pixrun.config import ConfigError, load_config
from pixrun.data.prepare import PrepareOptions, prepare_dataset
from pixrun.data.shards import ShardSource
from pixrun.data.stream import INDEX_FORMAT, EmptyDatasetError, PlanError, ShardStream, read_tar_samples
from pixrun.text import TextConfig, TextTower
from tests.helpers import tiny_t5

SIZES = {"16x16": (16, 16), "32x16": (32, 16)}
ENCODER = {"encoder": "org/t5", "encoder_class": "auto", "dtype": "bfloat16", "max_tokens": 32, "clean": "basic",
           "class": "T5EncoderModel", "weights": "0123abcd"}


def write_dataset(root, layout, embeddings=False, text_encoder=None):
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
    index = {"format": INDEX_FORMAT, "embeddings": embeddings, "text_encoder": text_encoder,
             "samples": sum(c for _, c in layout), "shards": shards}
    (root / "index.json").write_text(json.dumps(index))
    return root


# Shards of uneven sizes: with 4 partitions, 16x16 gives 4 batches of 8 an epoch, 32x16 gives 3; the rest waits.
LAYOUT = [("16x16", 6), ("32x16", 5), ("16x16", 4), ("16x16", 7), ("32x16", 6), ("16x16", 5), ("32x16", 4),
          ("16x16", 6), ("32x16", 7), ("16x16", 3), ("32x16", 5), ("16x16", 4)]
# Shards that fill 4 partitions exactly: every shard is read every epoch.
EVEN = [("16x16", 4)] * 8 + [("32x16", 6)] * 4
EVERYTHING = {f"{b}_{n:06d}_{p:06d}" for n, (b, count) in enumerate(LAYOUT) for p in range(count)}


def make_stream(root, **options):
    settings = {"global_batch_size": 8, "seed": 3, "partitions": 4, "num_workers": 0, **options}
    return ShardStream(str(root), **settings)


def take(stream, steps, start=0):
    return list(itertools.islice(stream.batches(start), steps))


def global_batches(root, world_size, steps, start=0, **options):
    """Each step's global batch: the keys (the captions) of the ranks' rows, concatenated in rank order."""
    ranks = [make_stream(root, rank=r, world_size=world_size, **options) for r in range(world_size)]
    per_rank = [take(stream, steps, start) for stream in ranks]
    return [[key for batch in step for key in batch.captions] for step in zip(*per_rank)]


def test_one_two_and_four_ranks_see_the_same_global_batches(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    # 35 samples of 16x16 give each of the 4 partitions 8 (4 batches of 2 rows), 27 of 32x16 give 6 (3 batches)
    assert len(make_stream(root)) == 7
    one = global_batches(root, 1, 14)
    assert global_batches(root, 2, 14) == one and global_batches(root, 4, 14) == one
    for epoch in (one[:7], one[7:]):
        keys = [key for step in epoch for key in step]
        assert len(keys) == len(set(keys)) == 56 and set(keys) <= EVERYTHING
        assert all(len({key.split("_")[0] for key in step}) == 1 for step in epoch)  # one bucket a step
    assert one[:7] != one[7:]  # another shuffle each epoch
    for batch in take(make_stream(root, rank=1, world_size=2), 5):
        width, height = batch.bucket
        assert batch.images.shape == (4, 3, height, width) and batch.images.dtype == torch.uint8
        assert batch.embeddings is None and batch.skipped == {}
        assert batch.rows == [0, 1, 2, 3]


def test_fewer_shards_than_partitions_train_in_the_same_order_on_any_world_size(tmp_path):
    root = write_dataset(tmp_path / "data", [("16x16", 30)] * 3)
    # 90 samples in 3 shards: 4 partitions of 22 or 23 consecutive samples, cut inside shards; 11 batches of 8
    assert len(make_stream(root)) == 11
    one = global_batches(root, 1, 22)
    assert global_batches(root, 2, 22) == one and global_batches(root, 4, 22) == one
    assert len({key for step in one[:11] for key in step}) == 88 and one[:11] != one[11:]
    # partition p holds samples [22.5 p, 22.5 (p + 1)): rank p of 4 reads only the shards they lie in
    read = [{key.split("_")[1] for batch in take(make_stream(root, rank=r, world_size=4), 11) for key in batch.captions}
            for r in range(4)]
    assert read == [{"000000"}, {"000000", "000001"}, {"000001", "000002"}, {"000002"}]


def test_a_rank_serves_its_partitions_rows_and_reads_only_their_shards(tmp_path):
    root = write_dataset(tmp_path / "data", EVEN)
    shards = [{key.split("_")[1] for batch in take(make_stream(root, rank=r, world_size=2), 7) for key in batch.captions}
              for r in range(2)]
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 6
    # Rank 0's rows are global rows 0-3, rank 1's are 4-7: partitions 0-1 and 2-3 of the four.
    everyone = global_batches(root, 4, 7)
    for step, (first, second) in enumerate(zip(*[take(make_stream(root, rank=r, world_size=2), 7) for r in range(2)])):
        assert first.captions == everyone[step][:4] and second.captions == everyone[step][4:]


def test_each_shard_is_read_once_per_rank_and_epoch_with_two_workers(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "data", EVEN)
    log = tmp_path / "opened.txt"
    real = stream_module.gopen

    def counting_gopen(url, mode="rb"):
        if url.endswith(".tar"):
            with open(log, "a") as file:
                file.write(f"{url}\n")
        return real(url, mode)

    monkeypatch.setattr(stream_module, "gopen", counting_gopen)
    opened = []
    for rank in range(2):
        log.write_text("")
        stream = make_stream(root, rank=rank, world_size=2, num_workers=2)
        batches = stream.batches()
        for _ in range(2 * len(stream)):  # two epochs
            next(batches)
        batches.close()  # stops the workers
        opened.append(Counter(log.read_text().split()))
    assert not set(opened[0]) & set(opened[1]) and len(opened[0]) + len(opened[1]) == len(EVEN)
    # Twice each, and a third time only when a worker had run ahead into the third epoch (it prefetches up to two
    # pieces); every worker reading every shard of its rank would make it 4 or more.
    assert all(count in (2, 3) for counts in opened for count in counts.values())


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_batches_are_the_same_for_any_number_of_workers(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    runs = [take(make_stream(root, rank=1, world_size=2, num_workers=n), 10) for n in (0, 2, 3)]
    for batches in runs[1:]:
        assert [b.captions for b in batches] == [b.captions for b in runs[0]]
        assert all(torch.equal(b.images, a.images) and b.images.dtype == torch.uint8 for a, b in zip(runs[0], batches))


@pytest.mark.parametrize("stop", [1, 4, 7])
@pytest.mark.parametrize("world_size", [1, 4])
def test_resume_on_another_world_size_continues_the_same_global_order(tmp_path, stop, world_size):
    root = write_dataset(tmp_path / "data", LAYOUT)
    uninterrupted = global_batches(root, 2, 10)
    first_run = [make_stream(root, rank=r, world_size=2) for r in range(2)]
    taken = [[key for batch in step for key in batch.captions] for step in zip(*[take(s, stop) for s in first_run])]
    assert taken == uninterrupted[:stop]
    state = json.loads(json.dumps(first_run[0].state_dict()))  # saved as JSON with the checkpoint
    resumed = [make_stream(root, rank=r, world_size=world_size) for r in range(world_size)]
    for stream in resumed:
        stream.load_state_dict(state)
    rest = [[key for batch in step for key in batch.captions] for step in zip(*[take(s, 10 - stop, stop) for s in resumed])]
    assert rest == uninterrupted[stop:]


def test_starting_mid_epoch_reads_only_the_shards_it_uses(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "data", EVEN)
    opened = []
    real = stream_module.gopen
    monkeypatch.setattr(stream_module, "gopen", lambda url, mode="rb": opened.append(url) or real(url, mode))
    stream = make_stream(root, shuffle_shards=1)
    opened.clear()  # the index
    (batch,) = take(stream, 1, start=len(stream) - 1)
    used = {f"{root}/shards/{key.split('_')[0]}/{key.split('_')[1]}.tar" for key in batch.captions}
    assert sorted(opened) == sorted(used)
    assert len(opened) < len(EVEN) // 2


def test_a_state_of_another_plan_is_refused_another_world_size_is_not(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    state = make_stream(root, world_size=2).state_dict()
    make_stream(root, world_size=4).load_state_dict(state)
    for change, name in (({"partitions": 2}, "partitions=4"), ({"global_batch_size": 16}, "global_batch_size=8"),
                         ({"seed": 4}, "seed=3"), ({"shuffle_shards": 2}, "shuffle_shards=4")):
        with pytest.raises(PlanError, match=f"saved under {name}"):
            make_stream(root, **change).load_state_dict(state)


def test_partitions_must_split_over_the_ranks_and_the_batch(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    with pytest.raises(PlanError, match=r"data.partitions \(4\) must be a multiple of the world size \(3\)"):
        make_stream(root, world_size=3)
    with pytest.raises(PlanError, match=r"global batch \(6\) must be a multiple of data.partitions \(4\)"):
        make_stream(root, global_batch_size=6)


def test_data_config_checks_partitions_against_every_stage_batch():
    def staged(second_batch: int, *data):
        stages = ("stages=[{until_step: 4, resolution: 16, batch_size: 8}, "
                  f"{{until_step: 8, resolution: 16, batch_size: {second_batch}}}]")
        return load_config(None, ["data.resolution=16", "model.patch_size=8", "train.steps=8", stages, *data])

    shards = ["data.source=shards", "data.shards=/data"]
    assert staged(4, *shards, "data.partitions=4").data.partitions == 4
    staged(6, "data.partitions=4")  # the shapes world has no partitions
    with pytest.raises(ConfigError, match=r"data.partitions \(4\) must divide the global batch \(6\)"):
        staged(6, *shards, "data.partitions=4")
    with pytest.raises(ConfigError, match="at least 1"):
        staged(8, *shards, "data.partitions=0")


def test_embeddings_of_another_text_encoder_are_refused(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT, embeddings=True, text_encoder=ENCODER)
    local_copy = {**ENCODER, "encoder": "/models/t5", "encoder_class": "T5EncoderModel"}
    assert take(make_stream(root, text_encoder=local_copy), 1)[0].embeddings is not None  # the same weights
    make_stream(root, text_encoder=None)  # a run that does not use the embeddings
    for change in ({"weights": "ffff0000"}, {"max_tokens": 256}, {"dtype": "float32"}):
        with pytest.raises(PlanError, match=f"training uses 'org/t5' .*{next(iter(change))}="):
            make_stream(root, text_encoder={**ENCODER, **change})
    unrecorded = write_dataset(tmp_path / "old", LAYOUT, embeddings=True)
    with pytest.raises(PlanError, match="does not record which encoder"):
        make_stream(unrecorded, text_encoder=ENCODER)


def test_the_encoder_identity_matches_a_copy_of_the_weights_under_another_name(tmp_path):
    identity = lambda path: TextTower.build(TextConfig(encoder=str(path), dtype="float32"), []).identity()
    original = tiny_t5(tmp_path / "hub-name", seed=0)
    copy = shutil.copytree(original, tmp_path / "local" / "copy")
    retrained = tiny_t5(tmp_path / "retrained", seed=1)
    root = write_dataset(tmp_path / "data", LAYOUT, embeddings=True, text_encoder=identity(original))
    make_stream(root, text_encoder=identity(copy))
    with pytest.raises(PlanError, match="weights="):
        make_stream(root, text_encoder=identity(retrained))


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
    layout = [("16x16", 4)] * 4
    root = write_dataset(tmp_path / "data", layout)
    corrupt(root / "shards/16x16/000000.tar", "16x16_000000_000003.jpg", "data")
    corrupt(root / "shards/16x16/000001.tar", "16x16_000001_000002.jpg", "header")
    without_member(root / "shards/16x16/000002.tar", "16x16_000002_000001.txt")
    bad = {"16x16_000000_000003", "16x16_000001_000002", "16x16_000002_000001"}
    stream = make_stream(root, global_batch_size=4)
    batches = take(stream, len(stream))
    keys = [key for batch in batches for key in batch.captions]
    assert sorted(keys) == sorted({f"16x16_{n:06d}_{p:06d}" for n in range(4) for p in range(4)} - bad)
    assert stream.skipped == {"unreadable image": 1, "missing caption": 1, "missing image": 1}
    assert stream.state_dict()["skipped"] == stream.skipped
    assert "16x16/000001.tar" in caplog.text and "bad header" in caplog.text
    assert all(len(b.images) == len(b.captions) == len(b.rows) and b.rows == sorted(b.rows) for b in batches)
    assert sum(len(b) for b in batches) == 13


def test_truncated_shard_loses_only_its_tail(tmp_path):
    root = write_dataset(tmp_path / "data", [("16x16", 8)])
    path = root / "shards/16x16/000000.tar"
    with tarfile.open(path) as tar:
        cut = tar.getmember("16x16_000000_000006.jpg").offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])
    stream = make_stream(root, global_batch_size=4, partitions=1)
    keys = [key for batch in take(stream, len(stream)) for key in batch.captions]
    assert sorted(keys) == [f"16x16_000000_{p:06d}" for p in range(6)]
    assert stream.skipped == {"missing from shard": 2}


def test_empty_data_set_is_a_clear_error(tmp_path):
    root = write_dataset(tmp_path / "empty", [])
    with pytest.raises(EmptyDatasetError, match="yields no batch"):
        make_stream(root)
    too_few = write_dataset(tmp_path / "few", [("16x16", 3), ("32x16", 5)])
    with pytest.raises(EmptyDatasetError, match="a global batch takes 8 samples.*its largest bucket holds 5"):
        make_stream(too_few)


def test_data_set_whose_every_sample_is_bad_is_a_clear_error(tmp_path):
    root = write_dataset(tmp_path / "data", [("16x16", 2)])
    (root / "shards/16x16/000000.tar").write_bytes(b"\x01" * 5000)
    stream = make_stream(root, global_batch_size=2, partitions=1)
    with pytest.raises(EmptyDatasetError, match="every sample of epoch 0 was skipped"):
        take(stream, 3)


def test_shards_through_a_pipe_url(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    local = [b.captions for b in take(make_stream(root), 5)]
    piped = make_stream(root, shard_url=f"pipe:cat {root}/{{path}}")
    assert [b.captions for b in take(piped, 5)] == local


def test_shard_whose_pipe_fails_is_skipped_and_counted(tmp_path):
    root = write_dataset(tmp_path / "data", EVEN)
    (root / "shards/32x16/000009.tar").unlink()  # `cat` exits with an error for this one
    stream = make_stream(root, shard_url=f"pipe:cat {root}/{{path}} 2>/dev/null")
    keys = {key for batch in take(stream, len(stream)) for key in batch.captions}
    everything = {f"{b}_{n:06d}_{p:06d}" for n, (b, count) in enumerate(EVEN) for p in range(count)}
    assert keys == everything - {f"32x16_000009_{p:06d}" for p in range(6)}
    assert stream.skipped == {"missing from shard": 6}


def test_prepared_folder_streams_with_its_captions_and_embeddings(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for number in range(8):
        width, height = (96, 64) if number % 2 else (64, 64)
        coarse = np.random.default_rng(number).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height)).save(source / f"{number}.png")
        (source / f"{number}.txt").write_text(f"caption {number}")
    options = PrepareOptions(resolution=64, patch_size=16, min_side=32, processes=1)
    prepare_dataset(source, tmp_path / "out", options, embed=lambda caps: [np.ones((2, 4)) * len(c) for c in caps],
                    text_encoder=ENCODER)
    stream = ShardStream(str(tmp_path / "out"), 2, partitions=1, num_workers=0, text_encoder=ENCODER)
    batches = take(stream, len(stream))
    assert sorted(c for b in batches for c in b.captions) == [f"caption {n}" for n in range(8)]
    for batch in batches:
        assert batch.bucket in ((64, 64), (80, 48))
        assert [e.dtype for e in batch.embeddings] == [torch.float16] * 2
        assert all(e.shape == (2, 4) for e in batch.embeddings)
    with pytest.raises(PlanError, match="weights="):
        ShardStream(str(tmp_path / "out"), 2, partitions=1, text_encoder={**ENCODER, "weights": "other"})


def stages(*plan):
    return [SimpleNamespace(until_step=until, batch_size=batch, shards=shards) for until, batch, shards in plan]


def test_shard_source_follows_the_step_and_converts_on_the_device(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT)
    plan = stages((4, 8, None), (20, 4, None))
    make = lambda: ShardSource(str(root), 3, 1, 2, 0, 4, None, stages=plan, partitions=4)
    source = make()
    straight = [source.batch(step, plan[0], 0) for step in range(4)]
    straight += [source.batch(step, plan[1], 4) for step in range(4, 8)]
    assert [b.images.shape[0] for b in straight] == [4] * 4 + [2] * 4
    assert [b.captions for b in straight[:4]] == [b.captions for b in take(make_stream(root, rank=1, world_size=2), 4)]
    second_stage = make_stream(root, global_batch_size=4, seed=7, rank=1, world_size=2)
    assert [b.captions for b in straight[4:]] == [b.captions for b in take(second_stage, 4)]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(source.state_dict())))
    assert [resumed.batch(step, plan[1], 4).captions for step in (6, 7)] == [b.captions for b in straight[6:]]
    images = straight[0].images_on("cpu")
    assert images.dtype == torch.float32 and torch.equal(images, straight[0].images.float() / 127.5 - 1)
    assert images.min() >= -1 and images.max() <= 1


def test_shard_source_refuses_a_plan_that_cannot_work_before_the_first_step(tmp_path):
    root = write_dataset(tmp_path / "data", LAYOUT, embeddings=True, text_encoder=ENCODER)
    other = write_dataset(tmp_path / "other", LAYOUT, embeddings=True, text_encoder={**ENCODER, "weights": "x"})
    with pytest.raises(ConfigError, match="must be a multiple of the world size"):
        ShardSource(str(root), 0, 0, 3, 0, 4, None, stages=stages((4, 12, None)), partitions=4)
    with pytest.raises(ConfigError, match=f"{other}.*made by 'org/t5' \\(weights='x'\\)"):  # the second stage's
        ShardSource(str(root), 0, 0, 1, 0, 4, None, stages=stages((4, 8, None), (8, 8, str(other))), partitions=4,
                    text_encoder=ENCODER)
    state = ShardSource(str(root), 0, 0, 1, 0, 4, None, stages=stages((4, 8, None)), partitions=4)
    state.batch(0, stages((4, 8, None))[0], 0)
    with pytest.raises(ConfigError, match="saved under partitions=4"):
        ShardSource(str(root), 0, 0, 1, 0, 4, None, stages=stages((4, 8, None)), partitions=2).load_state_dict(
            state.state_dict())


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

