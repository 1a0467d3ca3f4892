"""Study 3: the bottleneck patch embedding, Linear(768 -> b) then Linear(b -> width), against none (one
Linear(768 -> width)), for b in 32, 64, 128 (the default), 256, at equal steps: compositional score, training
loss and held-out x̂₀ MSE per t-bin.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bottleneck.py
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import DOCS, compare

# model.bottleneck: null gives the single Linear (so would 0; null says it).
RUNS = {
    "none": ("bottleneck-none", ["model.bottleneck=null"]),
    "32": ("bottleneck-32", ["model.bottleneck=32"]),
    "64": ("bottleneck-64", ["model.bottleneck=64"]),
    "128": ("default", []),
    "256": ("bottleneck-256", ["model.bottleneck=256"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()

    rows = compare(RUNS, args.steps, "bottleneck.json")

    names = list(rows)
    bins = [k for k in rows[names[0]] if k.startswith("mse_t")]
    fig, (score, loss, mse) = plt.subplots(1, 3, figsize=(13, 3.8))
    score.bar(names, [rows[n]["overall"] for n in names], color="tab:blue")
    score.set_ylabel("overall compositional score (EMA)")
    loss.bar(names, [rows[n]["loss_v"] for n in names], color="tab:orange")
    loss.set_ylabel(f"training v-loss, steps {args.steps - 99}-{args.steps}")
    loss.set_ylim(min(r["loss_v"] for r in rows.values()) * 0.95, max(r["loss_v"] for r in rows.values()) * 1.02)
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        mse.bar(
            [k + (i - (len(names) - 1) / 2) * width for k in range(len(bins))],
            [rows[n][b] for b in bins],
            width,
            label=n,
        )
    mse.set_xticks(range(len(bins)), [b.removeprefix("mse_") for b in bins])
    mse.set_yscale("log")
    mse.set_ylabel("held-out x̂₀ MSE (256 images)")
    mse.legend(title="bottleneck", fontsize=7)
    for ax in (score, loss):
        ax.set_xlabel("bottleneck dims (768 values per patch)")
    fig.suptitle(f"shapes world, {args.steps} steps at batch 64: bottleneck patch embedding")
    fig.tight_layout()
    fig.savefig(DOCS / "exp_bottleneck.png", dpi=110)


if __name__ == "__main__":
    main()
