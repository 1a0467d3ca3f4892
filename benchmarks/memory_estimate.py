"""Per-GPU memory of configs/prx-speedrun.yaml's training step at 32 ranks, estimated on a machine without a GPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_estimate.py          # writes benchmarks/memory_estimate.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_estimate.py --quick  # a tiny model in seconds, prints only

The approach of torchtitan's memory estimation: a fake process group of 32 ranks (this process is rank 0), fake
tensors (shapes and dtypes, no storage), the project's own sharding (`pixrun.parallel.parallelize`: FSDP2, bf16
parameters, fp32 reduction) and optimizer (`pixrun.optim.build_optimizer`: Muon + AdamW), and FSDP2's memory tracker
(`FSDPMemTracker`) around two training steps (the second has optimizer state): forward with the config's TREAD
routing, the x-prediction flow loss, backward, gradient clipping, optimizer step. The text encoder is frozen, so its
embeddings are fake inputs (B, text.max_tokens, 2304) in bf16, with padding (the attention then takes a bias).

The fake tensors sit on the CPU device. A CPU-only torch can make fake 'cuda' tensors, but autograd on them aborts the
process ("PyTorch is not linked with support for cuda devices"), as does attention on them, and autocast('cuda') is
switched off. So what the H200 does differently from the CPU is imposed here (`AsOnCuda`): attention runs the fused
kernel CUDA picks (flash without a mask, memory-efficient with one), and bf16 autocast computes layer norms in fp32.
(`FSDPMemTracker` itself runs as it is.)

Not modelled (listed in the output with their sizes where known): the loss networks (LPIPS's VGG16, DINOv2 for P-DINO
and REPA) and their activations, REPA's projector, the frozen text encoder, the EMA copy, torch.compile (the config
compiles each block; the estimate runs eager), the CUDA context, NCCL buffers and the caching allocator's overhead.
"""

import argparse
import datetime
import gc
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.overrides import TorchFunctionMode
from torch.testing._internal.distributed.fake_pg import FakeStore

from pixrun.config import load_config
from pixrun.flow import Flow
from pixrun.model import Attention, Denoiser, ModelConfig, RoutePlan, count_parameters
from pixrun.optim import build_optimizer
from pixrun.parallel import device_mesh, parallelize, resolve_strategy
from pixrun.runtime import World

CONFIG = "configs/prx-speedrun.yaml"
WORLD_SIZE = 32
H200_BYTES = 141e9  # datasheet: 141 GB of HBM3e
GB = 1e9
DEVICE = torch.device("cpu")  # where the fake tensors sit (see above)
QUICK = {"width": 64, "depth": 3, "heads": 4, "axes_dim": [8, 8], "patch_size": 8, "bottleneck": 32, "context_dim": 48}
# The tracker's categories, grouped as the report reads them
GROUPS = {
    "parameters": ["Sharded Param", "Unsharded Param", "All Gather", "Buffer"],
    "gradients": ["Sharded Grad", "Unsharded Grad", "Reduce Scatter"],
    "optimizer_state": ["OptState"],
    "activations": ["Activation", "Temp"],
    "inputs": ["Inputs"],
}


class AsOnCuda(TorchFunctionMode):
    """What an H200 runs differently from this CPU, imposed on the fake CPU tensors: attention takes the fused kernel
    CUDA picks (flash when there is no mask; memory-efficient with an additive bias, which flash does not take), and
    CUDA's bf16 autocast computes layer norms in fp32 (the CPU's keeps bf16)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args
            bias = kwargs.get("attn_mask")
            if bias is None:
                return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[0]
        if func is F.layer_norm and torch.is_autocast_enabled(DEVICE.type):
            return func(args[0].float(), *args[1:], **kwargs)
        return func(*args, **kwargs)


def run_as_on_cuda(model: nn.Module) -> None:
    """Run each attention and layer norm of `model` under `AsOnCuda`, entered inside them: a mode entered around
    the step would not reach the blocks that activation checkpointing recomputes in backward."""
    for module in model.modules():
        if isinstance(module, (Attention, nn.LayerNorm)):
            forward = module.forward

            def as_on_cuda(*args, forward=forward, **kwargs):
                with AsOnCuda():
                    return forward(*args, **kwargs)

            module.forward = as_on_cuda


def estimate(config, model_config: ModelConfig, resolution: int, batch: int, text_tokens: int,
             checkpointing: bool) -> dict:
    """Peak tracked bytes on rank 0 over two training steps, and the tracker's breakdown at that peak."""
    parallel = replace(config.parallel, compile=False, activation_checkpointing=checkpointing)
    world = World(rank=0, size=dist.get_world_size(), local_rank=0)
    flow = Flow(config.flow)
    # Sharded on the meta device outside the fake mode (the device mesh reads its ranks' values), then given fake
    # storage: the fake mode takes the meta parameters as inputs
    with torch.device("meta"):
        denoiser = Denoiser(model_config)
    run_as_on_cuda(denoiser)
    strategy = resolve_strategy(parallel, world)
    parallelize(denoiser, [], parallel, strategy, DEVICE, bf16=True,
                mesh=device_mesh(parallel, world, DEVICE) if strategy == "fsdp" else None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        denoiser.to_empty(device=DEVICE)
        denoiser.train()
        params = dict(denoiser.named_parameters())
        optimizer = build_optimizer(params, config.optim)

        x0 = torch.randn(batch, 3, resolution, resolution)
        eps, t = torch.randn_like(x0), torch.rand(batch)
        txt = torch.randn(batch, text_tokens, model_config.context_dim, dtype=torch.bfloat16)
        mask = torch.arange(text_tokens) < torch.randint(1, text_tokens + 1, (batch, 1))
        tokens = (resolution // model_config.patch_size) ** 2
        plan = None
        if config.tread.enabled:
            generators = [torch.Generator().manual_seed(i) for i in range(batch)]
            plan = denoiser.plan_routing(config.tread, tokens, generators, DEVICE)

        tracker = FSDPMemTracker(denoiser, optimizer)
        tracker.track_inputs((x0, eps, t, txt, mask) + ((plan.kept_index,) if plan else ()))
        with tracker:
            for _ in range(2):  # the first step creates the optimizer state, the second runs with it
                training_step(denoiser, optimizer, flow, config, x0, eps, t, txt, mask, plan)
                tracker.reset_mod_stats()  # per-module stats only (the tracker takes one pass); the peak stays
        peak = tracker.get_tracker_snapshot("peak")
    device_peak = next(iter(peak.values()))
    breakdown = {getattr(kind, "value", kind): int(size) for kind, size in device_peak.items()}
    total = breakdown.pop("Total")
    return {
        "peak_bytes_per_gpu": total,
        "peak_gb_per_gpu": round(total / GB, 2),
        "fraction_of_h200": round(total / H200_BYTES, 3),
        "at_peak_bytes": {group: sum(breakdown.get(kind, 0) for kind in kinds) for group, kinds in GROUPS.items()},
        "tracker_breakdown_bytes": breakdown,
    }


def training_step(denoiser, optimizer, flow, config, x0, eps, t, txt, mask, plan: RoutePlan | None) -> None:
    """pixrun.train.Trainer.step's order: forward, flow loss, zero the previous gradients, backward, clip, step.
    bf16 autocast over FSDP's bf16 parameters, as train.precision auto does on an H200."""
    x_t = flow.add_noise(x0, eps, t)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        pred = denoiser(x_t, t, txt, mask, routing=plan)
    loss = flow.loss(pred.float(), x0, eps, x_t, t)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(denoiser.parameters(), config.optim.grad_clip)
    optimizer.step()


def not_modelled(config, model_config: ModelConfig, world_size: int) -> dict:
    """Memory the estimate leaves out, from the networks' known sizes (built on the meta device, no weights)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, T5GemmaConfig, T5GemmaEncoderModel

    from pixrun.losses.lpips import LPIPS
    from pixrun.losses.repa import REPA

    # google/t5gemma-2b-2b-ul2's encoder (Gemma 2 2B's layout) and facebook/dinov2-with-registers-base
    encoder = T5GemmaConfig(is_encoder_decoder=False)
    encoder.encoder.update({"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                            "vocab_size": 256000})
    dino = Dinov2WithRegistersConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                                     image_size=518, num_register_tokens=4)
    with torch.device("meta"):
        sizes = {
            "text_encoder": count_parameters(T5GemmaEncoderModel(encoder)),
            "lpips": count_parameters(LPIPS(config.lpips.downsample)),
            "dino": count_parameters(Dinov2WithRegistersModel(dino)),
            "repa_projector": count_parameters(REPA(model_config.width, dino.hidden_size, config.repa.hidden)),
            "denoiser": count_parameters(Denoiser(model_config)),
        }
    return {
        "text_encoder_bf16_params_bytes": {
            "bytes": 2 * sizes["text_encoder"],
            "what": f"T5Gemma-2B encoder, {sizes['text_encoder'] / 1e9:.2f} B params in bf16 ({config.text.dtype}), "
                    "frozen, whole on every rank; its activations only when a caption misses the text cache",
        },
        "lpips_vgg16_fp32_params_bytes": {
            "bytes": 4 * sizes["lpips"],
            "what": f"LPIPS: VGG16 features + linear heads, {sizes['lpips'] / 1e6:.1f} M params in fp32, frozen, "
                    "whole on every rank; its activations (forward and backward to x0_hat) are not counted",
        },
        "dinov2_fp32_params_bytes": {
            "bytes": 4 * sizes["dino"],
            "what": f"DINOv2-with-registers base (P-DINO, and REPA's teacher), {sizes['dino'] / 1e6:.1f} M params in "
                    "fp32, frozen, whole on every rank; its activations are not counted",
        },
        "repa_projector_sharded_state_bytes": {
            "bytes": 16 * sizes["repa_projector"] // world_size,
            "what": f"REPA's projector, {sizes['repa_projector'] / 1e6:.1f} M params trained and sharded like the "
                    "denoiser: fp32 param + grad + AdamW's two moments, 1/world of them per rank (stage 1 only)",
        },
        "ema_sharded_fp32_bytes": {
            "bytes": 4 * sizes["denoiser"] // world_size,
            "what": "the EMA of the denoiser's weights in fp32, sharded like them (1/world per rank)",
        },
    }


def cpu_name() -> str:
    """The CPU model, and whether it has AMX (bf16 tiles): the figures are byte counts, the times are not."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    return f"{model} ({'AMX' if 'amx_tile' in info else 'no AMX'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model over 4 fake ranks; prints, writes nothing")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON (default: print only with "
                        "--quick, else benchmarks/memory_estimate.json)")
    args = parser.parse_args()
    config = load_config(CONFIG)
    world_size = 4 if args.quick else WORLD_SIZE
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    if args.quick:
        model_config, text_tokens = ModelConfig(**QUICK), 8
        cases = [(32, 2, checkpointing) for checkpointing in (False, True)]
    else:
        model_config, text_tokens = config.model, config.text.max_tokens
        per_rank = {stage.resolution: stage.batch_size // world_size for stage in config.stages}
        cases = [(res, batch, checkpointing) for res, batch in per_rank.items() for checkpointing in (False, True)]
    results = []
    for resolution, batch, checkpointing in cases:
        start = time.perf_counter()
        result = estimate(config, model_config, resolution, batch, text_tokens, checkpointing)
        gc.collect()
        results.append({"resolution": resolution, "per_gpu_batch": batch, "activation_checkpointing": checkpointing,
                        **result, "seconds": round(time.perf_counter() - start, 1)})
    dist.destroy_process_group()
    report = {
        "label": "memory_estimate",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, no GPU: fake tensors (FakeTensorMode) on a fake "
                   f"{world_size}-rank process group",
        "torch": torch.__version__,
        "config": CONFIG,
        "world_size": world_size,
        "model": {**vars(model_config), "parameters": None},
        "text_tokens": text_tokens,
        "tread": vars(config.tread),
        "precision": "FSDP2 bf16 parameters, fp32 gradient reduction, fp32 sharded master weights; bf16 autocast",
        "optimizer": f"{config.optim.name} (Muon on the blocks' matrices, AdamW on the rest)",
        "h200_bytes": H200_BYTES,
        "cases": results,
        "not_modelled": None if args.quick else not_modelled(config, model_config, world_size),
        "also_not_modelled": [
            ("activations of the loss networks (LPIPS at the image size x lpips.downsample, P-DINO at pdino.size, "
             "REPA's teacher) and of REPA's projector"),
            "torch.compile (configs/prx-speedrun.yaml compiles each block; the estimate runs eager)",
            "the CUDA context, NCCL's buffers, the caching allocator's reserved-but-unused memory",
        ],
    }
    with torch.device("meta"):
        report["model"]["parameters"] = count_parameters(Denoiser(model_config))
    text = json.dumps(report, indent=1)
    print(text)
    out = args.out or (None if args.quick else Path(__file__).with_name("memory_estimate.json"))
    if out is not None:
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
