"""Prepared WebDataset shards (`pixrun data prepare`) as a data source: `data.source: shards`.

The stream (pixrun.data.stream) makes the step the position: the skipped counts and the plan's fingerprint are
saved with each checkpoint, and a resumed run continues the same sample order on any world size that divides
data.partitions. Shards prepared with an autoencoder also give each sample's latents, when the source is given
that autoencoder's identity (`LocalBatch.latents_on`).

A prepared folder also gives what training uses besides its batches: `read_captions`, the caption sample the small
text encoder's tokenizer is learnt from, and `read_held_out`, the samples kept out of training, with their images
square at a given resolution, for sample grids and metrics.
"""

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from webdataset.gopen import gopen

from pixrun.data.source import DataSource, HeldOut, LocalBatch, register_source
from pixrun.data.stream import ShardStream, TarDamage, decode_sample, read_index, read_tar_samples
from pixrun.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ShardsConfig:
    shards: str = ""  # the prepared folder (or its index.json, or a URL); a stage may name its own (stages[i].shards)
    shard_url: str | None = None  # e.g. "pipe:curl -sL https://host/data/{path}" for shards behind a URL
    num_workers: int = 2  # loader processes per rank
    shuffle_shards: int = 4  # samples are shuffled within groups of this many pieces of shards
    partitions: int = 64  # canonical partitions of each bucket's samples (docs/data.md): world sizes and batches divide it

    def validate(self, config) -> None:
        if self.partitions < 1:
            raise ValueError(f"data.partitions must be at least 1, got {self.partitions}")
        if self.num_workers < 0 or self.shuffle_shards < 1:
            raise ValueError("data.num_workers must be >= 0 and data.shuffle_shards >= 1")
        for stage in config.stage_plan():
            if not (stage.shards or self.shards):
                raise ValueError("data.source shards needs data.shards: a folder made by `pixrun data prepare`")
            if stage.batch_size % self.partitions:
                raise ValueError(f"data.partitions ({self.partitions}) must divide the global batch "
                                 f"({stage.batch_size}): every partition gives each batch as many samples")


@register_source
class ShardSource(DataSource):
    """Prepared shards: `default_index` for every stage, unless a stage names its own.

    `stages` are the run's (Config.stage_plan()): each stage's stream is planned when the source is made, so a plan
    that cannot work (data.partitions against the world size or a stage's batch, too few samples for a batch,
    embeddings made by another text encoder than `text_encoder`, TextTower.identity() or None when precomputed
    embeddings are not used; latents missing or made by another autoencoder than `autoencoder`,
    Autoencoder.identity() or None when prepared latents are not used) stops the run with a DataError before its
    first step. A stage's stream is seeded by seed + the step the stage starts at (made anew when a budget's plan
    moves that step).
    """

    name = "shards"
    config_class = ShardsConfig
    prepared_latents = True

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
        self.default_index, self.seed, self.shard_url = default_index, seed, shard_url
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

    @classmethod
    def build(cls, config, world, text_tower=None, autoencoder=None, pin_memory: bool = False) -> "ShardSource":
        """With a frozen `text_tower`, the shards' embeddings are checked against it; in latent space the
        `autoencoder` against the one that made their latents (which they must carry)."""
        d = config.data
        frozen = text_tower is not None and not text_tower.trainable
        return cls(
            d.shards, config.train.seed, world.rank, world.size, d.num_workers, d.shuffle_shards, d.shard_url,
            stages=config.stage_plan(), partitions=d.partitions, pin_memory=pin_memory,
            text_encoder=text_tower.identity() if frozen else None,
            autoencoder=autoencoder.identity() if autoencoder is not None else None,
        )

    @classmethod
    def tokenizer_captions(cls, config) -> list[str]:
        """The caption sample `pixrun data prepare` wrote beside every stage's shards."""
        indexes = dict.fromkeys(stage.shards or config.data.shards for stage in config.stage_plan())
        return [caption for index in indexes for caption in read_captions(index, config.data.shard_url)]

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
        return ShardStream(stage.shards or self.default_index, stage.batch_size, seed=self.seed + start, **self.options)

    def held_out(self, stage, count: int, seed: int) -> HeldOut:
        """The first `count` held-out samples of the stage's prepared set (`seed`: no choice to make)."""
        return read_held_out(stage.shards or self.default_index, stage.resolution, count, self.shard_url)

    def grid_samples(self, stage, count: int) -> HeldOut:
        return self.held_out(stage, count, 0)

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
            raise DataError(f"the data position was saved in a stage starting at step {state['stage_start']}; "
                            f"this run's stages start at {sorted(self.streams)}")
        self.streams[state["stage_start"]].load_state_dict(state["stream"])
        self.stage_start = state["stage_start"]


def read_captions(index: str, shard_url: str | None = None) -> list[str]:
    """The training captions `pixrun data prepare` sampled into captions.txt, one a line."""
    shard_index = read_index(index, shard_url)
    if shard_index.captions is None:
        raise DataError(f"{shard_index.location} lists no captions to learn the small text encoder's tokenizer from "
                        "(it was prepared by an earlier pixrun): prepare it again, or set text.encoder to a "
                        "pretrained one")
    try:
        with gopen(shard_index.captions, "rb") as stream:
            return stream.read().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{shard_index.captions} cannot be read: {error}".splitlines()[0]) from None


def held_out_samples(index: str, shard_url: str | None = None) -> Iterator[tuple[str, np.ndarray, str]]:
    """(key, (H, W, 3) uint8 pixels at its bucket's size, caption) of each readable held-out sample, in index order."""
    for shard in read_index(index, shard_url).heldout:
        try:
            with gopen(shard.url, "rb") as stream:
                for sample in read_tar_samples(stream, shard.url):
                    if isinstance(sample, TarDamage):
                        log.warning("%s: %s", sample.where, sample.reason)
                        continue
                    reason, decoded = decode_sample(sample, shard.bucket)
                    if decoded is None:
                        log.warning("skipped held-out %s %s: %s", shard.url, sample.key, reason)
                        continue
                    pixels, caption, _, _ = decoded
                    yield sample.key, pixels, caption
        except OSError as error:
            log.warning("%s: could not be read (%s)", shard.url, error)


def read_held_out(index: str, resolution: int, count: int | None = None, shard_url: str | None = None) -> HeldOut:
    """The first `count` (None: all) held-out samples of a prepared index, in index order, their images
    centre-cropped and resized (Lanczos) from their bucket to resolution²: the size the pipeline generates at.
    An index without held-out samples (prepared with heldout=0, or by an earlier pixrun) gives none; an unreadable
    sample is left out with a warning."""
    images, captions, keys = [], [], []
    for key, pixels, caption in itertools.islice(held_out_samples(index, shard_url), count):
        square = ImageOps.fit(Image.fromarray(pixels), (resolution, resolution), Image.Resampling.LANCZOS)
        images.append(torch.from_numpy(np.array(square)).permute(2, 0, 1))
        captions.append(caption)
        keys.append(key)
    stacked = torch.stack(images) if images else torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)
    return HeldOut(stacked, captions, keys)
