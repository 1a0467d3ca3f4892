"""Where a training step's images come from: this rank's part of global batch `step`, at the stage's size.

Two sources behind one interface, both a function of the step: the built-in shapes world (nothing to save) and
prepared WebDataset shards (pixrun.data.stream: the step gives the position; the skipped counts and the plan's
fingerprint are saved with each checkpoint, and a resumed run continues the same sample order on any world size
that divides data.partitions). Images leave both as uint8; `LocalBatch.images_on` makes them floats on the device.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pixrun.config import ConfigError
from pixrun.data.shapes import ShapesWorld
from pixrun.data.stream import PlanError, ShardStream


@dataclass
class LocalBatch:
    images: torch.Tensor  # (b, 3, H, W) uint8; b may be smaller than the rank's share (bad samples)
    captions: list[str]
    embeddings: list[torch.Tensor] | None = None  # precomputed text embeddings, (tokens, dim) each
    skipped: int = 0  # samples left out of this batch
    rows: list[int] | None = None  # each sample's row in the rank's share (bad ones leave gaps); None: 0, 1, ...

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
    encoder than `text_encoder`, TextTower.identity() or None when precomputed embeddings are not used) stops the
    run with a ConfigError before its first step. A stage's stream is seeded by seed + the step the stage starts at.
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
    ):
        self.streams: dict[int, ShardStream] = {}  # stage start -> its stream
        start = 0
        try:
            for stage in stages:
                self.streams[start] = ShardStream(
                    stage.shards or default_index, stage.batch_size, seed=seed + start, rank=rank,
                    world_size=world_size, num_workers=num_workers, shuffle_shards=shuffle_shards,
                    partitions=partitions, shard_url=shard_url, pin_memory=pin_memory, text_encoder=text_encoder,
                )
                start = stage.until_step
        except PlanError as error:
            raise ConfigError(str(error)) from None
        self.stage_start: int | None = None
        self.batches = None
        self.next_position: int | None = None

    def batch(self, step: int, stage, stage_start: int) -> LocalBatch:
        """This rank's rows of global batch `step`; the stream seeks there when `step` is not the one after the
        last (on resume), reading none of the data it skips but the rest of the shuffle group it lands in."""
        position = step - stage_start
        if stage_start != self.stage_start or position != self.next_position:
            self.stage_start, self.batches = stage_start, self.streams[stage_start].batches(position)
        self.next_position = position + 1
        batch = next(self.batches)
        return LocalBatch(batch.images, batch.captions, batch.embeddings, sum(batch.skipped.values()), batch.rows)

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
