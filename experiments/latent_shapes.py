"""Latent space end to end on CPU: the shapes world through a tiny randomly initialised diffusers AutoencoderKL.

The VAE is random (no weights can be downloaded here), so the score is not the point: the run shows that the
latent path trains — images are encoded, the flow runs on latents, samples and the held-out MSE by t are decoded
or measured through the same autoencoder — and that its loss and held-out error fall. The latents are scaled to
unit variance (as a released VAE's scaling_factor does), so predicting their mean scores an MSE of about 1 in
every t-bin. Writes experiments/results/latent_shapes.json.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/latent_shapes.py            # --steps 300
"""

import argparse
import json

import torch
from common import RESULTS, RUNS, checkpoint_steps, held_out_mse, machine, one_thread, train_run

VAE_SEED = 0
# 64 px -> 16 x 16 latents of 4 channels (factor 4); the denoiser takes 2 x 2 latent patches: 64 tokens, as the
# pixel default's 16-px patches give
LATENT_OVERRIDES = ["model.patch_size=2", "model.bottleneck=null", "train.batch_size=32"]


def tiny_vae(folder) -> None:
    """A random VAE whose shift and scale make the shapes world's latents zero-mean and unit-variance, as a
    released VAE's `shift_factor` and `scaling_factor` do for natural images (random weights give latents of a
    tiny spread, which the noise would drown at every t)."""
    from diffusers import AutoencoderKL

    from pixrun.config import load_config
    from pixrun.pipeline import build_world

    torch.manual_seed(VAE_SEED)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
    )
    images, _ = build_world(load_config()).batch(VAE_SEED, 0, 256, 64)
    with torch.no_grad():
        latents = vae.encode(images.float() / 127.5 - 1).latent_dist.mode()
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1 / latents.std().item())
    vae.save_pretrained(folder)


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    one_thread()
    vae = RUNS / "latent-vae"
    if not (vae / "config.json").exists():
        tiny_vae(vae)
    run_dir = train_run("latent", [f"latent.vae={vae}", *LATENT_OVERRIDES, "train.checkpoint_every=100"], args.steps)
    steps = checkpoint_steps(run_dir)
    curve = losses(run_dir)
    first, last = curve[:3], curve[-3:]
    result = {
        "about": "shapes world in the latent space of a tiny random AutoencoderKL (factor 4, 4 channels)",
        "command": f"OMP_NUM_THREADS=1 .venv/bin/python experiments/latent_shapes.py --steps {args.steps}",
        "machine": machine(),
        "overrides": LATENT_OVERRIDES,
        "loss_first_logs": first,
        "loss_last_logs": last,
        "held_out_mse_by_t": {step: held_out_mse(run_dir, step) for step in (steps[0], steps[-1])},
        "samples": str(max((run_dir / "samples").glob("step_*.png")).relative_to(RUNS.parents[1])),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latent_shapes.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
