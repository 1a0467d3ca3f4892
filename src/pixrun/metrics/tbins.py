"""MSE of the denoiser's x̂₀ in bins of t, on held-out images: how well it denoises at each noise level.

PRX tracks this during training in the bins [0, 0.3), [0.3, 0.6), [0.6, 1] (t = 1 is pure noise). Every image is
measured once in every bin, at a t drawn uniformly inside the bin, with its own caption: the bins see the same
images, so they differ only by noise level.
"""

import torch

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
) -> dict[str, float]:
    """{"mse_t0.0-0.3": ..., ...}: mean over images and pixels of (x̂₀ - x₀)², images in [-1, 1].
    Image i's t and noise in every bin come from generator seed + i: results do not depend on batch_size."""
    # Imported here: pixrun.config imports this package (MetricsConfig), and pixrun.pipeline imports pixrun.config.
    from pixrun.pipeline import compute_context

    bins = [(float(low), float(high)) for low, high in bins]

    denoiser, text_tower, flow = pipeline.denoiser, pipeline.text_tower, pipeline.flow
    device = next(denoiser.parameters()).device
    was_training = denoiser.training, text_tower.training
    denoiser.eval()
    text_tower.eval()
    squared_error = dict.fromkeys(bins, 0.0)
    for start in range(0, len(images), batch_size):
        x0 = images[start : start + batch_size].to(device)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(start, start + len(x0))]
        with compute_context(device, pipeline.config.train.precision):
            txt, mask = text_tower(captions[start : start + batch_size])
            for low, high in bins:
                t = torch.stack([low + (high - low) * torch.rand((), generator=g) for g in generators]).to(device)
                eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(device)
                x_t = flow.add_noise(x0, eps, t)
                x0_hat = flow.to_x0(denoiser(x_t, t, txt, mask).float(), x_t, t)
                squared_error[(low, high)] += (x0_hat - x0).pow(2).sum().item()
    denoiser.train(was_training[0])
    text_tower.train(was_training[1])
    return {bin_name(*key): total / images.numel() for key, total in squared_error.items()}
