"""Training-step time of a config under each precision mode, measured side by side in one process.

    .venv/bin/python benchmarks/step_time.py [CONFIG] [key=value ...] > benchmarks/step_time_cpu.json

Modes: fp32; bf16 autocast with torch's default attention kernel; and what pixrun does on CPU (bf16 autocast
where bf16 is fast, math attention kernel). Prints one JSON object.
"""

import json
import platform
import sys
import time
from contextlib import ExitStack

import torch

from pixrun.config import load_config
from pixrun.optim import build_optimizer
from pixrun.pipeline import Pipeline, build_world
from pixrun.runtime import bf16_is_fast, compute_context
from pixrun.text import TextTower

WARMUP, MEASURED, ROUNDS = 3, 10, 3


def autocast_only(device):
    stack = ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


def main(args: list[str]) -> None:
    path = args[0] if args and "=" not in args[0] else None
    config = load_config(path, args[1:] if path else args)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = torch.device("cpu")
    world = build_world(config)
    pipeline = Pipeline.from_config(config, TextTower.build(config.text, world.vocabulary()))
    params = {f"{owner}.{name}": p for owner, module in pipeline.trained_modules().items()
              for name, p in module.named_parameters()}
    optimizer = build_optimizer(params, config.optim)
    b, res = config.train.batch_size, config.data.resolution
    images, captions = world.batch(0, 0, b, res)
    x0 = images.float() / 127.5 - 1
    flow = pipeline.flow

    def step(context) -> None:
        t = flow.sample_t(b)
        eps = torch.randn_like(x0)
        x_t = flow.add_noise(x0, eps, t)
        with context:
            pred = pipeline.denoiser(x_t, t, *pipeline.text_tower(captions))
        loss = flow.loss(pred, x0, eps, x_t, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    modes = {
        "fp32": lambda: ExitStack(),
        "bf16_autocast_default_attention": lambda: autocast_only(device),
        "pixrun_cpu_default": lambda: compute_context(device, "auto"),
    }
    seconds = {name: [] for name in modes}
    for _ in range(ROUNDS):  # interleaved, so drift on a shared machine hits every mode alike
        for name, make in modes.items():
            for _ in range(WARMUP):
                step(make())
            start = time.perf_counter()
            for _ in range(MEASURED):
                step(make())
            seconds[name].append((time.perf_counter() - start) / MEASURED)
    best = {name: min(values) for name, values in seconds.items()}
    print(json.dumps({
        "config": path or "built-in default",
        "overrides": args[1:] if path else args,
        "batch_size": b,
        "resolution": res,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "bf16_is_fast_here": bf16_is_fast(device),
        "torch": torch.__version__,
        "step_ms": {name: round(1000 * s, 1) for name, s in best.items()},
        "images_per_s": {name: round(b / s, 1) for name, s in best.items()},
        "speedup_vs_fp32": {name: round(best["fp32"] / s, 2) for name, s in best.items()},
    }, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
