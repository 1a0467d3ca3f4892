"""The shapes world's batches rendered in a background thread during the step before (what ShapesSource does) against
rendered inside the step, on the built-in default: one trainer, the two modes' rounds interleaved.

    .venv/bin/python benchmarks/shapes_prefetch.py [--threads 2] [--rounds 6] > benchmarks/shapes_prefetch_cpu.json

Each mode's figure is the median of its rounds' mean step time; the rounds alternate so that drift hits both alike.
"""

import argparse
import json
import tempfile
import time

import torch

from pixrun.bench import environment
from pixrun.config import load_config
from pixrun.data.source import LocalBatch
from pixrun.train import Trainer

STEPS_PER_ROUND, WARMUP = 10, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config("configs/shapes-cpu.yaml", [f"train.threads={args.threads}"])
    times: dict[str, list[float]] = {"prefetch": [], "inline": []}
    with tempfile.TemporaryDirectory() as run_dir:
        config.run_dir = run_dir
        trainer = Trainer(config)
        source = trainer.source
        modes = {
            "prefetch": source.batch,
            "inline": lambda step, stage, _: LocalBatch(*source._render(step, stage.batch_size, stage.resolution)),
        }
        step = 0
        for _ in range(WARMUP):
            trainer.step(step)
            step += 1
        for round_ in range(args.rounds):
            for mode in sorted(modes, reverse=round_ % 2 == 1):
                source.batch = modes[mode]
                trainer.step(step)  # the switch: prefetch starts its look-ahead here
                step += 1
                start = time.perf_counter()
                for _ in range(STEPS_PER_ROUND):
                    trainer.step(step)
                    step += 1
                times[mode].append(1000 * (time.perf_counter() - start) / STEPS_PER_ROUND)
        trainer.close()
    median = {mode: sorted(t)[len(t) // 2] for mode, t in times.items()}
    print(json.dumps({
        **environment("shapes batch prefetch", trainer.device, trainer.bf16),
        "batch_size": config.train.batch_size,
        "resolution": config.data.resolution,
        "step_ms": median,
        "prefetch_over_inline": median["prefetch"] / median["inline"],
        "rounds_ms": times,
    }, indent=1))


if __name__ == "__main__":
    main()
