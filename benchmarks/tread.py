"""What TREAD saves: the denoiser's training FLOPs routed / dense (counted by pixrun.flops), and the measured
forward + backward time routed / dense on the CPU default's denoiser, dense and routed interleaved in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tread.py > benchmarks/tread_cpu.json

The measurement covers the denoiser alone (text embeddings are random inputs), with the recipe's routing (50 % of
image tokens around blocks 1 .. depth-2). The CPU may be shared with other jobs: each mode's figure is its best
round, and the rounds alternate so that drift hits both alike.
"""

import json
import platform
import time

import torch

from pixrun.flops import denoiser_flops
from pixrun.model import PRESETS, Denoiser, TokenRouting

BATCH, RESOLUTION, TEXT_TOKENS = 64, 64, 16  # the CPU default's batch and resolution; shapes captions are short
WARMUP, MEASURED, ROUNDS = 2, 5, 5
RECIPE = TokenRouting(enabled=True)


def flop_ratios() -> dict[str, float]:
    cases = {  # (preset, resolution, text tokens)
        "shapes-cpu_64px": ("shapes-cpu", RESOLUTION, TEXT_TOKENS),
        "prx-small-pixel_512px": ("prx-small-pixel", 512, 256),
        "prx-small-pixel_1024px": ("prx-small-pixel", 1024, 256),
    }
    ratios = {}
    for name, (preset, res, text) in cases.items():
        model = PRESETS[preset]
        routed = denoiser_flops(model, res, text, RECIPE)[0]
        ratios[name] = round(routed / denoiser_flops(model, res, text)[0], 3)
    return ratios


def measure_step_ratio() -> dict:
    torch.manual_seed(0)
    model = Denoiser(PRESETS["shapes-cpu"])
    for p in model.parameters():  # zero-initialised layers would make the backward unrepresentatively cheap
        torch.nn.init.normal_(p, std=0.02)
    c = model.config
    x = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION)
    t, txt = torch.rand(BATCH), torch.randn(BATCH, TEXT_TOKENS, c.context_dim)
    tokens = (RESOLUTION // c.patch_size) ** 2
    generators = [torch.Generator().manual_seed(i) for i in range(BATCH)]

    def step(routed: bool) -> None:
        plan = model.plan_routing(RECIPE, tokens, generators, "cpu") if routed else None
        model(x, t, txt, routing=plan).square().mean().backward()
        model.zero_grad(set_to_none=True)

    seconds = {"dense": [], "routed": []}
    for _ in range(ROUNDS):
        for name, rounds in seconds.items():
            for _ in range(WARMUP):
                step(name == "routed")
            start = time.perf_counter()
            for _ in range(MEASURED):
                step(name == "routed")
            rounds.append((time.perf_counter() - start) / MEASURED)
    best = {name: min(values) for name, values in seconds.items()}
    return {
        "step_ms": {name: round(1000 * s, 1) for name, s in best.items()},
        "all_rounds_ms": {name: [round(1000 * s, 1) for s in values] for name, values in seconds.items()},
        "routed_over_dense": round(best["routed"] / best["dense"], 3),
        "image_tokens": tokens,
        "kept_tokens_in_routed_blocks": tokens - int(RECIPE.fraction * tokens),
        "routed_blocks": list(RECIPE.blocks(c.depth)),
    }


def main() -> None:
    torch.set_num_threads(1)
    print(json.dumps({
        "what": "denoiser forward+backward, routed (TREAD, recipe settings) over dense",
        "routing": {"fraction": RECIPE.fraction, "start": RECIPE.start, "end": RECIPE.end},
        "flop_ratio_routed_over_dense": flop_ratios(),
        "measured_cpu_shapes-cpu": {"batch": BATCH, "resolution": RESOLUTION, "text_tokens": TEXT_TOKENS,
                                    **measure_step_ratio()},
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "note": "2-core CPU shared with other jobs while measured: best of interleaved rounds",
    }, indent=1))


if __name__ == "__main__":
    main()
