"""What `pixrun bench` reports for fine-tuning Photoroom/prx-512-t2i, on a local stand-in with random weights.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/finetune_bench.py [FOLDER] [--depth 2] [--text-depth 2]
        [--batch 2] [--steps 1] [--warmup 1] [--out benchmarks/finetune_cpu.json]

Nothing is downloaded: FOLDER (default runs/prx-512-standin) receives a diffusers PRXPipeline saved with
save_pretrained, shaped as the released model except where labelled "reduced":
- transformer: PRXTransformer2DModel with the released settings (diffusers' defaults: width 1792, 28 heads, MLP
  ratio 3.5, 16 input channels, patch 2, text states 2304 wide), but --depth blocks (the release has 16);
- vae: AutoencoderKL with the Flux VAE's configuration (16 latent channels, blocks 128-256-512-512, scale 0.3611,
  shift 0.1159), at full size;
- text_encoder: T5Gemma-2B's encoder width (2304, 8 heads of 256, MLP 9216), but --text-depth layers (the 2B has
  26) and a character-level vocabulary (the 2B's has 256000 tokens), so its tokenizer is built offline;
- scheduler: FlowMatchEulerDiscreteScheduler (shift 3).
Then `pixrun bench --json init=FOLDER ...` runs at 512 px (the shapes world, encoded by the VAE inside each step)
for AdamW and for Muon, in subprocesses (each reports its own peak memory), and the figures go to --out as JSON,
with the time the VAE takes to encode one batch (inside each step here; latents prepared by `pixrun data prepare`
skip it).
"""

import argparse
import json
import os
import platform
import string
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

RESOLUTION = 512
TOKENS = 256  # the token budget PRX's T5Gemma prompts are padded and truncated to
RELEASED_DEPTH = 16  # PRXTransformer2DModel's default, the released transformer's
T5GEMMA_2B_DEPTH, T5GEMMA_VOCAB = 26, 256000
NOTES = [
    ("each step renders a batch of the shapes world, encodes it with the VAE (fp32), encodes the captions with the "
     "frozen text encoder (bf16 weights) and trains the transformer on the flow loss alone"),
    ("text_tokens: captions padded to the batch's longest; the stand-in's tokenizer is character-level, so its "
     "captions are longer than the real tokenizer's"),
    ("flops_per_image: the denoiser on the latent grid (512 / 8 / 2 = 32 x 32 tokens), the frozen text encoder's "
     "forward and the VAE's encoder forward (the latents are not prepared in this bench), by FlopCounterMode"),
]
FLUX_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
}


def gemma_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A character-level Gemma tokenizer (no merges): pads on the left, starts each prompt with <bos>, as Gemma's."""
    vocab = {s: i for i, s in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for c in sorted(string.ascii_lowercase + string.digits + ".,'-") + ["▁"]:
        vocab.setdefault(c, len(vocab))
    return transformers.GemmaTokenizer(vocab=vocab, merges=[], model_max_length=TOKENS, add_bos_token=True)


def t5gemma_encoder(vocab_size: int, depth: int) -> torch.nn.Module:
    """T5Gemma-2B's encoder (transformers' defaults are the 2B's) at `depth` layers, saved under the whole model's
    T5GemmaConfig as diffusers' PRXPipeline holds it."""
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    encoder, decoder = (transformers.T5GemmaModuleConfig(vocab_size=vocab_size, num_hidden_layers=depth)
                        for _ in range(2))
    config = transformers.T5GemmaConfig(encoder=encoder, decoder=decoder, is_encoder_decoder=False,
                                        vocab_size=vocab_size)
    model = T5GemmaEncoder(config.encoder)
    model.config = config
    return model


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def write_standin(folder: Path, depth: int, text_depth: int) -> dict:
    """Save the stand-in PRXPipeline into `folder`; what it is, with its networks' parameter counts."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXTransformer2DModel

    torch.manual_seed(0)
    tokenizer = gemma_tokenizer()
    transformer = PRXTransformer2DModel(depth=depth)
    text_encoder = t5gemma_encoder(len(tokenizer), text_depth)
    vae = AutoencoderKL(**FLUX_VAE)
    pipeline = PRXPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                           text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, default_sample_size=RESOLUTION)
    pipeline.save_pretrained(folder)
    settings = dict(transformer.config)
    return {
        "folder": str(folder),
        "what": "Photoroom/prx-512-t2i's shapes with random weights; reduced: transformer depth, text encoder depth "
                "and vocabulary",
        "transformer": {
            "params": parameters(transformer), "depth": depth, "released_depth": RELEASED_DEPTH,
            **{k: settings[k] for k in ("hidden_size", "num_heads", "mlp_ratio", "in_channels", "patch_size",
                                        "context_in_dim")},
        },
        "text_encoder": {
            "params": parameters(text_encoder), "class": "T5GemmaEncoder", "width": text_encoder.config.encoder.hidden_size,
            "depth": text_depth, "released_depth": T5GEMMA_2B_DEPTH, "vocab_size": len(tokenizer),
            "released_vocab_size": T5GEMMA_VOCAB, "model_max_length": TOKENS,
        },
        "vae": {"params": parameters(vae), "class": "AutoencoderKL", "full_size": True,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in FLUX_VAE.items()
                   if k in ("latent_channels", "block_out_channels", "scaling_factor", "shift_factor")}},
    }


def vae_encode_ms(folder: Path, batch: int) -> float:
    """One batch of RESOLUTION² images through the stand-in's VAE encoder, as the trainer encodes them."""
    from pixrun.latent import Autoencoder, LatentConfig

    autoencoder = Autoencoder.from_config(LatentConfig(vae=str(folder), subfolder="vae"))
    autoencoder.encode(torch.zeros(1, 3, 64, 64))  # first call: kernel selection, allocation
    images = torch.rand(batch, 3, RESOLUTION, RESOLUTION) * 2 - 1
    start = time.perf_counter()
    autoencoder.encode(images)
    return 1000 * (time.perf_counter() - start)


def machine() -> dict:
    name = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines() if line.startswith("Model name")),
        platform.processor())
    return {
        "cpu": name,
        "amx": "amx_tile" in Path("/proc/cpuinfo").read_text(),
        "cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "load_average": os.getloadavg()[0],  # the cores are shared: above the core count, timings are slowed
    }


def bench_command(folder: Path, optimizer: str, batch: int, steps: int, warmup: int, device: str) -> list[str]:
    overrides = [f"init={folder}", f"optim.name={optimizer}", f"data.resolution={RESOLUTION}",
                 f"train.batch_size={batch}", "train.budget=", f"train.device={device}"]
    return ["pixrun", "bench", "--json", f"--steps={steps}", f"--warmup={warmup}", *overrides]


def run_bench(command: list[str]) -> dict:
    """`pixrun bench` in a process of its own (so that its peak memory is its own), its JSON line parsed."""
    pixrun = str(Path(sys.executable).with_name("pixrun"))
    start = time.perf_counter()
    done = subprocess.run([pixrun, *command[1:]], check=False, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="runs/prx-512-standin")
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks (the release has 16)")
    parser.add_argument("--text-depth", type=int, default=2, help="T5Gemma encoder layers (the 2B has 26)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--optimizers", default="adamw,muon")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (benchmarks/gpu.sh)")
    parser.add_argument("--out", default="benchmarks/finetune_cpu.json")
    args = parser.parse_args()
    folder = Path(args.folder).resolve()
    standin = write_standin(folder, args.depth, args.text_depth)
    where = machine()
    results = {}
    for optimizer in args.optimizers.split(","):
        command = bench_command(folder, optimizer, args.batch, args.steps, args.warmup, args.device)
        result = run_bench(command)
        results[optimizer] = {
            "command": " ".join(command),
            **{k: result[k] for k in ("step_ms", "data_ms", "images_per_s", "peak_memory_gb", "peak_memory_source",
                                      "denoiser_params", "model_depth", "batch_size", "resolution", "text_tokens",
                                      "image_tokens", "flops_per_image", "mfu",
                                      "precision", "threads", "steps", "warmup", "wall_s")},
        }
        print(f"{optimizer}: {results[optimizer]['step_ms'] / 1000:.1f} s/step, "
              f"{results[optimizer]['peak_memory_gb']:.1f} GB", file=sys.stderr)
    encode_ms = vae_encode_ms(folder, args.batch)
    Path(args.out).write_text(json.dumps({
        "label": f"prx-512-t2i stand-in at reduced depth ({args.depth} of {RELEASED_DEPTH} transformer blocks, "
                 f"{args.text_depth} of {T5GEMMA_2B_DEPTH} text encoder layers), random weights, on this CPU",
        "script": " ".join(["benchmarks/finetune_bench.py", *sys.argv[1:]]),
        "machine": where,
        "standin": standin,
        "bench": results,
        "vae_encode_ms_per_batch": encode_ms,
        "notes": NOTES,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
