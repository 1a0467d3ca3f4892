"""Study 1: JiT's toy. A 2-D spiral is embedded in D dimensions by a random orthonormal D x 2 matrix; a 5-layer
ReLU MLP (256 hidden) on (x_t, t) predicts x, eps or v and is trained with the v-loss, through pixrun's own
Flow (noise, conversions, loss) and Euler sampler. Samples are projected back to 2-D. Where the data is a
2-D plane in a high-dimensional space, predicting the clean point (which lies on the plane) stays easy,
while predicting the noise or the velocity (which fill all D dimensions) gets harder as D grows.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/jit_toy.py      # about 2.5 minutes on one thread
"""

import argparse
import math
import time
from itertools import pairwise

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from common import DOCS, machine, one_thread, write_json
from torch import nn

from pixrun.flow import Flow, FlowConfig, sampling_times
from pixrun.sampler import sample_euler

DIMS = (2, 8, 16, 512)
PREDICTIONS = ("x", "eps", "v")


def spiral(n: int, generator: torch.Generator) -> torch.Tensor:
    """Points on a two-turn spiral with a little jitter, scaled to about unit variance."""
    angle = 4 * math.pi * torch.rand(n, generator=generator).sqrt()
    radius = angle / (4 * math.pi)
    points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    points = points + 0.02 * torch.randn(n, 2, generator=generator)
    return points / 0.55


def random_embedding(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A D x 2 matrix with orthonormal columns: x = z @ P.T puts the 2-D data on a plane in D dimensions."""
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator))
    return q


class MLP(nn.Module):
    """Five Linear layers with ReLU between them; the input is x_t with t appended."""

    def __init__(self, dim: int, hidden: int = 256, layers: int = 5):
        super().__init__()
        sizes = [dim + 1] + [hidden] * (layers - 1) + [dim]
        blocks = []
        for i, (a, b) in enumerate(pairwise(sizes)):
            blocks.append(nn.Linear(a, b))
            if i < layers - 1:
                blocks.append(nn.ReLU())
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


def toy_flow(prediction: str) -> Flow:
    # JiT's toy t-distribution (logit-normal, mu -0.8 in its t = 1 clean convention, so +0.8 here), no shift.
    return Flow(FlowConfig(prediction=prediction, loss="v", t_mu=0.8, t_sigma=0.8, t_shift=1.0, uniform_fraction=0.0))


def train(dim: int, prediction: str, embedding: torch.Tensor, steps: int, batch: int, seed: int) -> MLP:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, flow = MLP(dim), toy_flow(prediction)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        x0 = spiral(batch, generator) @ embedding.T
        eps = torch.randn(x0.shape, generator=generator)
        t = flow.sample_t(batch, generator)
        x_t = flow.add_noise(x0, eps, t)
        loss = flow.loss(model(x_t, t), x0, eps, x_t, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model


@torch.no_grad()
def sample(model: MLP, prediction: str, dim: int, n: int, steps: int, seed: int) -> torch.Tensor:
    flow = toy_flow(prediction)
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))

    def x0_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow.to_x0(model(x, t), x, t)

    return sample_euler(x0_fn, noise, sampling_times(steps, 1.0), flow)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Mean 1-D Wasserstein-1 distance over random directions (equal-size sets: sort and compare)."""
    directions = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(seed))
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, pb = (a @ directions).sort(dim=0).values, (b @ directions).sort(dim=0).values
    return float((pa - pb).abs().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--sample-steps", type=int, default=50)
    args = parser.parse_args()
    one_thread()

    reference = spiral(args.samples, torch.Generator().manual_seed(123))
    rows, samples_2d = [], {}
    start = time.perf_counter()
    for dim in DIMS:
        embedding = random_embedding(dim, torch.Generator().manual_seed(dim))
        for prediction in PREDICTIONS:
            model = train(dim, prediction, embedding, args.steps, args.batch, seed=0)
            generated = sample(model, prediction, dim, args.samples, args.sample_steps, seed=1)
            on_plane = generated @ embedding  # back to 2-D
            off_plane = (generated - on_plane @ embedding.T).norm(dim=1)
            finite = bool(torch.isfinite(generated).all())
            # Distance to the nearest data point in D dimensions: off the plane, then within it.
            in_plane = torch.cdist(on_plane, reference).min(dim=1).values
            to_data = (off_plane.pow(2) + in_plane.pow(2)).sqrt()
            rows.append(
                {
                    "dim": dim,
                    "prediction": prediction,
                    "mean_distance_to_data": float(to_data.mean()) if finite else None,
                    "sliced_w1_2d": sliced_wasserstein(on_plane, reference) if finite else None,
                    "off_plane_rms": float(off_plane.pow(2).mean().sqrt()) if finite else None,
                }
            )
            samples_2d[(dim, prediction)] = on_plane
            print(
                f"D={dim:4d} {prediction:>3}-pred: "
                + ", ".join(f"{k} {v:.3g}" for k, v in rows[-1].items() if isinstance(v, float))
                + f" ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    fresh = spiral(args.samples, torch.Generator().manual_seed(7))
    write_json(
        "jit_toy.json",
        {
            "steps": args.steps,
            "batch": args.batch,
            "samples": args.samples,
            "sample_steps": args.sample_steps,
            # The floor of both numbers: a fresh draw of the data itself.
            "data_vs_data": {
                "sliced_w1_2d": sliced_wasserstein(fresh, reference),
                "mean_distance_to_data": float(torch.cdist(fresh, reference).min(dim=1).values.mean()),
            },
            "seconds": time.perf_counter() - start,
            "machine": machine(),
            "rows": rows,
        },
    )
    plot(samples_2d, rows, reference)


def plot(samples_2d: dict, rows: list[dict], reference: torch.Tensor) -> None:
    scores = {(r["dim"], r["prediction"]): r for r in rows}
    fig, axes = plt.subplots(len(PREDICTIONS), len(DIMS), figsize=(3 * len(DIMS), 3 * len(PREDICTIONS)))
    for i, prediction in enumerate(PREDICTIONS):
        for j, dim in enumerate(DIMS):
            ax = axes[i, j]
            points = samples_2d[(dim, prediction)].clamp(-3, 3)
            ax.scatter(reference[:, 0], reference[:, 1], s=1, color="lightgrey")
            ax.scatter(points[:, 0], points[:, 1], s=1, color="tab:blue")
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_xticks([])
            ax.set_yticks([])
            row = scores[(dim, prediction)]
            numbers = (
                "not finite"
                if row["mean_distance_to_data"] is None
                else (f"dist {row['mean_distance_to_data']:.3g}, SW1 {row['sliced_w1_2d']:.3g}")
            )
            ax.set_title(f"D={dim}, {prediction}-pred: {numbers}", fontsize=8)
    fig.suptitle("JiT's toy through pixrun.flow: v-loss, Euler; grey = data, blue = samples projected to 2-D")
    fig.tight_layout()
    fig.savefig(DOCS / "exp_jit_toy.png", dpi=100)


if __name__ == "__main__":
    main()
