"""Streaming loader over the WebDataset shards that pixrun.data.prepare writes.

    stream = ShardStream("data/prepared", global_batch_size=1024, seed=0, rank=rank, world_size=world_size)
    for batch in stream.batches(start=0):   # endless, from step `start` of the stream on
        batch.images                # (b, 3, H, W) uint8: this rank's rows of the global batch, one bucket
        batch.captions              # list of b strings
        batch.embeddings            # list of b float16 tensors (tokens, dim), or None when not prepared
        batch.latents               # list of b float16 tensors (C, H / factor, W / factor), when asked for

The plan, MosaicML Streaming's "canonical nodes": each bucket's samples, in index order (shard after shard), are
cut once and for all into K canonical partitions (`partitions`) of consecutive samples, as equal as can be; a
partition may begin or end inside a shard, so any set with at least one global batch per bucket trains, however
few shards it has. Every global batch B is one bucket's and takes B/K samples from every partition: partition p
fills rows [p·B/K, (p+1)·B/K) of it. Rank r of N serves the contiguous partitions [r·K/N, (r+1)·K/N), which are
rows [r·B/N, (r+1)·B/N), and reads only the shards they lie in (its 1/N of each bucket, plus at most a shard at
each end). So for any N that divides K, global batch k holds the same samples in the same rows.

An epoch, planned from the index alone: within each partition and bucket its pieces of shards are shuffled (seed,
epoch, partition, bucket), taken in groups of `shuffle_shards`, and the samples of each group shuffled; the
sequence is cut into pieces of B/K. A bucket gives as many global batches as its smallest partition gives pieces
(a bucket with fewer samples than one global batch gives none), and the buckets' batches are interleaved in an
order seeded by (seed, epoch): at step k every rank holds the same bucket. Each epoch has len(stream) steps, so
step k of the stream is step k % len(stream) of epoch k // len(stream): the position is the step, and
`batches(start)` starts anywhere, reading only the shuffle groups it still uses.

Reading: the rank's shards are dealt between its DataLoader workers (largest first, to the least loaded), so each
shard is read once per rank per epoch, by one worker, which keeps the samples the rank uses and drops them once
used. At every step each worker decodes the rows of the rank's batch that lie in its shards into a uint8 piece;
the DataLoader hands the pieces out round-robin, one per worker, and they are put back in row order: the batch
does not depend on num_workers. A rank holds about K/N × buckets × (shuffle_shards + 1) shards' samples at most.

Precomputed text embeddings: the index records the identity of the encoder that made them
(TextTower.identity()); a stream given the identity of the encoder training uses refuses another's. Everything
but the naming is compared (ENCODER_NAMING), so a local copy of a hub checkpoint matches its hub id.

Precomputed latents (`pixrun data prepare ... vae=ID`): the index records the autoencoder that made them
(Autoencoder.identity()). A stream given the identity of training's autoencoder carries each sample's latents and
refuses an index without latents or with another autoencoder's (all but its naming compared, AUTOENCODER_NAMING);
a sample whose latents are missing or not of its bucket's shape (C, H / factor, W / factor) is skipped. Without
one, latents in the shards are not read.

Resuming: the state to save is what the step cannot give, the skipped counts, plus a fingerprint of the plan
(seed, global batch, partitions, shuffle_shards, samples); loading a state of another plan is refused, a state
saved with another world size is not. Counts are per rank: a checkpoint holds rank 0's.

A sample that cannot be used (corrupt image, truncated or corrupt tar member, missing caption) is left out of
its batch, counted in `skipped` (reason -> count) and logged. Its batch then holds fewer rows; when every sample
of a rank's batch is bad it holds none (len(batch) == 0) and the training loop should skip that update but still
count the step, so that ranks stay in step. An index without enough samples for one batch, or an epoch in which
every sample was bad, raises EmptyDatasetError. Every error about the data is a pixrun.errors.DataError: one line,
exit code 2 from the command line.
"""

import heapq
import io
import itertools
import json
import logging
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from pixrun.data.buckets import parse_bucket
from pixrun.errors import DataError

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "pixrun-shards-1"
# How the text encoder was named (a hub id or a local path; "auto" or a class name): not compared, the weights'
# fingerprint and the resolved class are.
ENCODER_NAMING = ("encoder", "encoder_class", "subfolder", "tokenizer_subfolder")
# How the autoencoder was named (a hub id or a local path, a subfolder): not compared.
AUTOENCODER_NAMING = ("vae", "subfolder")


class EmptyDatasetError(DataError):
    """No batch to be had: too few samples, or every sample of an epoch bad."""


class PlanError(DataError):
    """The stream cannot be planned as asked (partitions against world size or batch, another text encoder's
    embeddings, latents missing or made by another autoencoder, a saved position of another plan)."""


# Reading tar shards, shared with prepare (which reads img2dataset shards the same way).


@dataclass
class TarSample:
    key: str
    members: dict[str, bytes]  # extension ("jpg", "txt", "emb.npy", "lat.npy") -> bytes


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


# The plan.


@dataclass
class Shard:
    url: str
    bucket: tuple[int, int]  # (width, height)
    count: int


@dataclass
class ShardIndex:
    location: str
    shards: list[Shard]
    embeddings: bool
    text_encoder: dict | None  # TextTower.identity() of the encoder that made the embeddings
    autoencoder: dict | None = None  # Autoencoder.identity() of the one that made the latents; None: no latents
    heldout: list[Shard] = field(default_factory=list)  # the samples kept out of training
    captions: str | None = None  # where the caption sample for the small encoder's tokenizer is; None: not written


@dataclass
class Batch:
    images: torch.Tensor  # (b, 3, H, W) uint8
    captions: list[str]
    embeddings: list[torch.Tensor] | None
    bucket: tuple[int, int]  # (width, height)
    skipped: dict[str, int]  # reason -> samples left out of this batch
    rows: list[int]  # each sample's row in the rank's share of the global batch (rows of skipped samples missing)
    latents: list[torch.Tensor] | None = None  # float16 (C, H / factor, W / factor) each, when the stream asks

    def __len__(self) -> int:
        return len(self.captions)


def read_index(index: str, shard_url: str | None = None) -> ShardIndex:
    """The index at `index` (a prepared folder, its index.json, or any URL gopen reads); DataError, one line, when it
    cannot be read or is not a pixrun shard index. The paths it lists are relative to it, or filled into shard_url
    ("{path}")."""
    location = index if index.endswith(".json") else posixpath.join(index, INDEX_NAME)
    try:
        with gopen(location, "rb") as stream:
            data = json.load(stream)
    except (OSError, ValueError) as error:
        raise DataError(f"{location} cannot be read as a pixrun shard index: {error}".splitlines()[0]) from None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise DataError(f"{location} is not a pixrun shard index (format {found!r}); make one with "
                        "`pixrun data prepare`")
    base = posixpath.dirname(location)

    def where(path: str) -> str:
        return shard_url.format(path=path) if shard_url else posixpath.join(base, path)

    try:
        shards, heldout = ([Shard(where(entry["path"]), parse_bucket(entry["bucket"]), int(entry["count"]))
                            for entry in data.get(kind, [])] for kind in ("shards", "heldout"))
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{location}: a shard entry is damaged ({error.__class__.__name__}: {error}); prepare the "
                        "folder again") from None
    captions = where(data["captions"]) if data.get("captions") else None
    return ShardIndex(location, shards, bool(data.get("embeddings")), data.get("text_encoder"),
                      data.get("autoencoder"), heldout, captions)


def differing(recorded: dict, expected: dict, naming: tuple[str, ...]) -> tuple[str, str] | None:
    """The fields (but the naming) in which two identities differ, as ("k=recorded, ...", "k=expected, ..."), or
    None when they agree."""
    keys = sorted(k for k in recorded.keys() | expected.keys() if k not in naming and recorded.get(k) != expected.get(k))
    if not keys:
        return None
    return (", ".join(f"{k}={recorded.get(k)!r}" for k in keys), ", ".join(f"{k}={expected.get(k)!r}" for k in keys))


def check_text_encoder(index: ShardIndex, expected: dict | None) -> None:
    """Refuse precomputed embeddings made by another encoder than `expected` (TextTower.identity(); None: the
    embeddings are not used). All but the naming is compared, so a local copy of a hub checkpoint matches."""
    if expected is None or not index.embeddings:
        return
    recorded = index.text_encoder
    if recorded is None:
        raise PlanError(f"{index.location} holds text embeddings but does not record which encoder made them; "
                        "prepare it again with `pixrun data prepare --text-encoder`")
    difference = differing(recorded, expected, ENCODER_NAMING)
    if difference:
        theirs, ours = difference
        raise PlanError(f"{index.location}: its text embeddings were made by {recorded.get('encoder')!r} ({theirs}), "
                        f"training uses {expected.get('encoder')!r} ({ours}); prepare the shards with this encoder")


def check_autoencoder(index: ShardIndex, expected: dict | None) -> None:
    """Refuse an index without latents, or with latents made by another autoencoder than `expected`
    (Autoencoder.identity(); None: prepared latents are not used). All but the naming is compared."""
    if expected is None:
        return
    recorded = index.autoencoder
    if recorded is None:
        raise PlanError(f"{index.location} holds no latents; prepare it with `pixrun data prepare ... "
                        f"vae={expected.get('vae')}`")
    difference = differing(recorded, expected, AUTOENCODER_NAMING)
    if difference:
        theirs, ours = difference
        raise PlanError(f"{index.location}: its latents were made by {recorded.get('vae')!r} ({theirs}), training "
                        f"uses {expected.get('vae')!r} ({ours}); prepare the shards with this autoencoder")


def deal(shards: list[Shard], ids: list[int], bins: int) -> dict[int, int]:
    """Shard id -> bin: each bucket's shards, largest first (list order among equals), go to the bin holding fewest
    of that bucket's samples so far (the lowest among equals), so every bin gets about as many of each bucket and
    consecutive shards (often neighbours in the source) land in different bins."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for shard in ids:
        by_bucket.setdefault(shards[shard].bucket, []).append(shard)
    owner = {}
    for bucket_ids in by_bucket.values():
        loads = [(0, b) for b in range(bins)]  # a heap of (samples so far, bin)
        for shard in sorted(bucket_ids, key=lambda s: -shards[s].count):
            held, b = heapq.heappop(loads)
            owner[shard] = b
            heapq.heappush(loads, (held + shards[shard].count, b))
    return owner


class Plan:
    """Every epoch's order, for every rank (see the module docstring): the same object on every rank and worker."""

    def __init__(self, shards: list[Shard], global_batch_size: int, partitions: int, seed: int, shuffle_shards: int):
        self.shards, self.seed, self.shuffle_shards = shards, seed, shuffle_shards
        self.per_partition = global_batch_size // partitions
        self.buckets = sorted({shard.bucket for shard in shards})
        counts = np.array([shard.count for shard in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        # (partition, bucket number) -> its pieces of shards: (shard id, first sample, end), global sample numbers
        self.members: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        held = np.zeros((partitions, len(self.buckets)), dtype=np.int64)
        for bucket, size in enumerate(self.buckets):
            ids = np.array([i for i, shard in enumerate(shards) if shard.bucket == size])
            ends = np.cumsum(counts[ids])  # the bucket's samples numbered 0 .. n-1, shard after shard
            starts = ends - counts[ids]
            cuts = np.arange(partitions + 1) * int(ends[-1]) // partitions
            for partition in range(partitions):
                low, high = int(cuts[partition]), int(cuts[partition + 1])
                held[partition, bucket] = high - low
                pieces = []
                for i in range(np.searchsorted(ends, low, side="right"), np.searchsorted(ends, high, side="left") + 1):
                    if i < len(ids) and max(low, starts[i]) < min(high, ends[i]):
                        shift = int(self.offsets[ids[i]] - starts[i])  # the bucket's numbering -> global numbers
                        pieces.append((int(ids[i]), shift + max(low, int(starts[i])), shift + min(high, int(ends[i]))))
                self.members[partition, bucket] = pieces
        self.batches = held.min(axis=0) // self.per_partition  # global batches of each bucket per epoch

    def __len__(self) -> int:
        return int(self.batches.sum())

    def schedule(self, epoch: int) -> np.ndarray:
        """The bucket number of each step of the epoch."""
        labels = np.repeat(np.arange(len(self.buckets)), self.batches)
        return np.random.default_rng([self.seed, epoch]).permutation(labels)

    def sequence(self, epoch: int, partition: int, bucket: int) -> np.ndarray:
        """The samples (global numbers: shard offset + place) that `partition` gives the batches of bucket number
        `bucket` (one that has batches) in `epoch`, B/K per batch."""
        rng = np.random.default_rng([self.seed, epoch, partition, bucket])
        pieces = self.members[partition, bucket]
        order = rng.permutation(len(pieces))
        groups = []
        for g in range(0, len(order), self.shuffle_shards):
            group = [np.arange(*pieces[i][1:]) for i in order[g:g + self.shuffle_shards]]
            groups.append(rng.permutation(np.concatenate(group)))
        sequence = np.concatenate(groups)
        return sequence[:self.batches[bucket] * self.per_partition]

    def shard_of(self, numbers: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, numbers, side="right") - 1

    def shards_of(self, partitions: range) -> list[int]:
        """The shards that `partitions` read (those of buckets that give batches), each once."""
        return list(dict.fromkeys(shard for (p, b), pieces in self.members.items()
                                  if p in partitions and self.batches[b] for shard, _, _ in pieces))


# Reading: one rank's rows, split between its DataLoader workers by shard.


class RankPieces(IterableDataset):
    """The rank's rows of every global batch from stream step `start` on, endlessly; in a DataLoader worker, only the
    rows that lie in its shards (`owner`: shard id -> worker). One piece per step, empty or not, so that the
    DataLoader's round-robin hands out one piece per worker per step."""

    def __init__(
        self, plan: Plan, partitions: range, owner: dict[int, int], start: int, latents: tuple[int, int] | None = None
    ):
        self.plan, self.partitions, self.owner, self.start = plan, partitions, owner, start
        self.latents = latents  # (channels, factor) of the latents to carry; None: none

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info else 0
        mine = np.array(sorted(shard for shard, owner in self.owner.items() if owner == worker), dtype=np.int64)
        epoch, step = divmod(self.start, len(self.plan))
        while True:
            yield from self.epoch_pieces(mine, epoch, step)
            epoch, step = epoch + 1, 0

    def epoch_pieces(self, mine: np.ndarray, epoch: int, first: int) -> Iterator[Batch]:
        plan = self.plan
        labels = plan.schedule(epoch)
        used = np.bincount(labels[:first], minlength=len(plan.buckets))  # each bucket's batches before step `first`
        # Each bucket's remaining batches, the rank's rows of each: partition after partition, B/K rows each.
        rows = {
            bucket: np.concatenate(
                [plan.sequence(epoch, p, bucket).reshape(-1, plan.per_partition) for p in self.partitions], axis=1
            )[used[bucket]:]
            for bucket in range(len(plan.buckets)) if plan.batches[bucket]
        }
        # Which samples of which of this worker's shards the rest of the epoch uses: kept when a shard is read.
        wanted: dict[int, set[int]] = {}
        for numbers in rows.values():
            numbers = numbers.ravel()
            shards = plan.shard_of(numbers)
            keep = np.isin(shards, mine)
            for shard, place in zip(shards[keep].tolist(), (numbers - plan.offsets[shards])[keep].tolist()):
                wanted.setdefault(shard, set()).add(place)
        held: dict[int, dict[int, TarSample]] = {}
        taken = dict.fromkeys(rows, 0)
        for step in range(first, len(labels)):
            bucket = int(labels[step])
            numbers = rows[bucket][taken[bucket]]
            taken[bucket] += 1
            yield self.make_piece(numbers, plan.buckets[bucket], mine, wanted, held)

    def make_piece(
        self,
        numbers: np.ndarray,
        bucket: tuple[int, int],
        mine: np.ndarray,
        wanted: dict[int, set[int]],
        held: dict[int, dict[int, TarSample]],
    ) -> Batch:
        width, height = bucket
        latent_shape = None
        if self.latents is not None:
            channels, factor = self.latents
            latent_shape = (channels, height // factor, width // factor)
        shards = self.plan.shard_of(numbers)
        rows, images, captions, embeddings, latents, skipped = [], [], [], [], [], Counter()
        for row in np.flatnonzero(np.isin(shards, mine)).tolist():
            shard = int(shards[row])
            if shard not in held:
                held[shard] = self.read_shard(shard, wanted[shard])
            place = int(numbers[row] - self.plan.offsets[shard])
            sample = held[shard].pop(place, None)
            wanted[shard].discard(place)
            if not wanted[shard]:
                del held[shard]
            url = self.plan.shards[shard].url
            if sample is None:
                reason, decoded, where = "missing from shard", None, f"{url} sample {place}"
            else:
                (reason, decoded), where = decode_sample(sample, bucket, latent_shape), f"{url} {sample.key}"
            if decoded is None:
                skipped[reason] += 1
                log.warning("skipped %s: %s", where, reason)
                continue
            pixels, caption, embedding, latent = decoded
            rows.append(row)
            images.append(pixels)
            captions.append(caption)
            embeddings.append(embedding)
            latents.append(latent)
        stacked = torch.empty(len(images), 3, height, width, dtype=torch.uint8)
        if get_worker_info() is not None:
            stacked.share_memory_()  # filled in place where the training process maps it: saves a copy per piece
        for row, pixels in enumerate(images):
            stacked[row].copy_(torch.from_numpy(pixels).permute(2, 0, 1))
        has_embeddings = all(e is not None for e in embeddings)
        return Batch(stacked, captions, embeddings if has_embeddings else None, bucket, dict(skipped), rows,
                     latents if latent_shape is not None else None)

    def read_shard(self, shard: int, places: set[int]) -> dict[int, TarSample]:
        url = self.plan.shards[shard].url
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


def sample_number(key: str) -> int | None:
    """prepare writes keys "{bucket}_{chunk}_{number}": the number is the sample's place in its shard."""
    try:
        return int(key.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return None


def join_pieces(pieces: list[Batch], pin_memory: bool) -> Batch:
    """The rank's batch from its workers' pieces, in row order; its images in pinned memory if asked."""
    if len(pieces) == 1 and not pin_memory:
        return pieces[0]
    rows = sorted(row for piece in pieces for row in piece.rows)
    position = {row: i for i, row in enumerate(rows)}
    images = torch.empty((len(rows), *pieces[0].images.shape[1:]), dtype=torch.uint8, pin_memory=pin_memory)
    captions, embeddings, latents, skipped = [""] * len(rows), [None] * len(rows), [None] * len(rows), Counter()
    for piece in pieces:
        places = [position[row] for row in piece.rows]
        images.index_copy_(0, torch.tensor(places, dtype=torch.long), piece.images)
        for i, place in enumerate(places):
            captions[place] = piece.captions[i]
            if piece.embeddings is not None:
                embeddings[place] = piece.embeddings[i]
            if piece.latents is not None:
                latents[place] = piece.latents[i]
        skipped.update(piece.skipped)
    has_embeddings = all(piece.embeddings is not None for piece in pieces)
    has_latents = all(piece.latents is not None for piece in pieces)
    return Batch(images, captions, embeddings if has_embeddings else None, pieces[0].bucket, dict(skipped), rows,
                 latents if has_latents else None)


def decode_sample(
    sample: TarSample, size: tuple[int, int], latent_shape: tuple[int, int, int] | None = None
) -> tuple[str, tuple[np.ndarray, str, torch.Tensor | None, torch.Tensor | None] | None]:
    """(reason, None) for a sample that cannot be used, else ("", (pixels, caption, embedding, latents)), pixels
    being the (H, W, 3) uint8 RGB image. Latents are read only when `latent_shape` is given, and must have it."""
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
    latent = None
    if latent_shape is not None:
        if "lat.npy" not in members:
            return "missing latents", None
        try:
            latent = torch.from_numpy(np.load(io.BytesIO(members["lat.npy"]), allow_pickle=False))
        except (OSError, ValueError, EOFError):
            return "unreadable latents", None
        if tuple(latent.shape) != latent_shape:
            return "latent size differs from its bucket", None
    return "", (pixels, caption, embedding, latent)


class ShardStream:
    """Endless stream of one rank's rows of every global batch over prepared shards (see the module docstring).

    `text_encoder`: the identity (TextTower.identity()) of the frozen encoder training conditions on, checked
    against the one the index records for its embeddings; None when the embeddings are not used.
    `autoencoder`: the identity (Autoencoder.identity()) of the autoencoder training works in the latent space of;
    the index must hold latents made by it, and batches carry them. None: latents are not read."""

    def __init__(
        self,
        index: str,
        global_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        shuffle_shards: int = 4,
        partitions: int = 64,
        shard_url: str | None = None,
        pin_memory: bool = False,
        text_encoder: dict | None = None,
        autoencoder: dict | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if partitions < 1 or partitions % world_size:
            raise PlanError(f"data.partitions ({partitions}) must be a multiple of the world size ({world_size}): "
                            "every rank serves as many partitions")
        if global_batch_size % partitions:
            raise PlanError(f"the global batch ({global_batch_size}) must be a multiple of data.partitions "
                            f"({partitions}): every partition gives each batch as many samples")
        self.index = read_index(str(index), shard_url)
        check_text_encoder(self.index, text_encoder)
        check_autoencoder(self.index, autoencoder)
        self.latents = (autoencoder["channels"], autoencoder["factor"]) if autoencoder is not None else None
        self.num_workers, self.pin_memory = num_workers, pin_memory
        shards = self.index.shards
        self.plan = Plan(shards, global_batch_size, partitions, seed, shuffle_shards)
        self.fingerprint = {
            "partitioning": "samples", "seed": seed, "global_batch_size": global_batch_size, "partitions": partitions,
            "shuffle_shards": shuffle_shards, "samples": sum(shard.count for shard in shards),
        }
        per_rank = partitions // world_size
        self.rank_partitions = range(rank * per_rank, (rank + 1) * per_rank)
        self.skipped: dict[str, int] = {}
        per_bucket = {b: sum(s.count for s in shards if s.bucket == b) for b in self.plan.buckets}
        if len(self) == 0:
            raise EmptyDatasetError(
                f"{self.index.location} yields no batch: a global batch takes {global_batch_size} samples of one "
                f"bucket (aspect ratio), and its largest bucket holds {max(per_bucket.values(), default=0)}; prepare "
                "more images, or train with a smaller train.batch_size (a multiple of data.partitions)"
            )
        for bucket, batches in zip(self.plan.buckets, self.plan.batches):
            if not batches:
                log.warning("%s: bucket %dx%d holds %d samples, fewer than one global batch (%d); its samples are "
                            "not used", self.index.location, *bucket, per_bucket[bucket], global_batch_size)

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank, in every epoch and for every world size)."""
        return len(self.plan)

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """This rank's batches from step `start` of the stream on, endlessly; it reads only what it uses from there."""
        plan = self.plan
        shards = plan.shards_of(self.rank_partitions)
        workers = min(self.num_workers, len(shards))
        owner = deal(plan.shards, shards, max(workers, 1))
        pieces = RankPieces(plan, self.rank_partitions, owner, start, self.latents)
        loader = iter(pieces if workers == 0 else DataLoader(pieces, batch_size=None, num_workers=workers))
        whole_epoch, good = start % len(self) == 0, 0
        for step in itertools.count(start):
            batch = join_pieces([next(loader) for _ in range(max(workers, 1))], self.pin_memory)
            for reason, count in batch.skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + count
            good += len(batch)
            yield batch
            if (step + 1) % len(self) == 0:
                if whole_epoch and good == 0:
                    raise EmptyDatasetError(f"{self.index.location}: every sample of epoch {step // len(self)} was "
                                            f"skipped ({self.skipped})")
                whole_epoch, good = True, 0

    def state_dict(self) -> dict:
        return {"skipped": dict(self.skipped), "plan": dict(self.fingerprint)}

    def load_state_dict(self, state: dict) -> None:
        """Take the skipped counts of a state saved under the same plan (with any world size)."""
        saved = state.get("plan", {})
        for name, value in self.fingerprint.items():
            if saved.get(name) != value:
                raise PlanError(f"the data position was saved under {name}={saved.get(name)!r}, this stream has "
                                f"{value!r}: its batches would not continue that order")
        self.skipped = dict(state["skipped"])
