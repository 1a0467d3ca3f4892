"""Weak scaling on CPU, counted: what one rank does at 1, 2 and 4 processes with the same per-rank batch.

    python benchmarks/scaling.py --label baseline --src /tmp/baseline/src   # a worktree of the old commit
    python benchmarks/scaling.py --label new --src src                      # this tree
    python benchmarks/scaling.py --table                                    # the markdown table of the JSON

Each run launches `python -m torch.distributed.run --nproc-per-node=N` (gloo) for N in 1, 2, 4 and both data
sources: the shapes world, and shards that the code under test prepares (`pixrun data prepare`) from shapes
rendered at 512 px. The tiny denoiser trains at 512 px, a fixed per-rank batch, Muon, fp32, FSDP2 above one
process. After warm-up steps, every rank counts, over a window of training steps, one checkpoint save and one
sample grid (times are meaningless with 4 processes on 2 cores):

- peak resident memory: ru_maxrss of the rank; of its DataLoader workers, the largest VmHWM of the live ones
  and RUSAGE_CHILDREN of the finished ones;
- random values drawn: numel of the outputs of torch's random ops (a TorchDispatchMode); and on the host, values
  returned by numpy Generators (numpy.random.default_rng and numpy.random.Generator replaced by a counting
  subclass) and by Python's random.Random instances (random.Random replaced likewise; the module-level
  functions of `random` are not counted, nor torch draws inside DataLoader workers);
- FLOPs outside the denoiser: FlopCounterMode over the steps (not the save and the grid) minus the denoiser
  module's share, forward and backward; Newton-Schulz in the optimizer falls outside;
- bytes read from shards: every stream webdataset's gopen returns, counted in shared memory so that forked
  DataLoader workers add to it; over the whole run (index, warm-up, window, and the loader's read-ahead once it
  has gone idle);
- bytes of whole tensors gathered: output bytes of all-gather and broadcast collectives (c10d and
  _c10d_functional: DTensor.full_tensor and redistribute, dist.all_gather*, dist.broadcast on every rank, the
  source too), not counting FSDP2's own unsharding of parameters (an all-gather right after
  fsdp.all_gather_copy_in), the pickled payloads of dist.*_object*, nor dist.gather, which sends generated
  images to rank 0 (a grid's worth whatever the world size): all three reported apart, with all-to-all bytes.

The JSON keeps each label's rows (the largest value over ranks is the one compared) and, per label and source,
each metric at 4 processes over 1; "flat" is true when no metric of the label "new" grew by more than 10 %. A
metric that is 0 in one process (nothing is gathered where nothing is sharded) stays flat only if it is 0 at 4.
"""

import argparse
import contextlib
import datetime
import importlib
import inspect
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
PROCESSES = (1, 2, 4)
SOURCES = ("shapes", "shards")
GROWTH_LIMIT = 1.10
FLAT_LABEL = "new"
RESOLUTION = 512
PER_RANK_BATCH = 4
WARMUP_STEPS, COUNTED_STEPS = 2, 2
IMAGES = 320  # rendered for the shards: 20 shards of 16 images
SHARD_IMAGES = 16
TINY = [
    f"data.resolution={RESOLUTION}", "model.width=64", "model.depth=2", "model.heads=2", "model.axes_dim=[16,16]",
    "model.patch_size=32", "model.bottleneck=32", "text.width=32", "text.depth=1", "text.heads=2",
    "train.threads=1", "train.precision=fp32", "train.device=cpu", "optim.name=muon", "parallel.strategy=auto",
    f"train.steps={WARMUP_STEPS + COUNTED_STEPS}", "sample.steps=2", "sample.grid_seeds=1",
    "sample.grid_prompts=[a photo of a circle,a photo of a red square]",
    "repa.weight=0", "shapes_perceptual.weight=0",  # the default's shapes teacher: a per-image cost, like the model
]
METRICS = {  # compared 4 processes / 1 process; the largest value over ranks
    "peak_rss_bytes": "ru_maxrss of the rank process",
    "loader_peak_rss_bytes": "largest peak RSS of the rank's DataLoader workers",
    "torch_random_values": "numel of outputs of torch random ops",
    "host_random_values": "values returned by numpy Generators and Python random.Random instances",
    "flops_outside_denoiser": "FlopCounterMode over the counted steps minus the denoiser's forward and backward",
    "shard_bytes_read": "bytes read through webdataset's gopen, workers included",
    "gathered_bytes": "output bytes of all-gather / broadcast collectives (not FSDP2 unsharding, not dist.gather)",
}
INFO = ("denoiser_flops", "fsdp_unshard_bytes", "object_collective_bytes", "all_to_all_bytes", "to_rank0_bytes")
RANDOM_OPS = {
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "normal_",
    "uniform_", "bernoulli", "bernoulli_", "multinomial", "random_", "exponential_", "cauchy_", "log_normal_",
    "geometric_", "poisson", "binomial", "native_dropout", "_standard_gamma", "_sample_dirichlet",
}
NUMPY_DRAWS = (
    "integers", "random", "choice", "permutation", "uniform", "normal", "standard_normal", "exponential",
    "standard_exponential", "gamma", "standard_gamma", "beta", "poisson", "binomial", "multinomial", "dirichlet",
    "lognormal", "logistic", "gumbel", "laplace", "triangular", "geometric", "bytes",
)
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list")


# --- inside each rank (run under torchrun, with the code under test on PYTHONPATH) ---


class SharedCounters:
    """Counts that forked DataLoader workers add to: multiprocessing Values made before the workers start."""

    def __init__(self):
        self.shard_bytes = multiprocessing.Value("q", 0)
        self.host_random_values = multiprocessing.Value("q", 0)

    @staticmethod
    def add(value, amount: int) -> None:
        with value.get_lock():
            value.value += amount


def count_host_draws(counters: SharedCounters) -> None:
    """numpy.random.default_rng, numpy.random.Generator and random.Random make generators that count the values
    they return. Call before importing pixrun."""
    import random

    import numpy as np

    original_default_rng, original_generator = np.random.default_rng, np.random.Generator

    def counting(name):
        def draw(self, *args, **kwargs):
            out = getattr(original_generator, name)(self, *args, **kwargs)
            SharedCounters.add(counters.host_random_values, int(np.size(out)))
            return out
        return draw

    def counting_in_place(name):
        def draw(self, x, *args, **kwargs):
            out = getattr(original_generator, name)(self, x, *args, **kwargs)
            SharedCounters.add(counters.host_random_values, int(np.size(x)))
            return out
        return draw

    methods = {name: counting(name) for name in NUMPY_DRAWS if hasattr(original_generator, name)}
    methods.update({name: counting_in_place(name) for name in ("shuffle", "permuted")})
    counting_generator = type("CountingGenerator", (original_generator,), methods)

    def default_rng(seed=None):
        if isinstance(seed, original_generator):
            return seed
        return counting_generator(original_default_rng(seed).bit_generator)

    np.random.default_rng = default_rng
    np.random.Generator = counting_generator

    class CountingRandom(random.Random):  # every other method of random.Random draws through these two
        def random(self):
            SharedCounters.add(counters.host_random_values, 1)
            return super().random()

        def getrandbits(self, k):
            SharedCounters.add(counters.host_random_values, 1)
            return super().getrandbits(k)

    random.Random = CountingRandom


class CountingStream:
    def __init__(self, stream, counter):
        self.stream, self.counter = stream, counter

    def read(self, *args):
        data = self.stream.read(*args)
        SharedCounters.add(self.counter, len(data))
        return data

    def readinto(self, buffer):
        n = self.stream.readinto(buffer)
        SharedCounters.add(self.counter, n or 0)
        return n

    def readline(self, *args):
        data = self.stream.readline(*args)
        SharedCounters.add(self.counter, len(data))
        return data

    def __iter__(self):
        return iter(self.readline, b"")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def count_shard_reads(counters: SharedCounters) -> None:
    """Every module-level name bound to webdataset's gopen (pixrun.data.stream's among them) opens counting
    streams. Call after importing pixrun."""
    original = importlib.import_module("webdataset.gopen").gopen  # the package's name gopen is the function

    def gopen(url, mode="rb", *args, **kwargs):
        stream = original(url, mode, *args, **kwargs)
        return CountingStream(stream, counters.shard_bytes) if "r" in mode else stream

    for module in list(sys.modules.values()):
        if getattr(module, "gopen", None) is original:
            module.gopen = gopen


def mark_object_collectives() -> dict:
    """dist.*_object* send pickled objects as byte tensors: flag them so they are not taken for tensor gathers."""
    import torch.distributed as dist

    inside = {"object": False}

    def flagged(function):
        def run(*args, **kwargs):
            inside["object"] = True
            try:
                return function(*args, **kwargs)
            finally:
                inside["object"] = False
        return run

    for name in OBJECT_COLLECTIVES:
        setattr(dist, name, flagged(getattr(dist, name)))
    return inside


def tensor_bytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def counting_mode(object_collective: dict):
    """A TorchDispatchMode that counts random values drawn and the bytes of each kind of collective."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = dict.fromkeys(("torch_random_values", "gathered_bytes", *INFO[1:]), 0)
            self.by_op: dict[str, int] = {}
            self.fsdp_copy_in = False

        def add(self, key: str, op: str, amount: int) -> None:
            self.counts[key] += amount
            self.by_op[op] = self.by_op.get(op, 0) + amount

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            namespace, name = func.namespace, func.overloadpacket.__name__
            if name in RANDOM_OPS:
                first = out[0] if isinstance(out, (tuple, list)) else out
                self.add("torch_random_values", str(func), first.numel())
            elif namespace == "fsdp" and name == "all_gather_copy_in":
                self.fsdp_copy_in = True
            elif namespace in ("c10d", "_c10d_functional"):
                # c10d's in-place ops write into their first argument; the functional ones return the result
                moved = tensor_bytes(args[0] if namespace == "c10d" else out)
                if object_collective["object"]:
                    self.add("object_collective_bytes", str(func), moved)
                elif "gather" in name and self.fsdp_copy_in:
                    self.fsdp_copy_in = False
                    self.add("fsdp_unshard_bytes", str(func), moved)
                elif name == "gather_":
                    self.add("to_rank0_bytes", str(func), moved)
                elif "gather" in name or "broadcast" in name:
                    self.add("gathered_bytes", str(func), moved)
                elif "alltoall" in name or "all_to_all" in name:
                    self.add("all_to_all_bytes", str(func), moved)
            return out

    return Counting()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_by_kind() -> dict:
    """Resident memory now, anonymous (the heap) apart from file-backed pages (libraries), which vary between runs
    with what the page cache holds."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssFile", "RssShmem")}


def worker_peak_rss_bytes() -> int:
    """The largest peak RSS among this process's children: live ones from /proc, finished ones from getrusage."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent != os.getpid():
                continue
            for line in (stat.parent / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return peak


def wait_until_idle(counter, quiet_s: float = 5.0, limit_s: float = 90.0) -> None:
    """Until the DataLoader workers have filled their read-ahead and stopped reading."""
    start = last_change = time.monotonic()
    last = counter.value
    while time.monotonic() - last_change < quiet_s and time.monotonic() - start < limit_s:
        time.sleep(0.5)
        if counter.value != last:
            last, last_change = counter.value, time.monotonic()


class DiscardingLogger:
    """Stands in for the run logger that Trainer.sample reports its grid to."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def run_rank(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    counters = SharedCounters()
    count_host_draws(counters)
    object_collective = mark_object_collectives()

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import pixrun
    from pixrun.config import load_config
    from pixrun.errors import ConfigError
    from pixrun.train import Trainer

    count_shard_reads(counters)
    overrides = spec["overrides"]
    try:
        load_config(None, ["data.partitions=4"])
        # canonical partitions (the new data path): the largest world size, 4, must divide them, and they the
        # global batch of every world size
        overrides = [*overrides, "data.partitions=4"]
    except ConfigError:  # a revision from before them
        pass
    config = load_config(None, overrides)
    trainer = Trainer(config)
    try:
        rank, warmup, counted = trainer.world.rank, spec["warmup"], spec["counted"]
        for step in range(warmup):
            trainer.step(step)
        peak_rss_after = {"warmup": peak_rss_bytes()}
        end = warmup + counted
        sample_args = (end, DiscardingLogger())[:len(inspect.signature(trainer.sample).parameters)]
        phases = {}
        flops = FlopCounterMode(display=False)
        for phase, work in [
            ("steps", lambda: [trainer.step(step) for step in range(warmup, end)]),
            ("save", lambda: trainer.save(end)),
            ("sample", lambda: trainer.sample(*sample_args)),
        ]:
            host_before = counters.host_random_values.value
            with contextlib.ExitStack() as stack:
                if phase == "steps":
                    stack.enter_context(flops)
                mode = stack.enter_context(counting_mode(object_collective))
                work()
            phases[phase] = {**mode.counts, "host_random_values": counters.host_random_values.value - host_before,
                             "by_op": mode.by_op}
            peak_rss_after[phase] = peak_rss_bytes()
        denoiser_name = type(trainer.state.pipeline.denoiser).__name__
        by_module = {name: sum(ops.values()) for name, ops in flops.get_flop_counts().items() if "." not in name}
        if not by_module.get(denoiser_name):
            raise RuntimeError(f"FlopCounterMode saw no {denoiser_name}: its modules are {sorted(by_module)}")
        wait_until_idle(counters.shard_bytes)
        totals = {key: sum(p[key] for p in phases.values()) for key in
                  ("torch_random_values", "host_random_values", "gathered_bytes", *INFO[1:])}
        result = {
            "rank": rank,
            "world_size": trainer.world.size,
            "strategy": getattr(trainer, "strategy", None),
            "pixrun": pixrun.__file__,
            "torch_threads": torch.get_num_threads(),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_after": peak_rss_after,
            "rss_at_end": resident_by_kind(),
            "loader_peak_rss_bytes": worker_peak_rss_bytes(),
            "flops_outside_denoiser": by_module["Global"] - by_module[denoiser_name],
            "denoiser_flops": by_module[denoiser_name],
            "shard_bytes_read": counters.shard_bytes.value,
            **totals,
            "flops_by_module": by_module,
            "phases": phases,
        }
        Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    finally:
        trainer.close()


def make_inputs(folder: Path) -> None:
    """Shapes rendered at 512 px with their captions (an image folder for `pixrun data prepare`), and a tiny
    random T5 encoder saved like a hub checkpoint: the frozen text encoder of the shards runs."""
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    from pixrun.data.shapes import ShapesWorld

    world = ShapesWorld()
    images = folder / "images"
    images.mkdir(parents=True)
    for i in range(IMAGES):
        scene = world.sample_scene(np.random.default_rng([7, i]))
        Image.fromarray(world.render(scene, RESOLUTION)).save(images / f"{i:04d}.png")
        (images / f"{i:04d}.txt").write_text(scene.caption)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in world.vocabulary()]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    t5 = transformers.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, num_heads=2, num_layers=1, d_ff=64)
    torch.manual_seed(0)
    transformers.T5EncoderModel(t5).save_pretrained(folder / "t5")
    tokenizer.save_pretrained(folder / "t5")


# --- the parent: plain python, importing nothing of pixrun ---


def child_env(src: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}


def run_checked(command: list[str], env: dict, log: Path, timeout: int = 900) -> None:
    with open(log, "w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{tail}\n(full log: {log})")


def prepared_shards(src: Path, work: Path, label_dir: Path) -> tuple[Path, Path]:
    """Inputs rendered once for every label; shards prepared by the code under test."""
    inputs = work / "inputs"
    if not (inputs / "t5" / "config.json").is_file():
        shutil.rmtree(inputs, ignore_errors=True)
        run_checked([sys.executable, str(SCRIPT), "--make-inputs", str(inputs)], child_env(src), work / "inputs.log")
    prepared = label_dir / "prepared"
    shutil.rmtree(prepared, ignore_errors=True)
    run_checked([sys.executable, "-m", "pixrun.cli", "data", "prepare", str(inputs / "images"), str(prepared),
                 f"resolution={RESOLUTION}", "patch_size=32", f"chunk_size={SHARD_IMAGES}", "processes=1",
                 "--text-encoder", str(inputs / "t5"), "--max-tokens", "32"],
                child_env(src), label_dir / "prepare.log")
    return prepared, inputs / "t5"


def overrides(source: str, processes: int, run_dir: Path, shards: tuple[Path, Path] | None) -> list[str]:
    common = [*TINY, f"run_dir={run_dir}", f"train.batch_size={PER_RANK_BATCH * processes}"]
    if source == "shapes":
        return common
    prepared, t5 = shards
    return [*common, "data.source=shards", f"data.shards={prepared}", "data.num_workers=2",
            f"text.encoder={t5}", "text.max_tokens=32"]  # bf16 weights, as `data prepare` embeds with


def measure(src: Path, label_dir: Path, source: str, processes: int, shards) -> list[dict]:
    out = label_dir / f"{source}-{processes}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"overrides": overrides(source, processes, out / "run", shards), "warmup": WARMUP_STEPS,
            "counted": COUNTED_STEPS, "out": str(out)}
    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    start = time.perf_counter()
    run_checked([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                 str(SCRIPT), "--rank-spec", str(out / "spec.json")], child_env(src), out / "torchrun.log")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    for rank in ranks:
        if not Path(rank["pixrun"]).resolve().is_relative_to(src.resolve()):
            raise SystemExit(f"rank {rank['rank']} imported {rank['pixrun']}, not the code under {src}")
    if source == "shards" and not all(rank["shard_bytes_read"] for rank in ranks):
        raise SystemExit("shards were read without webdataset's gopen: the byte count no longer sees them")
    print(f"  {source} x {processes}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return ranks


def git_commit(src: Path) -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain", "."))}


def machine() -> dict:
    """The CPU (and whether it has AMX, where bf16 is fast): the figures are counts, but a reader compares kinds."""
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "amx": "amx_tile" in info, "cores": os.cpu_count(), "torch": version("torch"),
            "python": platform.python_version(), "backend": "gloo"}


def compared(ranks: list[dict]) -> dict:
    """A row's figure for each metric: the largest over its ranks; for host random values, rank 0's. Rank 0 holds the
    same rows (the same scenes) at every world size, and a scene's draws depend on the scene (object placement is
    drawn until it fits), so only rank 0's count compares row for row; a rank that draws for rows it does not hold,
    as the baseline does, shows there too."""
    figures = {metric: max(rank.get(metric, 0) for rank in ranks) for metric in (*METRICS, *INFO)}
    figures["host_random_values"] = next(rank for rank in ranks if rank["rank"] == 0)["host_random_values"]
    return figures


def comparison(rows: list[dict]) -> tuple[dict, bool]:
    """Per source: each metric at the most processes over one process, and whether all stayed within the limit."""
    ratios, flat = {}, True
    for source in sorted({row["source"] for row in rows}):
        by_size = {row["processes"]: compared(row["ranks"]) for row in rows if row["source"] == source}
        one, most = by_size.get(1), by_size.get(max(by_size))
        if one is None or max(by_size) == 1:
            continue
        ratios[source] = {"processes": max(by_size)}
        for metric in METRICS:
            a, b = one[metric], most[metric]
            ok = b <= GROWTH_LIMIT * a if a else b == 0
            ratios[source][metric] = {"ratio": b / a if a else None, "flat": ok}
            flat &= ok
    return ratios, flat


def merge(path: Path, label: str, src: Path, rows: list[dict]) -> dict:
    result = json.loads(path.read_text()) if path.is_file() else {}
    kept = [row for row in result.get("rows", []) if row["label"] != label]
    result = {
        "description": __doc__.split("\n\n")[0],
        "command": "python benchmarks/scaling.py --label LABEL --src SRC",
        "machine": machine(),
        "settings": {"per_rank_batch": PER_RANK_BATCH, "warmup_steps": WARMUP_STEPS, "counted_steps": COUNTED_STEPS,
                     "overrides": TINY, "shards": f"{IMAGES} shapes at {RESOLUTION} px, {SHARD_IMAGES} per shard, "
                                                 "2 DataLoader workers per rank, tiny frozen T5, embeddings prepared"},
        "metrics": METRICS,
        "growth_limit": GROWTH_LIMIT,
        "code": result.get("code", {}),
        "rows": kept + rows,
    }
    result["code"][label] = {"src": str(src), **git_commit(src), "measured": datetime.date.today().isoformat()}
    labels = sorted({row["label"] for row in result["rows"]})
    result["ratios"], result["flat_by_label"] = {}, {}
    for each in labels:
        result["ratios"][each], result["flat_by_label"][each] = comparison(
            [row for row in result["rows"] if row["label"] == each])
    result["flat"] = result["flat_by_label"].get(FLAT_LABEL)
    return result


def human(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def markdown(result: dict) -> str:
    columns = {"peak_rss_bytes": ("rank RSS", "B"), "loader_peak_rss_bytes": ("workers' RSS", "B"),
               "torch_random_values": ("torch random", ""), "host_random_values": ("host random", ""),
               "flops_outside_denoiser": ("FLOPs outside denoiser", ""), "shard_bytes_read": ("shard bytes read", "B"),
               "gathered_bytes": ("whole tensors gathered", "B")}
    lines = ["| code | data | processes | " + " | ".join(name for name, _ in columns.values()) + " |",
             "| --- | --- | --- |" + " --- |" * len(columns)]
    for label in sorted({row["label"] for row in result["rows"]}):
        rows = [row for row in result["rows"] if row["label"] == label]
        for source in SOURCES:
            for row in sorted((r for r in rows if r["source"] == source), key=lambda r: r["processes"]):
                cells = [human(compared(row["ranks"])[metric], unit) for metric, (_, unit) in columns.items()]
                lines.append(f"| {label} | {source} | {row['processes']} | " + " | ".join(cells) + " |")
            ratios = result["ratios"].get(label, {}).get(source)
            if ratios:
                cells = [("–" if ratios[m]["ratio"] is None else f"{ratios[m]['ratio']:.2f}")
                         + ("" if ratios[m]["flat"] else " ✗") for m in columns]
                lines.append(f"| {label} | {source} | **{ratios['processes']} / 1** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_label(label: str, src: Path, work: Path, out: Path, processes: list[int], sources: list[str]) -> None:
    label_dir = work / label
    label_dir.mkdir(parents=True, exist_ok=True)
    shards = prepared_shards(src, work, label_dir) if "shards" in sources else None
    rows = []
    for source in sources:
        for n in processes:
            ranks = measure(src, label_dir, source, n, shards)
            rows.append({"label": label, "source": source, "processes": n, "compared": compared(ranks),
                         "ranks": ranks})
    result = merge(out, label, src, rows)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"flat ({FLAT_LABEL}): {result['flat']}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default=FLAT_LABEL,
                        help=f"rows of this label are replaced; those of '{FLAT_LABEL}' decide 'flat'")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the pixrun source folder to measure")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scaling-work"), help="scratch: data, runs, logs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scaling_cpu.json")
    parser.add_argument("--processes", type=int, nargs="+", default=list(PROCESSES))
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    parser.add_argument("--rank-spec", type=Path, help=argparse.SUPPRESS)  # one rank, under torchrun
    parser.add_argument("--make-inputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_spec:
        run_rank(args.rank_spec)
    elif args.make_inputs:
        make_inputs(args.make_inputs)
    elif args.table:
        print(markdown(json.loads(args.out.read_text())))
    else:
        run_label(args.label, args.src.resolve(), args.work, args.out, args.processes, args.sources)


if __name__ == "__main__":
    main()
