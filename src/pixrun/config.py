"""Typed run configuration: dataclasses, loaded from YAML, with dotted overrides (`optim.lr=3e-4`).

Unknown keys and invalid values raise ConfigError with a one-line message; the CLI turns it into exit code 2.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from pixrun.budget import budget_seconds
from pixrun.data import config as data_config
from pixrun.data.config import DataConfig
from pixrun.data.source import DATA_SOURCES, section_keys
from pixrun.errors import ConfigError
from pixrun.flow import FlowConfig
from pixrun.latent import LatentConfig
from pixrun.logger import LogConfig
from pixrun.losses import LOSS_TERMS, LossConfig
from pixrun.losses.auxiliary import default_loss_sections
from pixrun.metrics import MetricsConfig
from pixrun.model import PRESETS, ModelConfig, TokenRouting
from pixrun.optim import EMAConfig, OptimConfig
from pixrun.parallel import ParallelConfig
from pixrun.sampler import SampleConfig
from pixrun.text import TextConfig


@dataclass
class TrainConfig:
    steps: int = 2400  # the run's length; with a budget, the most it runs (the first limit reached ends it)
    # Train to a duration ("12m", "24h", "1h30m"): the steps are planned to end there (pixrun.budget); "": no
    # budget, train train.steps. The built-in default run sets 12m (DEFAULT_RUN).
    budget: str = ""
    budget_money: float = 0.0  # or to a sum of money at train.device_hour_price per device-hour; the first limit hit
    device_hour_price: float = 0.0  # price of one device for one hour, in the budget's currency
    budget_warmup_steps: int = 5  # steps (of each stage, and after a resume) not timed for the plan: warm-up, compiling
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast where supported) | fp32 | bf16
    threads: int = 0  # torch CPU threads; 0 = torch's choice
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # metrics.metrics (FID/KID/CMMD/DINO-MMD, CLIPScore/PickScore) and MSE by t of the EMA model every N steps,
    # first and last; 0 = never
    metrics_every: int = 0
    max_nonfinite_in_row: int = 20  # a non-finite loss skips its step; this many in a row stop the run (checked on logging steps)
    async_checkpoint: bool = False  # write checkpoints in the background while training goes on


@dataclass
class StageConfig:
    """One stage of a multi-resolution run: steps up to `until_step` (global), at `resolution` and `batch_size`."""

    until_step: int
    resolution: int
    batch_size: int
    losses: list[str] | None = None  # loss terms on in this stage (lpips, pdino, repa, ...); None: all configured
    tread: bool | None = None  # token routing in this stage; None: as tread.enabled
    shards: str | None = None  # data.source shards: this stage's prepared set; None: data.shards
    budget_share: float | None = None  # share of train.budget (all stages or none); None: by samples (steps x batch)

    def uses(self, loss: str) -> bool:
        """Whether loss term `loss` (a registered name: lpips, pdino, repa, ...) is on in this stage, if configured."""
        return self.losses is None or loss in self.losses

    def routes(self, tread: TokenRouting) -> bool:
        """Whether TREAD routes tokens in this stage."""
        return tread.enabled if self.tread is None else self.tread


@dataclass
class EvalConfig:
    prompts_per_task: int = 16
    images_per_prompt: int = 4
    seed: int = 1234
    batch_size: int = 128
    at_end: bool = False  # score the EMA model after the last step, inside a budget's time (shapes world only)


@dataclass
class Config:
    """A run's settings. `user_set` names the settings the YAML file and the command line gave ("model.width"),
    as `load_config` read them: what resolving the config (init) must not silently replace."""

    user_set: ClassVar[frozenset[str]] = frozenset()
    run_dir: str = "runs/shapes-default"
    init: str = ""  # a diffusers PRXPipeline / PRXPixelPipeline (hub id or folder) to start from (pixrun.pretrained)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)  # pixel space unless latent.vae names a VAE
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # every registered loss term's section (pixrun.losses.LOSS_TERMS), read and written as top-level sections
    # (`lpips:`, `repa.weight=0.5`)
    losses: dict[str, LossConfig] = field(default_factory=default_loss_sections)
    tread: TokenRouting = field(default_factory=TokenRouting)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage (train.steps, data.resolution, ...)

    def __getattr__(self, name: str):
        """A loss term's section by its name, as the YAML writes it: `config.repa` is `config.losses["repa"]`."""
        losses = self.__dict__.get("losses", {})
        if name in losses:
            return losses[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def stage_plan(self) -> list[StageConfig]:
        """The stages the run goes through; a run without `stages` is one stage."""
        if self.stages:
            return self.stages
        return [StageConfig(self.train.steps, self.data.resolution, self.train.batch_size)]

    def stage_at(self, step: int) -> tuple[StageConfig, int]:
        """The stage step `step` belongs to, and the step it starts at."""
        start = 0
        for stage in self.stage_plan():
            if step < stage.until_step:
                return stage, start
            start = stage.until_step
        raise ValueError(f"step {step} is past the last stage")
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        try:
            self.model.validate()
            self.text.validate()
            self.latent.validate()
            self.flow.validate()
            self.sample.validate()
            self.parallel.validate()
            self.data.validate(self)
            self.optim.validate()
            self.metrics.validate()
            self.log.validate()
            self._validate_losses()
            if self.tread.enabled or self.tread.fusion != "tread":  # SPRINT's fusion runs unrouted too
                self.tread.blocks(self.model.depth)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        res, patch = self.data.resolution, self.model.patch_size
        if res % patch:
            raise ConfigError(f"model.patch_size {patch} does not divide data.resolution {res}")
        self._validate_stages()
        if self.train.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {self.train.precision!r}")
        positive = {
            "train.steps": self.train.steps, "train.batch_size": self.train.batch_size,
            "train.log_every": self.train.log_every, "train.sample_every": self.train.sample_every,
            "train.checkpoint_every": self.train.checkpoint_every,
            "train.keep_checkpoints": self.train.keep_checkpoints,
            "train.max_nonfinite_in_row": self.train.max_nonfinite_in_row,
            "optim.lr": self.optim.lr, "ema.every": self.ema.every, "data.resolution": res,
            "eval.prompts_per_task": self.eval.prompts_per_task, "eval.images_per_prompt": self.eval.images_per_prompt,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        self._validate_budget()
        if self.eval.at_end and self.data.source != "shapes" and "eval.at_end" in self.user_set:
            raise ConfigError("eval.at_end scores the shapes world's prompts: it needs data.source=shapes")
        if not 0 <= self.ema.decay < 1:
            raise ConfigError(f"ema.decay must lie in [0, 1), got {self.ema.decay}")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.optim.betas}")

    def _validate_losses(self) -> None:
        for name, section in self.losses.items():
            try:
                section.validate()
                if section.weight > 0:
                    section.fits(self.model)
            except ValueError as e:
                raise ValueError(f"{name}.{e}") from None  # messages start with the field

    def _validate_budget(self) -> None:
        tc = self.train
        try:
            budget_seconds(tc.budget, tc.budget_money, tc.device_hour_price or 1.0, 1)
        except ValueError as e:
            raise ConfigError(f"train.budget: {e}") from None
        if tc.budget_money < 0 or tc.device_hour_price < 0 or tc.budget_warmup_steps < 1:
            raise ConfigError("train.budget_money and train.device_hour_price must be >= 0, "
                              "train.budget_warmup_steps >= 1")
        if tc.budget_money > 0 and tc.device_hour_price <= 0:
            raise ConfigError("train.budget_money needs train.device_hour_price (the price of a device-hour)")
        shares = [stage.budget_share for stage in self.stages]
        if any(share is not None for share in shares) and (None in shares or min(shares) <= 0):
            raise ConfigError("stages[i].budget_share: give every stage a positive share, or none")

    def _validate_stages(self) -> None:
        if not self.stages:
            return
        previous = 0
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if stage.until_step <= previous:
                raise ConfigError(f"{where}.until_step must be larger than the stage before's ({previous})")
            if stage.resolution <= 0 or stage.resolution % self.model.patch_size:
                raise ConfigError(f"model.patch_size {self.model.patch_size} does not divide {where}.resolution "
                                  f"{stage.resolution}")
            if stage.batch_size <= 0:
                raise ConfigError(f"{where}.batch_size must be positive")
            unknown = set(stage.losses or []) - set(self.losses)
            if unknown:
                raise ConfigError(f"{where}.losses: {min(unknown)!r} is not one of {', '.join(self.losses)}")
            previous = stage.until_step
        if previous != self.train.steps:
            raise ConfigError(f"the last stage ends at step {previous}, but train.steps is {self.train.steps}")
        if self.stages[-1].resolution != self.data.resolution:
            raise ConfigError(f"data.resolution ({self.data.resolution}) must be the last stage's resolution "
                              f"({self.stages[-1].resolution}): it is the resolution the model samples at")


# What `pixrun train` runs without a config file, over the dataclasses' defaults (configs/shapes-cpu.yaml writes
# it out): the small model and text tower at twice the base learning rates, Muon for both, taught by the shapes
# world's own feature network (REPA with iREPA's conv projector and spatial normalisation, and a perceptual term on
# x̂₀): what learnt most in 12 minutes on 2 cores (docs/speedrun.md). Its strict scores are measured inside the budget, so
# `make train` ends within 15 min from a fresh clone and shows what was learnt.
DEFAULT_RUN = {
    "model": {"preset": "shapes-cpu"},
    "text": {"width": 128, "heads": 2},
    "optim": {"lr": 1e-3, "muon_lr": 2e-3, "muon_text": True},
    "repa": {"weight": 0.5, "teacher": "shapes", "block": 2, "projector": "conv", "spatial_norm": True},
    "shapes_perceptual": {"weight": 1.0, "max_t": 0.7},
    "train": {"budget": "12m", "steps": 10000},
    "sample": {"cfg_scale": 2.0},
    "eval": {"at_end": True},
}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults (without a file, the built-in default run's), then the YAML file, then `key=value` overrides;
    validated."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    user_set = frozenset(_dotted_keys(raw))
    if path is None:
        raw = _merged(DEFAULT_RUN, raw)
    config = _build_config(_apply_preset(raw))
    config.user_set = user_set
    config.validate()
    return config


def _dotted_keys(raw: dict, prefix: str = "") -> list[str]:
    """The settings a raw config gives, dotted: {"model": {"width": 64}} -> ["model.width"]."""
    keys = []
    for key, value in raw.items():
        name = f"{prefix}{key}"
        keys.extend(_dotted_keys(value, name + ".") if isinstance(value, dict) else [name])
    return keys


def _merged(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if both else value
    return merged


def options_from(cls, items: list[str], where: str):
    """A dataclass of settings from `key=value` strings (YAML values), checked like a config section."""
    raw: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r} is not of the form key=value")
        raw[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return _build(cls, raw, where)


def save_config(config: Config, path: Path) -> None:
    """As a config file writes it: each loss term's section at the top level, each data source's keys in `data:`."""
    raw = dataclasses.asdict(config)
    raw["data"] = data_config.flat(raw["data"])
    raw.update(raw.pop("losses"))
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _build_config(raw: dict) -> Config:
    """Config from a raw mapping, reading each registered loss term's section at the top level (`repa:`) and each
    data source's keys in `data:`."""
    raw = dict(raw)
    losses = default_loss_sections()
    for name, term in LOSS_TERMS.items():
        if name in raw:
            losses[name] = _build(term.config_class, raw.pop(name), name)
    data = _build_data(raw.pop("data", None))
    config = _build(Config, raw, "", nested="losses", registered=tuple(LOSS_TERMS))
    config.losses, config.data = losses, data
    return config


def _build_data(raw) -> DataConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"data must be a mapping, got {raw!r}")
    own, sections = data_config.split_keys(raw)
    keys = tuple(key for source in DATA_SOURCES.values() for key in section_keys(source))
    data = _build(DataConfig, own, "data", nested="sections", registered=keys)
    for name, values in sections.items():
        data.sections[name] = _build(DATA_SOURCES[name].config_class, values, "data")
    return data


def _apply_preset(raw: dict) -> dict:
    """`model: NAME` or `model.preset: NAME` starts the model section from a named preset."""
    model = raw.get("model")
    if isinstance(model, str):
        model = {"preset": model}
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        name = model.pop("preset")
        if name not in PRESETS:
            raise ConfigError(f"model.preset {name!r} is not known (known: {', '.join(PRESETS)})")
        raw = {**raw, "model": {**dataclasses.asdict(PRESETS[name]), **model}}
    return raw


def _set_dotted(raw: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if isinstance(child, str) and part == "model":
            child = node[part] = {"preset": child}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
        node = child
    node[leaf] = value


def _build(cls, raw, where: str, nested: str = "", registered: tuple[str, ...] = ()):
    """`nested`: a field filled by the caller from `registered` keys (loss sections, data sources' keys)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != nested}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {name!r} (known here: {', '.join([*fields, *registered])})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {_coerce(args[0], k, where): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")
