"""MSE of the denoiser's x̂₀ in bins of t, on held-out images: how well it denoises at each noise level.

PRX tracks this during training in the bins [0, 0.3), [0.3, 0.6), [0.6, 1] (t = 1 is pure noise). Every image is
measured once in every bin, at a t drawn uniformly inside the bin, with its own caption: the bins see the same
images, so they differ only by noise level. In latent space (a pipeline with an autoencoder) x₀ is the images'
latents, the autoencoder's encoding, and the error is measured on them.
"""

import torch

from pixrun.runtime import compute_context

T_BINS = ((0.0, 0.3), (0.3, 0.6), (0.6, 1.0))


def bin_name(low: float, high: float) -> str:
    return f"mse_t{low:.1f}-{high:.1f}"


@torch.no_grad()
def mse_by_t(
    pipeline,
    images: torch.Tensor,
    captions: list[str],
    bins=T_BINS,
    seed: int = 0,
    batch_size: int = 64,
    world=None,
) -> dict[str, float]:
    """{"mse_t0.0-0.3": ..., ...}: mean over images and pixels (latent elements in latent space) of (x̂₀ - x₀)²,
    images in [-1, 1].
    Image i's t and noise in every bin come from generator seed + i: results do not depend on batch_size, nor on
    the number of ranks when a `world` (pixrun.runtime.World) splits the images between them."""
    bins = [(float(low), float(high)) for low, high in bins]
    mine, per_rank = world.share_slice(len(images)) if world is not None else (slice(0, len(images)), len(images))
    denoiser, text_tower, flow = pipeline.denoiser, pipeline.text_tower, pipeline.flow
    device = next(denoiser.parameters()).device
    was_training = denoiser.training, text_tower.training
    denoiser.eval()
    text_tower.eval()
    squared_error = torch.zeros(len(bins), dtype=torch.float64, device=device)
    for start in range(mine.start, mine.start + per_rank, batch_size):
        # a rank whose part is short still runs every pass (a sharded model needs them all), on weight-0 rows
        indices = [min(i, len(images) - 1) for i in range(start, min(start + batch_size, mine.start + per_rank))]
        counted = torch.tensor([i < mine.stop for i in range(start, start + len(indices))], device=device)
        x0 = images[indices].to(device)
        if pipeline.autoencoder is not None:
            x0 = pipeline.autoencoder.encode(x0)
        elements_per_image = x0[0].numel()
        generators = [torch.Generator().manual_seed(seed + i) for i in indices]
        with compute_context(device, pipeline.precision):
            txt, mask = text_tower([captions[i] for i in indices])
            for b, (low, high) in enumerate(bins):
                t = torch.stack([low + (high - low) * torch.rand((), generator=g) for g in generators]).to(device)
                eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(device)
                x_t = flow.add_noise(x0, eps, t)
                x0_hat = flow.to_x0(denoiser(x_t, t, txt, mask).float(), x_t, t)
                squared_error[b] += ((x0_hat - x0).pow(2).flatten(1).sum(1) * counted).sum()
    denoiser.train(was_training[0])
    text_tower.train(was_training[1])
    if world is not None and world.distributed:
        torch.distributed.all_reduce(squared_error)
    count = len(images) * elements_per_image
    return {bin_name(*key): total / count for key, total in zip(bins, squared_error.tolist())}
