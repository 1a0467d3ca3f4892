"""Where one training step's time goes: torch.profiler over a few steps of a config, after warm-up steps, grouped
into the denoiser's and text tower's matmuls, Muon's Newton-Schulz, the rest of the optimizer step, and everything
else. Prints one JSON object (shares of the profiled CPU time, and the top operators).

    .venv/bin/python benchmarks/profile_step.py [CONFIG] [key=value ...] [--steps 3] [--warmup 3]
"""

import argparse
import json
import platform
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from pixrun.config import load_config
from pixrun.runtime import cpu_has_amx
from pixrun.train import Trainer

MATMULS = ("aten::mm", "aten::addmm")
NEWTON_SCHULZ = ("aten::bmm", "aten::baddbmm")  # only Muon's orthogonalisation runs batched products here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("args", nargs="*", help="[CONFIG] [key=value ...]")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    path = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = [a for a in args.args if "=" in a]
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(path, [f"run_dir={run_dir}", "train.budget=", *overrides])
        trainer = Trainer(config)
        for step in range(args.warmup):
            trainer.step(step)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in range(args.warmup, args.warmup + args.steps):
                trainer.step(step)
        trainer.close()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
    by_name = {e.key: e.self_cpu_time_total for e in events}
    matmuls = sum(by_name.get(name, 0) for name in MATMULS)
    newton_schulz = sum(by_name.get(name, 0) for name in NEWTON_SCHULZ)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    print(json.dumps({
        "config": path, "overrides": overrides, "steps": args.steps, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "amx": cpu_has_amx(), "profiled_ms_per_step": total / args.steps / 1e3,
        "shares": {"matmuls": matmuls / total, "newton_schulz": newton_schulz / total,
                   "optimizer_step": optimizer / total, "other": 1 - (matmuls + newton_schulz) / total},
        "top": {e.key: round(e.self_cpu_time_total / total, 4) for e in top},
    }, indent=1))


if __name__ == "__main__":
    main()
