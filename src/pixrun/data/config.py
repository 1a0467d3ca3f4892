"""The `data:` section: which source trains (`data.source`), at which resolution, and every registered source's
own section (pixrun.data.source.DATA_SOURCES), whose fields are keys of `data:` itself (`data.partitions`,
`data.kinds`), as configs have always written them. The built-in sources register when imported (BUILT_IN, here)."""

import dataclasses
from dataclasses import dataclass, field

from pixrun.data import shapes, shards
from pixrun.data.source import DATA_SOURCES, section_keys

BUILT_IN = (shapes, shards)  # importing a source's module registers it


def default_source_sections() -> dict:
    return {name: source.config_class() for name, source in DATA_SOURCES.items()}


@dataclass
class DataConfig:
    source: str = "shapes"  # a registered source: shapes (the built-in world) | shards (`pixrun data prepare`) | ...
    resolution: int = 64
    sections: dict = field(default_factory=default_source_sections)  # source name -> its section

    @property
    def section(self):
        """The section of the source that trains."""
        return self.sections[self.source]

    def __getattr__(self, name: str):
        """A source's field by its key: `data.partitions` reads the shards section's `partitions`."""
        for section in self.__dict__.get("sections", {}).values():
            if name in {f.name for f in dataclasses.fields(section)}:
                return getattr(section, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def validate(self, config) -> None:
        """ValueError, one line, unless the source is registered and its section fits the run `config`."""
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source {self.source!r} is not known (known: {', '.join(DATA_SOURCES)})")
        self.section.validate(config)


def split_keys(raw: dict) -> tuple[dict, dict[str, dict]]:
    """The keys of a raw `data:` mapping: DataConfig's own, and each source's (an unknown key stays with the
    former, to be reported as unknown)."""
    own, sections = {}, {}
    for key, value in raw.items():
        owner = next((name for name, source in DATA_SOURCES.items() if key in section_keys(source)), None)
        if owner is None:
            own[key] = value
        else:
            sections.setdefault(owner, {})[key] = value
    return own, sections


def flat(data: dict) -> dict:
    """A `data:` mapping as dataclasses.asdict gives it, with each source's fields as keys of `data:`."""
    data = dict(data)
    for section in data.pop("sections").values():
        data.update(section)
    return data
