"""Where a training step's images come from: this rank's part of global batch `step`, at the stage's size.

Two sources behind one interface: the built-in shapes world (a pure function of the step, nothing to save) and
prepared WebDataset shards (a stream, whose position is saved with each checkpoint so a resumed run neither
repeats nor skips a sample). A multi-resolution run opens each stage's shards when it reaches that stage.
"""

from dataclasses import dataclass

import torch

from pixrun.data.shapes import ShapesWorld
from pixrun.data.stream import ShardStream


@dataclass
class LocalBatch:
    images: torch.Tensor  # (b, 3, H, W) in [-1, 1]; b may be smaller than the rank's share (bad samples)
    captions: list[str]
    embeddings: list[torch.Tensor] | None = None  # precomputed text embeddings, (tokens, dim) each
    skipped: int = 0  # samples left out of this batch


class ShapesSource:
    def __init__(self, world: ShapesWorld, seed: int, rank: int, world_size: int):
        self.world, self.seed, self.rank, self.world_size = world, seed, rank, world_size

    def batch(self, step: int, stage, stage_start: int) -> LocalBatch:
        """Every rank draws the global batch's scenes and renders its own rows, so any world size trains on the same
        data."""
        per_rank = stage.batch_size // self.world_size
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return LocalBatch(*self.world.batch(self.seed, step, stage.batch_size, stage.resolution, rows=mine))

    skipped = 0  # rendered samples are never bad

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ShardSource:
    """Prepared shards (`pixrun data prepare`): `default_index` for every stage, unless a stage names its own."""

    def __init__(self, default_index: str, seed: int, rank: int, world_size: int, num_workers: int,
                 shuffle_shards: int, shard_url: str | None):
        self.default_index = default_index
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.shuffle_shards, self.shard_url = num_workers, shuffle_shards, shard_url
        self.stage_start: int | None = None
        self.stream: ShardStream | None = None
        self.batches = None
        self.pending: dict | None = None

    def batch(self, step: int, stage, stage_start: int) -> LocalBatch:
        if self.stage_start != stage_start:
            self._open(stage, stage_start)
        batch = next(self.batches)
        return LocalBatch(batch.images, batch.captions, batch.embeddings, sum(batch.skipped.values()))

    def _open(self, stage, stage_start: int) -> None:
        self.stream = ShardStream(
            stage.shards or self.default_index, stage.batch_size // self.world_size, seed=self.seed + stage_start,
            rank=self.rank, world_size=self.world_size, num_workers=self.num_workers,
            shuffle_shards=self.shuffle_shards, shard_url=self.shard_url,
        )
        if self.pending is not None and self.pending["stage_start"] == stage_start:
            self.stream.load_state_dict(self.pending["stream"])
        self.pending = None
        self.stage_start = stage_start
        self.batches = iter(self.stream)

    @property
    def skipped(self) -> int:
        """Bad samples left out so far in this stage (by this rank)."""
        return sum(self.stream.skipped.values()) if self.stream is not None else 0

    def state_dict(self) -> dict:
        if self.stream is None:
            return self.pending or {}
        return {"stage_start": self.stage_start, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Applied when the run reaches the stage it was saved in (the next step, on a resume)."""
        self.pending = state or None
