"""Where a run reports: metrics.jsonl, TensorBoard, W&B (optional), a progress bar and sample grids."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw
from tqdm import tqdm

from pixrun.errors import ConfigError

WANDB_MODES = ("online", "offline", "disabled")
WANDB_RUN_FILE = "wandb.json"  # the W&B run id, so that a resumed run continues the same W&B run


@dataclass
class LogConfig:
    tensorboard: bool = True  # run_dir/tensorboard
    wandb: bool = False  # Weights & Biases beside TensorBoard: the same scalars, sample grids and metrics
    wandb_project: str = "pixrun"
    wandb_entity: str = ""  # "": the account's default entity
    wandb_mode: str = "online"  # online | offline (files under run_dir/wandb, `wandb sync` them later) | disabled
    wandb_name: str = ""  # "": the run folder's name

    def validate(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"log.wandb_mode must be one of {', '.join(WANDB_MODES)}, got {self.wandb_mode!r}")
        if self.wandb and not self.wandb_project:
            raise ValueError("log.wandb_project must not be empty when log.wandb is on")


def start_wandb(config: LogConfig, run_dir: Path, start_step: int):
    """The W&B run: a new one for a run from step 0, the one in run_dir/wandb.json for a resumed run. W&B keeps
    steps increasing only: the steps a resumed run repeats (logged after its last checkpoint) keep their first
    values there, where TensorBoard drops them."""
    try:  # here: wandb is optional, and slow to import
        import wandb
    except ImportError:
        raise ConfigError("log.wandb needs wandb, which is not installed: pip install 'pixrun[wandb]'") from None
    id_file = run_dir / WANDB_RUN_FILE
    resumed_id = json.loads(id_file.read_text())["id"] if start_step > 0 and id_file.exists() else None
    config_file = run_dir / "config.yaml"  # the run's settings, shown beside its charts
    run = wandb.init(
        project=config.wandb_project,
        entity=config.wandb_entity or None,
        name=config.wandb_name or run_dir.resolve().name,
        mode=config.wandb_mode,
        id=resumed_id,
        resume="allow" if resumed_id else None,
        dir=str(run_dir),
        config=yaml.safe_load(config_file.read_text()) if config_file.exists() else None,
        allow_val_change=True,  # a resumed run may change train.steps and the like
    )
    id_file.write_text(json.dumps({"id": run.id}) + "\n")
    return run


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, config: LogConfig | None = None):
        config = config or LogConfig()
        self.run_dir = run_dir
        self.metrics = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 -- open for the run, closed by close()
        self.tensorboard = None
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
        self.wandb = start_wandb(config, run_dir, start_step) if config.wandb else None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=2.0)
        self.window_start = time.perf_counter()
        self.window_images = 0
        self.budget: dict[str, str] = {}

    def scalars(self, values: dict[str, float], step: int) -> None:
        """`values` by their full names (`train/loss`) to TensorBoard and W&B."""
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def step(self, step: int, values: dict[str, float], images: int, budget: dict[str, str] | None = None) -> None:
        """A finished step of `images` images; `values` (empty between log steps) go to the logs; `budget`: what
        the bar shows of a budgeted run (used, time left, money spent)."""
        self.bar.update(1)
        if budget is not None:
            self.budget = budget
        self.window_images += images
        if not values:
            return
        elapsed = time.perf_counter() - self.window_start
        images_per_s = self.window_images / max(elapsed, 1e-9)
        self.window_start, self.window_images = time.perf_counter(), 0
        record = {"step": step + 1, **values, "images_per_s": images_per_s, "time": time.time()}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        self.scalars({f"train/{name}": value for name, value in record.items() if name not in ("step", "time")},
                     step + 1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{images_per_s:.1f}", **self.budget)

    def set_total(self, total_steps: int) -> None:
        """A budget's plan moved the last step."""
        if self.bar.total != total_steps:
            self.bar.total = total_steps
            self.bar.refresh()

    def record(self, group: str, values: dict[str, float], step: int) -> None:
        """Evaluation results: `{group}.jsonl` in the run and `{group}/...` in TensorBoard and W&B."""
        with open(self.run_dir / f"{group}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        self.scalars({f"{group}/{name}": value for name, value in values.items()}, step)
        self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def image(self, tag: str, path: Path, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_grid(images: np.ndarray, prompts: list[str], columns: int, path: Path, scale: int = 2) -> None:
    """uint8 (N, H, W, 3) with N = len(prompts) * columns, row-major by prompt, labelled with its prompt."""
    n, h, w, _ = images.shape
    h, w = h * scale, w * scale
    label_w = 8 + 6 * max(len(p) for p in prompts)
    grid = Image.new("RGB", (label_w + columns * (w + 2), len(prompts) * (h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        row, col = divmod(i, columns)
        tile = Image.fromarray(images[i]).resize((w, h), Image.NEAREST)
        grid.paste(tile, (label_w + col * (w + 2), row * (h + 2)))
    for row, prompt in enumerate(prompts):
        draw.text((4, row * (h + 2) + h // 2 - 5), prompt, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
