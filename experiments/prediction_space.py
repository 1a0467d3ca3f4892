"""Study 2: x- against eps- and v-prediction in the shapes world at 768 values per patch (64 px, 16-px patches),
all three trained with the v-loss for the same number of steps; compositional score, the v-loss, the held-out
x̂₀ MSE per t-bin, and sample grids.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/prediction_space.py
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import DOCS, compare
from PIL import Image, ImageDraw

RUNS = {"x": ("default", []), "eps": ("pred-eps", ["flow.prediction=eps"]), "v": ("pred-v", ["flow.prediction=v"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()

    rows = compare(RUNS, args.steps, "prediction_space.json")
    plot(rows, args.steps)
    sample_grids(args.steps)


def plot(rows: dict, steps: int) -> None:
    tasks = ["overall", "single_object", "two_object", "counting", "colors", "position", "color_attr"]
    bins = [k for k in next(iter(rows.values())) if k.startswith("mse_t")]
    fig, (scores, mse) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.27
    for i, (prediction, row) in enumerate(rows.items()):
        label = f"{prediction}-prediction (v-loss {row['loss_v']:.3g})"
        scores.bar([k + (i - 1) * width for k in range(len(tasks))], [row[t] for t in tasks], width, label=label)
        mse.bar([k + (i - 1) * width for k in range(len(bins))], [row[b] for b in bins], width, label=label)
    scores.set_xticks(range(len(tasks)), tasks, fontsize=8)
    scores.set_ylabel("accuracy (EMA)")
    scores.legend(fontsize=8)
    mse.set_xticks(range(len(bins)), [b.removeprefix("mse_") for b in bins])
    mse.set_yscale("log")
    mse.set_ylabel("held-out x̂₀ MSE (256 images)")
    fig.suptitle(f"shapes world, 768 values per patch, {steps} steps at batch 64, v-loss: what the network predicts")
    fig.tight_layout()
    fig.savefig(DOCS / "exp_prediction_space.png", dpi=110)


def sample_grids(steps: int) -> None:
    """The runs' own sample grids at `steps` (same prompts and seeds), side by side under a header: x | eps | v."""
    from common import RUNS as RUN_ROOT

    grids = {p: Image.open(RUN_ROOT / name / "samples" / f"step_{steps:07d}.png") for p, (name, _) in RUNS.items()}
    header, gap = 24, 10
    width = sum(g.width for g in grids.values()) + gap * (len(grids) - 1)
    out = Image.new("RGB", (width, header + max(g.height for g in grids.values())), "white")
    draw = ImageDraw.Draw(out)
    x = 0
    for prediction, grid in grids.items():
        draw.text((x + grid.width // 2, 6), f"{prediction}-prediction, step {steps}", fill="black")
        out.paste(grid, (x, header))
        x += grid.width + gap
    out.save(DOCS / "exp_prediction_samples.png")


if __name__ == "__main__":
    main()
