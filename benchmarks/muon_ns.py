"""Muon's Newton-Schulz on a model's block matrices: one matrix at a time against same-shape matrices batched (what
MuonAdamW does), interleaved in one process; also reports how far apart their results are (bf16 rounding only).
With --fp32: both batched in fp32 (CPUs without AMX), the plain iteration against the one on the Gram matrix
that wide matrices take (pixrun.optim.gram_iteration).

    .venv/bin/python benchmarks/muon_ns.py [--preset shapes-cpu] [--threads 2] > benchmarks/muon_ns_cpu.json
    .venv/bin/python benchmarks/muon_ns.py --fp32 > benchmarks/muon_ns_fp32_cpu.json

The CPU may be shared with other jobs: each mode's figure is its best round, and the rounds alternate so that
drift hits both alike.
"""

import argparse
import json
import math
import time
from collections import Counter

import torch

import pixrun.optim
from pixrun.bench import environment
from pixrun.model import PRESETS, Denoiser
from pixrun.optim import BLOCK_MATRIX, orthogonalize, same_shape_chunks
from pixrun.runtime import cpu_has_amx

ROUNDS, REPEATS, NS_STEPS = 5, 5, 5


def block_matrices(preset: str) -> list[torch.Tensor]:
    with torch.device("meta"):
        model = Denoiser(PRESETS[preset])
    shapes = [p.shape for name, p in model.named_parameters() if p.dim() == 2 and BLOCK_MATRIX.search(name)]
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def one_at_a_time(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    return [orthogonalize(m, NS_STEPS) for m in matrices]


def batched(matrices: list[torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    out: list[torch.Tensor] = [None] * len(matrices)
    for indices in same_shape_chunks(matrices):
        for i, ortho in zip(indices, orthogonalize(torch.stack([matrices[i] for i in indices]), NS_STEPS, dtype)):
            out[i] = ortho
    return out


def fp32_plain(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    ratio, pixrun.optim.GRAM_ITERATION_RATIO = pixrun.optim.GRAM_ITERATION_RATIO, math.inf  # no matrix is that wide
    try:
        return batched(matrices, torch.float32)
    finally:
        pixrun.optim.GRAM_ITERATION_RATIO = ratio


def fp32_gram(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    return batched(matrices, torch.float32)


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
    parser.add_argument("--fp32", action="store_true", help="fp32: the plain iteration against the Gram one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    matrices = block_matrices(args.preset)
    modes = {"plain": fp32_plain, "gram": fp32_gram} if args.fp32 else {"one_at_a_time": one_at_a_time,
                                                                         "batched": batched}
    (first, a_fn), (second, b_fn) = modes.items()
    difference = max(
        float((a.float() - b.float()).norm() / a.float().norm()) for a, b in zip(a_fn(matrices), b_fn(matrices))
    )
    rounds = {mode: [] for mode in modes}
    for _ in range(ROUNDS):
        for mode, fn in modes.items():
            rounds[mode].append(best_ms(fn, matrices))
    best = {mode: min(times) for mode, times in rounds.items()}
    print(json.dumps({
        **environment("muon_ns", torch.device("cpu"), bf16=not args.fp32),
        "cpu_has_amx": cpu_has_amx(),
        "precision": "fp32" if args.fp32 else "bf16",  # Newton-Schulz casts itself, no autocast
        "preset": args.preset,
        "matrices": {"x".join(map(str, shape)): n for shape, n in Counter(tuple(m.shape) for m in matrices).items()},
        "ns_steps": NS_STEPS,
        "max_relative_difference": round(difference, 5),  # Frobenius, per matrix
        "ms_per_optimizer_step": {mode: round(ms, 2) for mode, ms in best.items()},
        "rounds_ms": {mode: [round(t, 2) for t in times] for mode, times in rounds.items()},
        f"{second}_vs_{first}": round(best[second] / best[first], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
