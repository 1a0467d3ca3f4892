"""Where a training step's images come from: the data source interface and its registry.

A source gives this rank's part of global batch `step` at the stage's size (`batch`), what the small text
encoder's tokenizer is learnt from (`tokenizer_captions`), held-out samples for sample grids and metrics
(`held_out`), and the state a resumed run needs (`state_dict` / `load_state_dict`). It registers itself under the
name `data.source` gives (`register_source`), with its config section: a dataclass whose fields are read and
written as keys of `data:` (`data.partitions=4`), as pixrun.data.config explains. The built-in sources: the
shapes world (pixrun.data.shapes) and prepared shards (pixrun.data.shards).

Images leave every source as uint8; `LocalBatch.images_on` makes them floats on the device. Randomness comes from
the step and the row, never from the rank, so any world size trains on the same data.
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch


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


@dataclass
class HeldOut:
    images: torch.Tensor  # (n, 3, R, R) uint8
    captions: list[str]
    keys: list[str]
    description: dict | None = None  # what they are, naming them in the metrics' feature cache; None: not cached

    def __len__(self) -> int:
        return len(self.captions)

    def floats(self) -> torch.Tensor:
        """The images as float32 in [-1, 1], as the pipeline generates them."""
        return self.images.float() / 127.5 - 1


class DataSource:
    """One kind of training data (see the module docstring). `config_class`: its section of `data:`, a dataclass
    with a `validate(config)` that raises ValueError with a one-line message; `prepared_latents`: whether its
    batches bring latents prepared with the images (the autoencoder's encoder then does not run in the step)."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    prepared_latents: ClassVar[bool] = False
    skipped: int = 0  # bad samples left out so far (logged)

    @classmethod
    def build(cls, config, world, text_tower=None, autoencoder=None, pin_memory: bool = False) -> "DataSource":
        """The source of a run (`config`: the Config) on this rank of `world` (pixrun.runtime.World). `text_tower`
        and `autoencoder`: the run's, for a source whose data carries their output (checked against it)."""
        raise NotImplementedError

    @classmethod
    def tokenizer_captions(cls, config) -> list[str]:
        """What the small jointly trained text encoder's tokenizer is learnt from, before any source is built."""
        raise NotImplementedError

    def batch(self, step: int, stage, stage_start: int) -> LocalBatch:
        """This rank's rows of global batch `step`, of `stage` (a StageConfig) that starts at `stage_start`."""
        raise NotImplementedError

    def held_out(self, stage, count: int, seed: int) -> HeldOut:
        """Up to `count` samples never trained on, square at `stage.resolution`, with their captions: what the
        metrics compare generated images with (drawn with `seed` where there is a choice)."""
        raise NotImplementedError

    def grid_samples(self, stage, count: int) -> HeldOut | None:
        """Up to `count` held-out samples whose captions and real images lead the rows of a sample grid; None:
        the grid shows sample.grid_prompts."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


DATA_SOURCES: dict[str, type[DataSource]] = {}
SHARED_KEYS = ("source", "resolution")  # the keys of `data:` that belong to every source (DataConfig's own)


def section_keys(source: type[DataSource]) -> list[str]:
    """The keys of `data:` that are `source`'s."""
    return [f.name for f in dataclasses.fields(source.config_class)]


def register_source(source: type[DataSource]) -> type[DataSource]:
    """Class decorator: `source` becomes `data.source: <its name>`, its section's fields keys of `data:` (each key
    one source's)."""
    if source.name in DATA_SOURCES and DATA_SOURCES[source.name] is not source:
        raise ValueError(f"a data source named {source.name!r} is already registered")
    taken = set(SHARED_KEYS).union(*(section_keys(other) for other in DATA_SOURCES.values() if other is not source))
    clash = [key for key in section_keys(source) if key in taken]
    if clash:
        raise ValueError(f"data source {source.name!r}: data.{clash[0]} is already a key of data:")
    DATA_SOURCES[source.name] = source
    return source
