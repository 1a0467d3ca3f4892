"""Muon's Newton-Schulz on a model's block matrices: one matrix at a time against same-shape matrices batched (what
MuonAdamW does), interleaved in one process; also reports how far apart their results are (bf16 rounding only).

    .venv/bin/python benchmarks/muon_ns.py [--preset shapes-cpu] [--threads 2] > benchmarks/muon_ns_cpu.json

The CPU may be shared with other jobs: each mode's figure is its best round, and the rounds alternate so that
drift hits both alike.
"""

import argparse
import json
import time
from collections import Counter

import torch

from pixrun.bench import environment
from pixrun.model import PRESETS, Denoiser
from pixrun.optim import BLOCK_MATRIX, orthogonalize, same_shape_chunks

ROUNDS, REPEATS, NS_STEPS = 5, 5, 5


def block_matrices(preset: str) -> list[torch.Tensor]:
    with torch.device("meta"):
        model = Denoiser(PRESETS[preset])
    shapes = [p.shape for name, p in model.named_parameters() if p.dim() == 2 and BLOCK_MATRIX.search(name)]
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def one_at_a_time(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    return [orthogonalize(m, NS_STEPS) for m in matrices]


def batched(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = [None] * len(matrices)
    for indices in same_shape_chunks(matrices):
        for i, ortho in zip(indices, orthogonalize(torch.stack([matrices[i] for i in indices]), NS_STEPS)):
            out[i] = ortho
    return out


def best_ms(fn, matrices) -> float:
    fn(matrices)
    start = time.perf_counter()
    for _ in range(REPEATS):
        fn(matrices)
    return (time.perf_counter() - start) / REPEATS * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="shapes-cpu", choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    matrices = block_matrices(args.preset)
    difference = max(
        float((a.float() - b.float()).norm() / a.float().norm())
        for a, b in zip(one_at_a_time(matrices), batched(matrices))
    )
    rounds = {"one_at_a_time": [], "batched": []}
    for _ in range(ROUNDS):
        rounds["one_at_a_time"].append(best_ms(one_at_a_time, matrices))
        rounds["batched"].append(best_ms(batched, matrices))
    best = {mode: min(times) for mode, times in rounds.items()}
    print(json.dumps({
        **environment("muon_ns", torch.device("cpu"), bf16=True),
        "precision": "bf16",  # Newton-Schulz casts to bf16 itself, no autocast
        "preset": args.preset,
        "matrices": {"x".join(map(str, shape)): n for shape, n in Counter(tuple(m.shape) for m in matrices).items()},
        "ns_steps": NS_STEPS,
        "max_relative_difference": round(difference, 5),  # Frobenius, per matrix
        "ms_per_optimizer_step": {mode: round(ms, 2) for mode, ms in best.items()},
        "rounds_ms": {mode: [round(t, 2) for t in times] for mode, times in rounds.items()},
        "batched_vs_one_at_a_time": round(best["batched"] / best["one_at_a_time"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
