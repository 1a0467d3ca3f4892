"""Study 4: time to a compositional score of 0.5 for the default config (Muon), and how it moves with batch size and
learning rate. Each run keeps a checkpoint every 32 k images; those from 128 k images on are scored (and any earlier
one scored before). Time is the number of steps to a score times the variant's step time, measured by `pixrun bench`
on both cores with the variants' rounds interleaved, so contention while the runs trained does not enter it.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/time_to_score.py train VARIANT   # one run (two side by side)
    OMP_NUM_THREADS=1 .venv/bin/python experiments/time_to_score.py score VARIANT   # its checkpoints
    .venv/bin/python experiments/time_to_score.py report                            # bench, table, plot
"""

import argparse
import json
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import DOCS, PIXRUN, ROOT, RUNS, checkpoint_steps, evaluate, is_scored, machine, train_run, write_json

from pixrun.config import load_config

CHECKPOINT_IMAGES = 32_000
FIRST_SCORED_IMAGES = 128_000
BASE_LR, BASE_MUON_LR = 5e-4, 1e-3


def muon(batch: int = 64, lr_factor: float = 1.0) -> list[str]:
    return [
        "optim.name=muon",
        f"optim.lr={BASE_LR * lr_factor:g}",
        f"optim.muon_lr={BASE_MUON_LR * lr_factor:g}",
        f"train.batch_size={batch}",
        f"train.checkpoint_every={CHECKPOINT_IMAGES // batch}",
    ]


# variant: (run folder, overrides, steps). "adamw" is the default before Muon (the runs of studies 2 and 3).
VARIANTS = {
    "adamw": ("default", ["optim.name=adamw", "train.batch_size=64"], 2500),
    "muon": ("muon", muon(), 4000),
    "muon batch 32": ("muon-batch32", muon(batch=32), 6000),
    "muon batch 128": ("muon-batch128", muon(batch=128), 2000),
    "muon lr x0.5": ("muon-lr0.5x", muon(lr_factor=0.5), 4000),
    "muon lr x2": ("muon-lr2x", muon(lr_factor=2.0), 4000),
}
THRESHOLDS = (0.5, 0.4)
BENCH_ROUNDS = 3


def batch_size(overrides: list[str]) -> int:
    return load_config(ROOT / "configs" / "shapes-cpu.yaml", overrides).train.batch_size


def scored_steps(variant: str) -> list[int]:
    name, overrides, steps = VARIANTS[variant]
    batch = batch_size(overrides)
    every = CHECKPOINT_IMAGES // batch
    return [
        s for s in checkpoint_steps(RUNS / name)
        if s <= steps and s % every == 0 and (FIRST_SCORED_IMAGES <= s * batch or is_scored(RUNS / name, s))
    ]


def score(variant: str) -> list[dict]:
    name, overrides, _ = VARIANTS[variant]
    batch = batch_size(overrides)
    return [{"step": s, "images": s * batch, **evaluate(RUNS / name, s)} for s in scored_steps(variant)]


def step_seconds(variants: list[str]) -> dict[str, float]:
    """Each variant's training step on both cores (median of `pixrun bench`), rounds interleaved across variants."""
    times = {v: [] for v in variants}
    for _ in range(BENCH_ROUNDS):
        for variant in variants:
            overrides = VARIANTS[variant][1]
            command = [PIXRUN, "bench", str(ROOT / "configs" / "shapes-cpu.yaml"), *overrides, "--steps", "10", "--json"]
            out = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True).stdout
            times[variant].append(json.loads(out)["step_ms"] / 1000)
    return {v: sorted(t)[len(t) // 2] for v, t in times.items()}


def first_reaching(points: list[dict], threshold: float, key: str) -> float | None:
    """The first scored checkpoint at or above `threshold` (None: not reached)."""
    return next((p[key] for p in points if p["overall"] >= threshold), None)


def report() -> None:
    variants = [v for v in VARIANTS if scored_steps(v)]
    seconds = step_seconds(variants)
    curves = {}
    for variant in variants:
        points = [{**p, "minutes": p["step"] * seconds[variant] / 60} for p in score(variant)]
        curves[variant] = {
            "run": VARIANTS[variant][0],
            "overrides": VARIANTS[variant][1],
            "step_seconds": seconds[variant],
            "points": points,
            **{f"{key}_to_{t}": first_reaching(points, t, key) for t in THRESHOLDS for key in ("step", "images", "minutes")},
        }
    write_json("time_to_score.json", {"machine": {**machine(), "bench_threads": 2}, "curves": curves})

    fig, (by_images, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for variant, curve in curves.items():
        points = curve["points"]
        style = "s--" if variant == "adamw" else "o-"
        by_images.plot([p["images"] / 1000 for p in points], [p["overall"] for p in points], style, label=variant)
        by_time.plot([p["minutes"] for p in points], [p["overall"] for p in points], style, label=variant)
    for ax in (by_images, by_time):
        for t in THRESHOLDS:
            ax.axhline(t, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    by_images.set_xlabel("training images (thousands)")
    by_time.set_xlabel("training minutes (steps x bench step time, 2 CPU cores)")
    by_images.set_ylabel("overall compositional score (EMA)")
    by_time.legend(fontsize=8)
    fig.suptitle("time to score: the default (64 px, 768 values per patch), batch size and learning rate varied")
    fig.tight_layout()
    fig.savefig(DOCS / "exp_time_to_score.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["train", "score", "report"])
    parser.add_argument("variant", nargs="?", choices=list(VARIANTS))
    args = parser.parse_args()
    if args.action == "report":
        report()
        return
    if args.variant is None:
        parser.error(f"{args.action} needs a variant")
    name, overrides, steps = VARIANTS[args.variant]
    if args.action == "train":
        train_run(name, overrides, steps)
    else:
        for point in score(args.variant):
            print(json.dumps({k: point[k] for k in ("step", "images", "overall")}))


if __name__ == "__main__":
    main()
