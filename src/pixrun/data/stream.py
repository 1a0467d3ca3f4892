"""Streaming loader over the WebDataset shards that pixrun.data.prepare writes.

    stream = ShardStream("data/prepared", batch_size=32, seed=0, rank=rank, world_size=world_size)
    for batch in stream:            # endless: epoch after epoch
        batch.images                # (B, 3, H, W) float in [-1, 1], every image of one bucket
        batch.captions, batch.keys  # lists of B strings
        batch.embeddings            # list of B float16 tensors (tokens, dim), or None when not prepared

The order of an epoch is planned up front from the index, identically on every rank: shards are shuffled
(seed, epoch), samples are shuffled within groups of `shuffle_shards` consecutive shards of one bucket, each
bucket's sequence is cut into global batches of batch_size × world_size (the remainder, fewer than that many,
waits for another epoch's shuffle), each rank takes one contiguous slice of every bucket (so a rank reads about
1/world_size of the shards), and the buckets' batches are interleaved in a seeded order that is the same on
every rank: at step k all ranks hold batches of the same bucket. DataLoader workers share the rank's batches
round-robin (worker w makes batches w, w + N, ...), which is the order the DataLoader hands them out in, so the
k-th batch of a rank does not depend on num_workers.

Resuming: `state_dict()` counts the batches the iterator has handed out (DataLoader prefetching does not
count). A training loop takes exactly one batch per step, so after step k (k batches taken since the start)
the state reads epoch * len(stream) + batches_taken == k (batches_taken runs from 1 to len(stream) within an
epoch). Save it in the checkpoint of step k, after the optimizer step that used batch k;
on resume, `load_state_dict(state)` before iterating makes the next batch the one step k + 1 of the first run
would have used: nothing repeated, nothing skipped. The plan depends on seed, batch_size, world_size, shuffle_shards and
the index, and loading a state saved under others is refused. Every rank is at the same position, so rank 0's
state resumes all ranks (the skipped counts in it are rank 0's).

A sample that cannot be used (corrupt image, truncated or corrupt tar member, missing caption) is left out of
its batch, counted in `skipped` (reason -> count; saved in the state) and logged. Its batch then holds fewer
than batch_size samples; when every sample of a batch is bad it holds none (len(batch) == 0) and the training
loop should skip that update but still count the step, so that ranks stay in step. An index without enough
samples for one batch, or an epoch in which every sample was bad, raises EmptyDatasetError.
"""

import io
import json
import logging
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from pixrun.data.buckets import parse_bucket

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "pixrun-shards-1"


class EmptyDatasetError(ValueError):
    pass


# Reading tar shards, shared with prepare (which reads img2dataset shards the same way).


@dataclass
class TarSample:
    key: str
    members: dict[str, bytes]  # extension ("jpg", "txt", "emb.npy") -> bytes


@dataclass
class TarDamage:
    where: str  # "shard.tar@offset"
    reason: str


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key runs up to the first dot of the file name, the rest is the extension."""
    folder, _, file = name.rpartition("/")
    stem, _, extension = file.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def read_exactly(stream, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def pax_path(data: bytes) -> str | None:
    """The "path" record of a PAX extended header ("LENGTH key=value\n" records); None if absent or garbled."""
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        try:
            length = int(data[position:space])
        except ValueError:
            return None
        if space < 0 or length <= 0:
            return None
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        position += length
    return None


def read_tar_samples(stream, name: str) -> Iterator[TarSample | TarDamage]:
    """Samples (consecutive members sharing a key) of a tar stream, and the damage found on the way.

    Reads block by block rather than through tarfile, which stops at the first bad header: a corrupt header is
    reported and stepped over to the next valid one, so one broken member costs only itself; a stream that ends
    inside a member is reported and ends the shard.
    """
    block_size = tarfile.BLOCKSIZE
    sample, long_name, offset, damaged_at = None, None, 0, None
    while True:
        header = read_exactly(stream, block_size)
        if len(header) < block_size:
            if header or damaged_at is not None:
                yield TarDamage(f"{name}@{offset if damaged_at is None else damaged_at}", "stream ends inside a header")
            break
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            if damaged_at is None and header != bytes(block_size):  # zero blocks: the end-of-archive padding
                damaged_at, long_name = offset, None
            offset += block_size
            continue
        if damaged_at is not None:
            yield TarDamage(f"{name}@{damaged_at}", f"bad header, skipped {offset - damaged_at} bytes")
            damaged_at = None
        padded = -(-info.size // block_size) * block_size
        data = read_exactly(stream, padded)
        if len(data) < padded:
            yield TarDamage(f"{name}@{offset}", f"stream ends inside member {long_name or info.name}")
            break
        offset += block_size + padded
        data = data[:info.size]
        if info.type == tarfile.XHDTYPE:
            long_name = pax_path(data)
            continue
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        member_name, long_name = long_name or info.name, None
        if info.type not in tarfile.REGULAR_TYPES:
            continue
        key, extension = split_member_name(member_name)
        if sample is None or sample.key != key:
            if sample is not None:
                yield sample
            sample = TarSample(key, {})
        sample.members[extension] = data
    if sample is not None:
        yield sample


# The loader.


@dataclass
class Shard:
    url: str
    bucket: tuple[int, int]  # (width, height)
    count: int


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W), float32 in [-1, 1]
    captions: list[str]
    keys: list[str]
    embeddings: list[torch.Tensor] | None
    bucket: tuple[int, int]  # (width, height)
    skipped: dict[str, int]  # reason -> samples left out of this batch

    def __len__(self) -> int:
        return len(self.captions)


def load_index(index: str, shard_url: str | None = None) -> tuple[list[Shard], bool]:
    """Shards listed by an index (a prepared folder, its index.json, or any URL gopen reads) and whether
    samples carry embeddings. Shard paths are relative to the index, or filled into shard_url ("{path}")."""
    location = index if index.endswith(".json") else posixpath.join(index, INDEX_NAME)
    with gopen(location, "rb") as stream:
        data = json.load(stream)
    if data.get("format") != INDEX_FORMAT:
        raise ValueError(f"{location} is not a pixrun shard index (format {data.get('format')!r})")
    base = posixpath.dirname(location)
    shards = [
        Shard(
            shard_url.format(path=entry["path"]) if shard_url else posixpath.join(base, entry["path"]),
            parse_bucket(entry["bucket"]),
            entry["count"],
        )
        for entry in data["shards"]
    ]
    return shards, bool(data.get("embeddings"))


def sample_number(key: str) -> int | None:
    """prepare writes keys "{bucket}_{chunk}_{number}": the number is the sample's place in its shard."""
    try:
        return int(key.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return None


def plan_epoch(
    shards: list[Shard], batch_size: int, world_size: int, rank: int, seed: int, epoch: int, shuffle_shards: int
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's batches of one epoch: (steps, B) global sample numbers and each step's shard bucket index.

    A sample's global number is its shard's offset in the index plus its place in the shard."""
    rng = np.random.default_rng([seed, epoch])
    counts = np.array([shard.count for shard in shards], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = rng.permutation(len(shards))
    buckets = sorted({shard.bucket for shard in shards})
    per_bucket = []
    for bucket in buckets:
        ids = [s for s in order if shards[s].bucket == bucket]
        groups = [ids[g:g + shuffle_shards] for g in range(0, len(ids), shuffle_shards)]
        sequence = np.concatenate(
            [rng.permutation(np.concatenate([offsets[s] + np.arange(counts[s]) for s in group])) for group in groups]
        )
        batches = len(sequence) // (batch_size * world_size)
        mine = sequence[rank * batches * batch_size:(rank + 1) * batches * batch_size]
        per_bucket.append(mine.reshape(batches, batch_size))
    labels = rng.permutation(np.repeat(np.arange(len(buckets)), [len(b) for b in per_bucket]))
    steps = np.empty((len(labels), batch_size), dtype=np.int64)
    for label, batches in enumerate(per_bucket):
        steps[labels == label] = batches
    return steps, labels


class EpochBatches(IterableDataset):
    """One rank's batches start.. of one planned epoch; in a DataLoader worker, only that worker's share."""

    def __init__(
        self, shards: list[Shard], steps: np.ndarray, labels: np.ndarray, buckets: list[tuple[int, int]], start: int
    ):
        self.shards, self.steps, self.labels, self.buckets, self.start = shards, steps, labels, buckets, start
        counts = np.array([shard.count for shard in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = range(self.start + worker, len(self.steps), workers)
        if not mine:
            return
        # Which samples of which shard this worker will use, to keep only those when a shard is read.
        wanted: dict[int, set[int]] = {}
        for step in mine:
            for number in self.steps[step]:
                shard = int(np.searchsorted(self.offsets, number, side="right")) - 1
                wanted.setdefault(shard, set()).add(int(number - self.offsets[shard]))
        held: dict[int, dict[int, TarSample]] = {}
        for step in mine:
            yield self.make_batch(step, wanted, held)

    def make_batch(self, step: int, wanted: dict[int, set[int]], held: dict[int, dict[int, TarSample]]) -> Batch:
        width, height = bucket = self.buckets[int(self.labels[step])]
        images, captions, keys, embeddings, skipped = [], [], [], [], Counter()
        for number in self.steps[step]:
            shard = int(np.searchsorted(self.offsets, number, side="right")) - 1
            if shard not in held:
                held[shard] = self.read_shard(shard, wanted[shard])
            place = int(number - self.offsets[shard])
            sample = held[shard].pop(place, None)
            wanted[shard].discard(place)
            if not wanted[shard]:
                del held[shard]
            if sample is None:
                reason, decoded = "missing from shard", None
                where = f"{self.shards[shard].url} sample {place}"
            else:
                reason, decoded = decode_sample(sample, (width, height))
                where = f"{self.shards[shard].url} {sample.key}"
            if decoded is None:
                skipped[reason] += 1
                log.warning("skipped %s: %s", where, reason)
                continue
            pixels, caption, embedding = decoded
            images.append(pixels)
            captions.append(caption)
            keys.append(sample.key)
            embeddings.append(embedding)
        # uint8 straight into the batch, scaled in place: no per-image float copies.
        stacked = torch.empty(len(images), 3, height, width)
        if get_worker_info() is not None:
            stacked.share_memory_()  # filled in place where the training process maps it: saves a copy per batch
        for row, pixels in enumerate(images):
            stacked[row].copy_(torch.from_numpy(pixels).permute(2, 0, 1))
        stacked.div_(127.5).sub_(1.0)
        has_embeddings = bool(embeddings) and all(e is not None for e in embeddings)
        return Batch(stacked, captions, keys, embeddings if has_embeddings else None, bucket, dict(skipped))

    def read_shard(self, shard: int, places: set[int]) -> dict[int, TarSample]:
        url = self.shards[shard].url
        kept = {}
        try:
            with gopen(url, "rb") as stream:
                for item in read_tar_samples(stream, url):
                    if isinstance(item, TarDamage):
                        log.warning("%s: %s", item.where, item.reason)
                        continue
                    place = sample_number(item.key)
                    if place in places:
                        kept[place] = item
        except (OSError, ValueError) as error:
            log.warning("%s: could not be read (%s)", url, error)
        return kept


def decode_sample(
    sample: TarSample, size: tuple[int, int]
) -> tuple[str, tuple[np.ndarray, str, torch.Tensor | None] | None]:
    """(reason, None) for a sample that cannot be used, else ("", (pixels, caption, embedding)), pixels being
    the (H, W, 3) uint8 RGB image."""
    members = sample.members
    if "txt" not in members:
        return "missing caption", None
    try:
        caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return "caption not UTF-8", None
    if "jpg" not in members:
        return "missing image", None
    try:
        with Image.open(io.BytesIO(members["jpg"])) as image:
            pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    except Exception:  # noqa: BLE001 - a damaged JPEG can make PIL raise more than OSError; never stop training
        return "unreadable image", None
    if (pixels.shape[1], pixels.shape[0]) != size:
        return "image size differs from its bucket", None
    embedding = None
    if "emb.npy" in members:
        try:
            embedding = torch.from_numpy(np.load(io.BytesIO(members["emb.npy"]), allow_pickle=False))
        except (OSError, ValueError, EOFError):
            return "unreadable embedding", None
    return "", (pixels, caption, embedding)


class ShardStream:
    """Endless, resumable stream of one rank's batches over prepared shards (see the module docstring)."""

    def __init__(
        self,
        index: str,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        shuffle_shards: int = 4,
        shard_url: str | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.index = str(index)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_shards = num_workers, shuffle_shards
        self.shards, self.has_embeddings = load_index(self.index, shard_url)
        self.buckets = sorted({shard.bucket for shard in self.shards})
        self.samples = sum(shard.count for shard in self.shards)
        self.epoch, self.batches_taken = 0, 0
        self.skipped: dict[str, int] = {}
        if len(self) == 0:
            largest = max((sum(s.count for s in self.shards if s.bucket == b) for b in self.buckets), default=0)
            raise EmptyDatasetError(
                f"{self.index} yields no batch: its largest bucket holds {largest} samples, "
                f"one step needs batch_size x world_size = {batch_size * world_size}"
            )

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank and in every epoch)."""
        return sum(
            sum(s.count for s in self.shards if s.bucket == bucket) // (self.batch_size * self.world_size)
            for bucket in self.buckets
        )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            if self.batches_taken < len(self):
                yield from self.rest_of_epoch()
            self.epoch, self.batches_taken = self.epoch + 1, 0

    def rest_of_epoch(self) -> Iterator[Batch]:
        steps, labels = plan_epoch(
            self.shards, self.batch_size, self.world_size, self.rank, self.seed, self.epoch, self.shuffle_shards
        )
        batches = EpochBatches(self.shards, steps, labels, self.buckets, self.batches_taken)
        loader = batches if self.num_workers == 0 else DataLoader(batches, batch_size=None, num_workers=self.num_workers)
        whole_epoch, good = self.batches_taken == 0, 0
        for batch in loader:
            # Counted before the batch is handed out: a state saved after using it marks it as used.
            self.batches_taken += 1
            for reason, count in batch.skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + count
            good += len(batch)
            yield batch
        if whole_epoch and good == 0:
            raise EmptyDatasetError(f"{self.index}: every sample of epoch {self.epoch} was skipped ({self.skipped})")

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "batches_taken": self.batches_taken, "skipped": dict(self.skipped),
            "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
            "shuffle_shards": self.shuffle_shards, "samples": self.samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was saved; the plan it counts in must be this stream's plan."""
        for name in ("seed", "batch_size", "world_size", "shuffle_shards", "samples"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"data position was saved with {name}={state[name]}, this stream has {getattr(self, name)}: "
                    "its batches would not continue that order"
                )
        self.epoch, self.batches_taken, self.skipped = state["epoch"], state["batches_taken"], dict(state["skipped"])
