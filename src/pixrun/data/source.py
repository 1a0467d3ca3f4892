"""Where a training step's images come from: this rank's part of global batch `step`, at the stage's size.

Two sources behind one interface, both a function of the step: the built-in shapes world (nothing to save) and
prepared WebDataset shards (pixrun.data.stream: the step gives the position; the skipped counts and the plan's
fingerprint are saved with each checkpoint, and a resumed run continues the same sample order on any world size
that divides data.partitions). Images leave both as uint8; `LocalBatch.images_on` makes them floats on the device.
Shards prepared with an autoencoder also give each sample's latents, when the source is given that autoencoder's
identity (`LocalBatch.latents_on`).

A prepared folder also gives what training uses besides its batches: `read_captions`, the caption sample the small
text encoder's tokenizer is learnt from, and `read_held_out`, the samples kept out of training, with their images
square at a given resolution, for sample grids and metrics.
"""

import itertools
import json
import logging
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from webdataset.gopen import gopen

from pixrun.data.buckets import parse_bucket
from pixrun.data.shapes import ShapesWorld
from pixrun.data.stream import (
    INDEX_FORMAT,
    INDEX_NAME,
    PlanError,
    ShardStream,
    TarDamage,
    decode_sample,
    read_tar_samples,
)
from pixrun.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class LocalBatch:
    images: torch.Tensor  # (b, 3, H, W) uint8; b may be smaller than the rank's share (bad samples)
    captions: list[str]
    embeddings: list[torch.Tensor] | None = None  # precomputed text embeddings, (tokens, dim) each
    rows: list[int] | None = None  # each sample's row in the rank's share (bad ones leave gaps); None: 0, 1, ...
    latents: list[torch.Tensor] | None = None  # prepared latents, float16 (C, H / factor, W / factor) each

    def latents_on(self, device: torch.device | str) -> torch.Tensor:
        """The prepared latents as one (b, C, h, w) float32 tensor on `device` (a bucket's are all one shape)."""
        return torch.stack(self.latents).to(device, non_blocking=True).float()

    def images_on(self, device: torch.device | str) -> torch.Tensor:
        """The images on `device` as float32 in [-1, 1] (x / 127.5 - 1): copied as uint8, a quarter of the bytes,
        without waiting for the copy (from pinned memory, truly in the background), and converted there."""
        return self.images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


class ShapesSource:
    def __init__(self, world: ShapesWorld, seed: int, rank: int, world_size: int, *, pin_memory: bool = False):
        self.world, self.seed, self.rank, self.world_size, self.pin_memory = world, seed, rank, world_size, pin_memory

    def batch(self, step: int, stage, stage_start: int) -> LocalBatch:
        """Each rank draws and renders only its own rows; a row's scene depends on (seed, step, row) alone, so any
        world size trains on the same data."""
        per_rank = stage.batch_size // self.world_size
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        images, captions = self.world.batch(self.seed, step, stage.batch_size, stage.resolution, rows=mine)
        return LocalBatch(images.pin_memory() if self.pin_memory else images, captions)

    skipped = 0  # rendered samples are never bad

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ShardSource:
    """Prepared shards (`pixrun data prepare`): `default_index` for every stage, unless a stage names its own.

    `stages` are the run's (Config.stage_plan()): each stage's stream is planned when the source is made, so a plan
    that cannot work (data.partitions against the world size or a stage's batch, embeddings made by another text
    encoder than `text_encoder`, TextTower.identity() or None when precomputed embeddings are not used; latents
    missing or made by another autoencoder than `autoencoder`, Autoencoder.identity() or None when prepared latents
    are not used) stops the run with a ConfigError before its first step. A stage's stream is seeded by seed + the step the stage starts at
    (made anew when a budget's plan moves that step).
    """

    def __init__(
        self,
        default_index: str,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        shuffle_shards: int,
        shard_url: str | None,
        *,
        stages: Sequence,
        partitions: int = 64,
        pin_memory: bool = False,
        text_encoder: dict | None = None,
        autoencoder: dict | None = None,
    ):
        self.default_index, self.seed = default_index, seed
        self.options = {"rank": rank, "world_size": world_size, "num_workers": num_workers,
                        "shuffle_shards": shuffle_shards, "partitions": partitions, "shard_url": shard_url,
                        "pin_memory": pin_memory, "text_encoder": text_encoder, "autoencoder": autoencoder}
        self.streams: dict[int, ShardStream] = {}  # stage start -> its stream
        start = 0
        for stage in stages:
            self.streams[start] = self.stream(stage, start)
            start = stage.until_step
        self.stage_start: int | None = None
        self.batches = None
        self.next_position: int | None = None

    def batch(self, step: int, stage, stage_start: int) -> LocalBatch:
        """This rank's rows of global batch `step`; the stream seeks there when `step` is not the one after the
        last (on resume), reading none of the data it skips but the rest of the shuffle group it lands in."""
        position = step - stage_start
        if stage_start not in self.streams:  # a budget's plan moved the stage's start
            self.streams[stage_start] = self.stream(stage, stage_start)
        if stage_start != self.stage_start or position != self.next_position:
            self.stage_start, self.batches = stage_start, self.streams[stage_start].batches(position)
        self.next_position = position + 1
        batch = next(self.batches)
        return LocalBatch(batch.images, batch.captions, batch.embeddings, rows=batch.rows, latents=batch.latents)

    def stream(self, stage, start: int) -> ShardStream:
        try:
            return ShardStream(stage.shards or self.default_index, stage.batch_size, seed=self.seed + start,
                               **self.options)
        except PlanError as error:
            raise ConfigError(str(error)) from None

    @property
    def skipped(self) -> int:
        """Bad samples left out so far in this stage (by this rank)."""
        return sum(self.streams[self.stage_start].skipped.values()) if self.stage_start is not None else 0

    def state_dict(self) -> dict:
        if self.stage_start is None:
            return {}
        return {"stage_start": self.stage_start, "stream": self.streams[self.stage_start].state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """The skipped counts of the stage the state was saved in; the position itself comes with the step."""
        if not state:
            return
        if state["stage_start"] not in self.streams:
            raise ConfigError(f"the data position was saved in a stage starting at step {state['stage_start']}; "
                              f"this run's stages start at {sorted(self.streams)}")
        try:
            self.streams[state["stage_start"]].load_state_dict(state["stream"])
        except PlanError as error:
            raise ConfigError(str(error)) from None
        self.stage_start = state["stage_start"]


@dataclass
class HeldOut:
    images: torch.Tensor  # (n, 3, R, R) uint8
    captions: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def floats(self) -> torch.Tensor:
        """The images as float32 in [-1, 1], as the pipeline generates them."""
        return self.images.float() / 127.5 - 1


def read_index(index: str, shard_url: str | None = None) -> tuple[str, dict, Callable[[str], str]]:
    """A prepared index (a folder, its index.json, or a URL) as (location, contents, where a path it lists is
    read from: beside the index, or filled into shard_url as the shards are)."""
    location = index if index.endswith(".json") else posixpath.join(index, INDEX_NAME)
    try:
        with gopen(location, "rb") as stream:
            data = json.load(stream)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{location} cannot be read as a pixrun shard index: {error}") from None
    if data.get("format") != INDEX_FORMAT:
        raise ConfigError(f"{location} is not a pixrun shard index (format {data.get('format')!r})")
    base = posixpath.dirname(location)
    return location, data, lambda path: shard_url.format(path=path) if shard_url else posixpath.join(base, path)


def read_captions(index: str, shard_url: str | None = None) -> list[str]:
    """The training captions `pixrun data prepare` sampled into captions.txt, one a line."""
    location, data, where = read_index(index, shard_url)
    if "captions" not in data:
        raise ConfigError(f"{location} lists no captions to learn the small text encoder's tokenizer from (it was "
                          "prepared by an earlier pixrun): prepare it again, or set text.encoder to a pretrained one")
    with gopen(where(data["captions"]), "rb") as stream:
        return stream.read().decode("utf-8").splitlines()


def held_out_samples(data: dict, where: Callable[[str], str]) -> Iterator[tuple[str, np.ndarray, str]]:
    """(key, (H, W, 3) uint8 pixels at its bucket's size, caption) of each readable held-out sample, in index order."""
    for shard in data.get("heldout", []):
        url, bucket = where(shard["path"]), parse_bucket(shard["bucket"])
        with gopen(url, "rb") as stream:
            for sample in read_tar_samples(stream, url):
                if isinstance(sample, TarDamage):
                    log.warning("%s: %s", sample.where, sample.reason)
                    continue
                reason, decoded = decode_sample(sample, bucket)
                if decoded is None:
                    log.warning("skipped held-out %s %s: %s", url, sample.key, reason)
                    continue
                pixels, caption, _, _ = decoded
                yield sample.key, pixels, caption


def read_held_out(index: str, resolution: int, count: int | None = None, shard_url: str | None = None) -> HeldOut:
    """The first `count` (None: all) held-out samples of a prepared index, in index order, their images
    centre-cropped and resized (Lanczos) from their bucket to resolution²: the size the pipeline generates at.
    An index without held-out samples (prepared with heldout=0, or by an earlier pixrun) gives none; an unreadable
    sample is left out with a warning."""
    _, data, where = read_index(index, shard_url)
    images, captions, keys = [], [], []
    for key, pixels, caption in itertools.islice(held_out_samples(data, where), count):
        square = ImageOps.fit(Image.fromarray(pixels), (resolution, resolution), Image.Resampling.LANCZOS)
        images.append(torch.from_numpy(np.array(square)).permute(2, 0, 1))
        captions.append(caption)
        keys.append(key)
    stacked = torch.stack(images) if images else torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)
    return HeldOut(stacked, captions, keys)
