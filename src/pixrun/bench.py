"""`pixrun bench`: how fast a config trains on this device, and pixrun's denoiser against diffusers' twin.

`run_bench` times full optimisation steps (`Trainer.step`: data, text tower, denoiser, losses, optimizer, EMA)
after warm-up, and turns the time into images/s, tokens/s, achieved TFLOP/s and MFU with the model FLOPs torch
counts for the step's networks on the meta device (`pixrun.flops`). MFU is measured against the device's dense
bf16 peak from the vendor's datasheet; on CPUs and GPUs not in the table, against the peak of one large matmul
measured on the spot in the precision the step computes in. `compare_diffusers` times forward + backward of
pixrun's `Denoiser` and of diffusers' `PRXTransformer2DModel` holding the same weights, interleaved in one process.
"""

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from pixrun.config import Config, load_config
from pixrun.data.source import DATA_SOURCES
from pixrun.errors import ConfigError
from pixrun.export import transformer_kwargs
from pixrun.flops import training_flops
from pixrun.model import Denoiser, ModelConfig, count_parameters
from pixrun.pipeline import denoiser_config
from pixrun.pretrained import resolve_init
from pixrun.runtime import compute_context, resolve_device, uses_bf16
from pixrun.train import Trainer

# Dense bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets (the figures "with sparsity" are twice these),
# matched in order against torch.cuda.get_device_name(), so that longer names come before their prefixes.
DATASHEET_BF16_TFLOPS = [
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("B200", 2250.0),  # HGX B200, 1000 W
    ("A100", 312.0),  # SXM4 and PCIe
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
]
MATMUL_SIZES = {"cpu": (1024, 2048), "cuda": (4096, 8192)}


def datasheet_peak_tflops(device_name: str) -> float | None:
    for name, tflops in DATASHEET_BF16_TFLOPS:
        if name in device_name:
            return tflops
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """The best TFLOP/s of square matmuls of a few large sizes, on the threads torch uses now."""
    best = 0.0
    for size in MATMUL_SIZES[device.type]:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # first call: kernel selection, allocation
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e12)
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(label: str, device: torch.device, bf16: bool) -> dict:
    """What every result records about where and how it was measured."""
    return {
        "label": label,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if bf16 else "fp32",
    }


def peak_tflops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """The peak MFU is measured against, and where it comes from."""
    if bf16 and device.type == "cuda":
        tflops = datasheet_peak_tflops(device_name(device))
        if tflops is not None:
            return tflops, f"datasheet dense bf16 of {device_name(device)}"
    dtype = torch.bfloat16 if bf16 else torch.float32
    sizes = " and ".join(f"{n}^3" for n in MATMUL_SIZES[device.type])
    return measured_matmul_tflops(device, dtype), f"measured {str(dtype)[6:]} matmul ({sizes}, best), on the spot"


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss: the whole process's peak resident memory"


def data_time_and_text_tokens(trainer, steps: range) -> tuple[float, float, bool]:
    """Seconds per step spent making the batch (the shapes world renders it on the CPU, inside the step), the mean
    padded caption length the text tower saw (captions are padded to the longest of the batch), and whether the
    batches brought their text embeddings along (prepared shards)."""
    config, tower = trainer.config, trainer.state.pipeline.text_tower
    seconds, lengths, precomputed = 0.0, [], False
    for step in steps:
        start = time.perf_counter()
        batch = trainer.state.source.batch(step, *config.stage_at(step))
        seconds += time.perf_counter() - start
        tokens = tower.tokenizer(batch.captions, padding=True, truncation=True, max_length=tower.max_tokens)
        lengths.append(len(tokens["input_ids"][0]))
        precomputed |= batch.embeddings is not None
    return seconds / len(steps), sum(lengths) / len(lengths), precomputed


def stage_steps(config: Config, stage: int, count: int) -> tuple[Config, range]:
    """The first `count` steps of stage `stage`, as global step numbers, and the config to run them with: the
    trainer runs them at that stage's resolution, batch, losses and routing, as a run would. A stage shorter than
    `count` is stretched: a new config whose step boundaries (stages, train.steps, the loss terms' until_step) are
    `config`'s times the smallest whole factor that makes it long enough, as a longer run in the same proportions."""
    plan = config.stage_plan()
    if not 0 <= stage < len(plan):
        raise ConfigError(f"--stage {stage}: the config has stages 0 to {len(plan) - 1}")
    start = plan[stage - 1].until_step if stage else 0
    factor = -(-count // (plan[stage].until_step - start))
    if factor > 1:
        losses = {name: section if section.until_step is None
                  else dataclasses.replace(section, until_step=section.until_step * factor)
                  for name, section in config.losses.items()}
        config = dataclasses.replace(
            config, stages=[dataclasses.replace(each, until_step=each.until_step * factor) for each in config.stages],
            train=dataclasses.replace(config.train, steps=config.train.steps * factor), losses=losses)
    return config, range(factor * start, factor * start + count)


def run_bench(config: Config, steps: int = 10, warmup: int = 5, device: str | None = None, label: str = "",
              stage: int = 0) -> dict:
    """Time `steps` training steps after `warmup` ones, the first of stage `stage` (of a staged config); one flat
    dict of figures (FLOPs are per image)."""
    config = resolve_init(copy.deepcopy(config))  # the model, text tower and latent space a pipeline to start from names
    config, run = stage_steps(config, stage, warmup + steps)
    timed = run[warmup:]
    if device is not None:
        config.train.device = device
    with tempfile.TemporaryDirectory() as run_dir:
        config.run_dir = run_dir
        trainer = Trainer(config)
        try:
            device = trainer.device
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for step in run[:warmup]:
                trainer.step(step)
            synchronize(device)
            start = time.perf_counter()
            for step in timed:
                trainer.step(step)
            synchronize(device)
            step_s = (time.perf_counter() - start) / steps
            memory, memory_source = peak_memory_bytes(device)
            data_s, text_tokens, precomputed = data_time_and_text_tokens(trainer, timed)
            encoder = trainer.state.pipeline.text_tower.encoder.config
            model = trainer.state.pipeline.denoiser.config
            denoiser_params = count_parameters(trainer.state.pipeline.denoiser)
            autoencoder = trainer.state.pipeline.autoencoder
            processes = trainer.world.size
        finally:
            trainer.close()
    stage_config, _ = config.stage_at(timed.start)
    bf16 = uses_bf16(device, config.train.precision)
    # the text tower counts where the step runs it: not where its states come prepared or from the text cache
    text_runs = config.text.trainable or not (precomputed or config.text.cache_dir)
    flops = training_flops(dataclasses.replace(config, model=model), timed.start, round(text_tokens),
                           encoder if text_runs else None, autoencoder,
                           prepared_latents=DATA_SOURCES[config.data.source].prepared_latents)
    peak, peak_source = peak_tflops(device, bf16)
    factor = autoencoder.factor if autoencoder is not None else 1
    image_tokens = (stage_config.resolution // factor // model.patch_size) ** 2
    images_per_s = stage_config.batch_size / step_s  # the global batch: all processes together
    achieved = flops.total * images_per_s / 1e12
    return {
        **environment(label, device, bf16),
        "compile": config.parallel.compile,
        "processes": processes,
        "batch_size": stage_config.batch_size,
        "resolution": stage_config.resolution,
        "model_width": model.width,
        "model_depth": model.depth,
        "denoiser_params": denoiser_params,
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "steps": steps,
        "warmup": warmup,
        "step_ms": 1000 * step_s,
        "data_ms": 1000 * data_s,
        "images_per_s": images_per_s,
        "image_tokens_per_s": images_per_s * image_tokens,
        "flops_per_image": flops.as_dict(),
        "achieved_tflops": achieved,
        "peak_tflops": peak,  # of one device
        "peak_source": peak_source,
        "mfu": achieved / (peak * processes),
        "peak_memory_gb": memory / 1e9,
        "peak_memory_source": memory_source,
    }


def diffusers_twin(model: ModelConfig):
    """diffusers' PRXTransformer2DModel with pixrun's model settings, as `pixrun export` builds it."""
    try:  # here: diffusers is optional, and slow to import
        from diffusers import PRXTransformer2DModel
    except ImportError:
        raise ConfigError("--compare-diffusers needs diffusers >= 0.42 (pip install 'diffusers>=0.42')") from None
    return PRXTransformer2DModel(**transformer_kwargs(model))


def compare_diffusers(
    config: Config, steps: int = 5, warmup: int = 2, rounds: int = 3, device: str | None = None, label: str = ""
) -> dict:
    """Forward + backward of pixrun's denoiser and of diffusers' twin with the same weights and inputs (text of
    text.max_tokens tokens), under the config's precision; rounds alternate the two so that drift on a shared
    machine hits both alike; each model's best round counts."""
    device = resolve_device(device or config.train.device)
    config = resolve_init(config)  # a pipeline to start from names the architecture
    tc = config.train
    # the small text tower's states are text.width wide; a pretrained encoder is not loaded here, so the denoiser
    # takes states as wide as model.context_dim says
    text_dim = config.text.width if config.text.trainable else config.model.context_dim
    model_config = denoiser_config(config.model, text_dim)
    torch.manual_seed(tc.seed)
    ours = Denoiser(model_config)
    with torch.no_grad():  # zero-initialised layers would make both outputs 0 and hide a difference
        for p in ours.parameters():
            p.normal_(std=0.02)
    theirs = diffusers_twin(model_config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.to(device).train()
    theirs.to(device).train()
    b, res, length = tc.batch_size, config.data.resolution, config.text.max_tokens
    x = torch.randn(b, model_config.in_channels, res, res, device=device)
    t = torch.rand(b, device=device)
    txt = torch.randn(b, length, model_config.context_dim, device=device)
    mask = torch.ones(b, length, dtype=torch.bool, device=device)
    mask[0, length // 2:] = False  # padding, so both take their masked-attention path
    calls = {"pixrun": lambda: ours(x, t, txt, mask), "diffusers": lambda: theirs(x, t, txt, mask).sample}
    modules = {"pixrun": ours, "diffusers": theirs}

    def forward_backward(name: str) -> torch.Tensor:
        modules[name].zero_grad(set_to_none=True)
        with compute_context(device, tc.precision):
            out = calls[name]()
        out.float().square().mean().backward()
        return out

    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name in calls:
            for _ in range(warmup):
                forward_backward(name)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                forward_backward(name)
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    with torch.no_grad(), compute_context(device, tc.precision):
        difference = (calls["pixrun"]().float() - calls["diffusers"]().float()).abs().max().item()
    return {
        **environment(label, device, uses_bf16(device, tc.precision)),
        "batch_size": b,
        "resolution": res,
        "text_tokens": length,
        "model_depth": model_config.depth,
        "steps": steps,
        "rounds": rounds,
        "pixrun_ms": 1000 * best["pixrun"],
        "diffusers_ms": 1000 * best["diffusers"],
        "diffusers_over_pixrun": best["diffusers"] / best["pixrun"],
        "max_abs_output_difference": difference,
    }


def format_report(result: dict) -> str:
    """Human-readable lines for a run_bench or compare_diffusers result."""
    head = (
        f"{result['label'] or 'pixrun bench'} | {result['device_name']} ({result['device']}, {result['threads']} "
        f"threads), torch {result['torch']}, {result['precision']} | batch {result['batch_size']} at "
        f"{result['resolution']} px, depth {result['model_depth']}"
    )
    if "diffusers_ms" in result:
        return "\n".join([
            head,
            f"  forward+backward  pixrun {result['pixrun_ms']:.1f} ms   diffusers {result['diffusers_ms']:.1f} ms",
            (f"  diffusers / pixrun = {result['diffusers_over_pixrun']:.2f}   (outputs differ by at most "
             f"{result['max_abs_output_difference']:.1e})"),
        ])
    flops = result["flops_per_image"]
    names = [name for name in flops if name not in ("denoiser_forward", "losses", "total")]
    parts = ", ".join(f"{name} {flops[name] / 1e9:.3g}" for name in names if flops[name])
    return "\n".join([
        head + (", compiled" if result["compile"] else ""),
        (f"  step {result['step_ms']:.1f} ms  |  {result['images_per_s']:.2f} images/s  |  "
         f"{result['image_tokens_per_s']:.0f} image tokens/s  ({result['image_tokens']} per image)"),
        f"  of the step, {result['data_ms']:.1f} ms make the batch (rendered on the CPU)",
        f"  training GFLOP per image {flops['total'] / 1e9:.3g}  ({parts})",
        (f"  achieved {result['achieved_tflops']:.3g} TFLOP/s  |  MFU {100 * result['mfu']:.1f} % of "
         f"{result['peak_tflops']:.3g} TFLOP/s ({result['peak_source']})"),
        f"  peak memory {result['peak_memory_gb']:.2f} GB ({result['peak_memory_source']})",
    ])


def command(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be at least 1 and --warmup at least 0")
    overrides = list(args.args)
    path = overrides.pop(0) if overrides and "=" not in overrides[0] else None
    config = load_config(path, overrides)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    label = " ".join([path or "built-in default", *overrides])
    if args.compare_diffusers:
        result = compare_diffusers(config, steps=args.steps, warmup=args.warmup, label=label)
    else:
        result = run_bench(config, steps=args.steps, warmup=args.warmup, label=label, stage=args.stage)
    print(json.dumps(result) if args.json else format_report(result))
    return 0
