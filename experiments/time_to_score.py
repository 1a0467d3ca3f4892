"""Study 4: time to a compositional score of 0.5 for the default config, and how it moves with batch size and
learning rate. Each run keeps a checkpoint every 250 steps; every checkpoint is scored; time is the training
time of the steps up to it (1 thread), from the run's own measured images/s.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/time_to_score.py [--steps 2500] [--variants default lr1e-3 ...]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import DOCS, checkpoint_steps, evaluate, machine, train_run, training_seconds, write_json

VARIANTS = {
    "default": ("default", []),  # batch 64, lr 5e-4
    "batch32": ("batch32", ["train.batch_size=32"]),
    "batch128": ("batch128", ["train.batch_size=128"]),
    "lr2.5e-4": ("lr2.5e-4", ["optim.lr=2.5e-4"]),
    "lr1e-3": ("lr1e-3", ["optim.lr=1e-3"]),
}
THRESHOLDS = (0.5, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()

    curves = {}
    for variant in args.variants:
        name, overrides = VARIANTS[variant]
        run_dir = train_run(name, overrides, args.steps)
        points = []
        for step in (s for s in checkpoint_steps(run_dir) if s <= args.steps):
            scores = evaluate(run_dir, step)
            points.append({"step": step, "seconds": training_seconds(run_dir, step), **scores})
        curves[variant] = {
            "run": name,
            "overrides": overrides,
            "points": points,
            **{f"seconds_to_{t}": first_reaching(points, t, "seconds") for t in THRESHOLDS},
            **{f"steps_to_{t}": first_reaching(points, t, "step") for t in THRESHOLDS},
        }
    write_json("time_to_score.json", {"steps": args.steps, "machine": machine(), "curves": curves})

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for variant, curve in curves.items():
        points = curve["points"]
        by_step.plot([p["step"] for p in points], [p["overall"] for p in points], "o-", label=variant)
        by_time.plot([p["seconds"] / 60 for p in points], [p["overall"] for p in points], "o-", label=variant)
    for ax in (by_step, by_time):
        for t in THRESHOLDS:
            ax.axhline(t, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training minutes (1 CPU thread)")
    by_step.set_ylabel("overall compositional score (EMA)")
    by_time.legend()
    fig.suptitle("time to score: default config (64 px, 768 values per patch), checkpoints every 250 steps")
    fig.tight_layout()
    fig.savefig(DOCS / "exp_time_to_score.png", dpi=110)


def first_reaching(points: list[dict], threshold: float, key: str) -> float | None:
    """The first checkpoint scoring at least `threshold` (None: not reached)."""
    return next((p[key] for p in points if p["overall"] >= threshold), None)


if __name__ == "__main__":
    main()
