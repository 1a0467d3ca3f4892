"""What the shapes-world studies share: train a run with `pixrun train` (one thread, resumable), score any of
its checkpoints with pixrun's own evaluator, and read its training loss back from metrics.jsonl.

Every run starts from configs/shapes-cpu.yaml. The learning rate is constant after warm-up, so the checkpoint
at step N of a longer run is the same model as a run of N steps: studies compare runs at a shared step.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pixrun.bench import device_name
from pixrun.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "exp"
RESULTS = ROOT / "experiments" / "results"
DOCS = ROOT / "docs"
PIXRUN = str(Path(sys.executable).with_name("pixrun"))
EVAL_CACHE = RESULTS / "evals.json"

# One thread per job: the machine has two cores, shared by at most two jobs.
COMMON_OVERRIDES = [
    "optim.name=adamw",  # the studies ran on the default of their day, AdamW 5e-4 (Muon became the default later)
    "train.threads=1",
    "train.budget=",  # the studies train to step counts, with the schedule of their day (no cool-down)
    "optim.cooldown=0",
    "train.checkpoint_every=250",
    "train.keep_checkpoints=100",
    "train.sample_every=500",
]


def one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def machine() -> dict:
    return {
        "cpu": device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
        "threads": 1,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """Step -> checkpoint folder, for every complete checkpoint of the run."""
    return {int(path.name.removeprefix("step_")): path for path in list_checkpoints(run_dir)}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(checkpoints(run_dir))


def train_run(name: str, overrides: list[str], steps: int) -> Path:
    """Train runs/exp/NAME to `steps` (continuing it if it stopped short); a finished run is left as it is."""
    run_dir = RUNS / name
    done = checkpoint_steps(run_dir)
    if done and done[-1] >= steps:
        return run_dir
    command = [
        PIXRUN,
        "train",
        str(ROOT / "configs" / "shapes-cpu.yaml"),
        *COMMON_OVERRIDES,
        *overrides,
        f"train.steps={steps}",
        f"run_dir={run_dir}",
        "--resume",
        "auto",
    ]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run_dir


def _checkpoint_view(run_dir: Path, step: int) -> Path:
    """A folder that looks like the run stopped at `step` (links only), so the evaluator scores that checkpoint."""
    checkpoint = checkpoints(run_dir)[step]
    view = RUNS / "_views" / f"{run_dir.name}-step_{step}"
    (view / "checkpoints").mkdir(parents=True, exist_ok=True)
    links = {name: run_dir / name for name in ("config.yaml", "tokenizer", "text_encoder")}
    links[f"checkpoints/{checkpoint.name}"] = checkpoint
    for name, target in links.items():
        if not (view / name).exists():
            (view / name).symlink_to(target)
    return view


def evaluate(run_dir: Path, step: int, per_task: int = 16) -> dict:
    """pixrun's compositional scores of the EMA weights at `step`, cached in results/evals.json."""
    from pixrun.evaluate import evaluate_run

    key = f"{run_dir.name}@{step}/{per_task}"
    if key not in _cache():
        one_thread()
        start = time.perf_counter()
        scores = evaluate_run(_checkpoint_view(run_dir, step), per_task=per_task)
        print(f"eval {key}: overall {scores['overall']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        _cache_put(key, scores)
    return _cache()[key]


def is_scored(run_dir: Path, step: int, per_task: int = 16) -> bool:
    return f"{run_dir.name}@{step}/{per_task}" in _cache()


def held_out_mse(run_dir: Path, step: int, count: int = 256) -> dict:
    """MSE of the EMA model's x̂₀ on `count` held-out shapes-world images, once per t-bin with fixed t and noise:
    the same space whatever the network predicts, and far less noisy than the score. Cached like `evaluate`."""
    from pixrun.metrics import mse_by_t, shapes_reference
    from pixrun.pipeline import build_world, load_run, load_run_config

    key = f"{run_dir.name}@{step}/mse{count}"
    if key not in _cache():
        one_thread()
        view = _checkpoint_view(run_dir, step)
        run = load_run(view)
        held_out = shapes_reference(build_world(load_run_config(view)), run.resolution, count)
        _cache_put(key, mse_by_t(run, held_out.load(), held_out.captions))
        print(f"mse {key}: {_cache()[key]}", flush=True)
    return _cache()[key]


def _cache() -> dict:
    return json.loads(EVAL_CACHE.read_text()) if EVAL_CACHE.exists() else {}


def _cache_put(key: str, value: dict) -> None:
    # Read again just before writing: two studies may share the cache.
    RESULTS.mkdir(parents=True, exist_ok=True)
    EVAL_CACHE.write_text(json.dumps({**_cache(), key: value}, indent=1, sort_keys=True))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def mean_loss(run_dir: Path, step: int, window: int = 100) -> float:
    """The training loss averaged over the `window` steps up to `step` (one sample of it is noisy)."""
    rows = [r for r in metrics(run_dir) if step - window < r["step"] <= step]
    return sum(r["loss"] for r in rows) / len(rows)


def compare(runs: dict[str, tuple[str, list[str]]], steps: int, result: str) -> dict[str, dict]:
    """Each run (label: (folder name, overrides)) trained to `steps`: its score, final v-loss and held-out x0 error by
    t, written to results/`result` with the steps and the machine."""
    rows = {}
    for label, (name, overrides) in runs.items():
        run_dir = train_run(name, overrides, steps)
        scores = evaluate(run_dir, steps)
        rows[label] = {"run": name, "loss_v": mean_loss(run_dir, steps), **held_out_mse(run_dir, steps), **scores}
    write_json(result, {"steps": steps, "batch_size": 64, "machine": machine(), "rows": rows})  # shapes-cpu.yaml's batch
    return rows


def write_json(name: str, record: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(record, indent=1))
    print(path)
    return path
