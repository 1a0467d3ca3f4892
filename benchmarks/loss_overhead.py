"""Step-time cost of each recipe extra on the CPU default: LPIPS, P-DINO, REPA, TREAD, Muon, and all of them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loss_overhead.py --batch 16 --rounds 3 > benchmarks/loss_overhead_cpu.json

Each variant is a full training step (`Trainer.step`) of configs/shapes-cpu.yaml at the given batch, timed in
interleaved rounds in one process (the median per variant), and reported as a ratio to the plain step. The loss
networks have their real architectures (VGG16; DINOv2 ViT-B/14 with registers) with random weights, so the cost
is the real one even where no weights can be downloaded.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from pixrun.config import load_config
from pixrun.train import Trainer


def random_dinov2(folder: Path) -> str:
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, num_register_tokens=4)
    transformers.Dinov2WithRegistersModel(config).save_pretrained(folder)
    return str(folder)


def variants(dino: str) -> dict[str, list[str]]:
    lpips = ["lpips.weight=0.1", "lpips.random_init=true"]
    pdino = ["pdino.weight=0.01", f"pdino.source={dino}"]
    repa = ["repa.weight=0.5", "repa.block=2", f"repa.teacher={dino}"]
    tread = ["tread.enabled=true"]
    muon = ["optim.name=muon"]
    return {"plain": [], "lpips": lpips, "pdino": pdino, "repa": repa, "tread": tread, "muon": muon,
            "all": lpips + pdino + repa + tread + muon}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dino = random_dinov2(Path(tmp) / "dinov2")
        trainers = {}
        for name, overrides in variants(dino).items():
            config = load_config(Path(__file__).parent.parent / "configs" / "shapes-cpu.yaml", [
                f"run_dir={tmp}/{name}", f"train.batch_size={args.batch}", "train.threads=1", *overrides])
            trainers[name] = Trainer(config)
            trainers[name].step(0)  # warm-up
        times = {name: [] for name in trainers}
        for round_ in range(args.rounds):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer.step(1 + round_)
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "command": f"OMP_NUM_THREADS=1 python benchmarks/loss_overhead.py --batch {args.batch} --rounds {args.rounds}",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
                   "shared 2-core CPU (noisy)",
        "torch": torch.__version__, "config": "configs/shapes-cpu.yaml", "batch": args.batch,
        "step_ms": {name: round(1000 * t, 1) for name, t in median.items()},
        "ratio_to_plain": {name: round(t / median["plain"], 3) for name, t in median.items()},
        "all_times_ms": {name: [round(1000 * x, 1) for x in t] for name, t in times.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
