"""Where a run reports: metrics.jsonl, TensorBoard, a progress bar and sample grids."""

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        self.run_dir = run_dir
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=2.0)
        self.window_start = time.perf_counter()
        self.window_images = 0
        self.budget: dict[str, str] = {}

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
        for name, value in record.items():
            if name not in ("step", "time"):
                self.tensorboard.add_scalar(f"train/{name}", value, step + 1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{images_per_s:.1f}", **self.budget)

    def set_total(self, total_steps: int) -> None:
        """A budget's plan moved the last step."""
        if self.bar.total != total_steps:
            self.bar.total = total_steps
            self.bar.refresh()

    def record(self, group: str, values: dict[str, float], step: int) -> None:
        """Evaluation results: `{group}.jsonl` in the run and `{group}/...` in TensorBoard."""
        with open(self.run_dir / f"{group}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        for name, value in values.items():
            self.tensorboard.add_scalar(f"{group}/{name}", value, step)
        self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def image(self, tag: str, path: Path, step: int) -> None:
        self.tensorboard.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        self.tensorboard.close()


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
