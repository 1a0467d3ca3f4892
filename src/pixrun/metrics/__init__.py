"""The quality metrics of the field: FID, KID, CMMD and DINO-MMD against a reference image set, and CLIPScore and
PickScore of the images with their prompts.

    networks = load_networks(config, device)                  # once; reuse across evaluations
    scores = quality_metrics(generated, reference, config, networks, captions)
    scores = shapes_quality_metrics(pipeline, shapes_world, config, networks)  # generate for the world, score

Definitions and where each network's weights come from: docs/metrics.md.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from pixrun.data.shapes import ShapesWorld
from pixrun.metrics.alignment import (
    ALIGNMENT_METRICS,
    CLIP_SCORE_DEFAULT,
    PICKSCORE_DEFAULT,
    PICKSCORE_PROCESSOR_DEFAULT,
    alignment_scores,
    build_alignment_network,
)
from pixrun.metrics.distances import fid, kid, rbf_mmd
from pixrun.metrics.features import (
    CLIP_DEFAULT,
    DINO_DEFAULT,
    NETWORK_OF_METRIC,
    build_feature_network,
    extract_features,
)
from pixrun.metrics.inception import FID_WEIGHTS_URL
from pixrun.metrics.reference import (
    REFERENCE_SEED,
    ReferenceImages,
    folder_reference,
    reference_features,
    shapes_reference,
    tensor_reference,
)
from pixrun.metrics.tbins import T_BINS, mse_by_t

REFERENCE_METRICS = tuple(NETWORK_OF_METRIC)  # scored against a reference image set
METRICS = REFERENCE_METRICS + ALIGNMENT_METRICS  # the alignment metrics score images against their prompts


@dataclass
class MetricsConfig:
    # any of fid, kid, cmmd, dino_mmd, clip_score, pickscore; the alignment metrics only when named
    metrics: list[str] = field(default_factory=lambda: list(REFERENCE_METRICS))
    reference: str = "shapes"  # "shapes": a held-out sample of the run's world; else a folder of images
    num_images: int = 1000  # generated images, and reference images
    seed: int = REFERENCE_SEED  # the shapes reference's scenes (and so the prompts); generation noise
    batch_size: int = 32  # feature extraction and generation
    inception: str = FID_WEIGHTS_URL  # path or URL of pt_inception-2015-12-05-6726825d.pth
    clip: str = CLIP_DEFAULT  # hub id or local folder
    dino: str = DINO_DEFAULT  # hub id or local folder
    clip_score: str = CLIP_SCORE_DEFAULT  # CLIPScore's CLIPModel and tokenizer: hub id or local folder
    pickscore: str = PICKSCORE_DEFAULT  # PickScore's CLIPModel: hub id or local folder
    pickscore_processor: str = PICKSCORE_PROCESSOR_DEFAULT  # PickScore's tokenizer: hub id or local folder
    cache_dir: str = "~/.cache/pixrun/reference"  # reference features; "" = no cache
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    random_init: bool = False  # tests only: random network weights instead of the real ones

    def validate(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"metrics.metrics has unknown {unknown}; available: {', '.join(METRICS)}")
        if self.num_images < 2 or self.batch_size < 1 or self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ValueError("metrics.num_images and metrics.kid_subset_size must be >= 2, batch sizes >= 1")


def needed_networks(metrics: list[str]) -> list[str]:
    """Feature networks by name (inception, clip, dino); an alignment metric's network is named as the metric."""
    return list(dict.fromkeys(NETWORK_OF_METRIC.get(m, m) for m in metrics))


def load_networks(config: MetricsConfig, device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """The networks the configured metrics need, by needed_networks' names, on `device`."""
    config.validate()
    weights = {"inception": config.inception, "clip": config.clip, "dino": config.dino}
    tokenizers = {"clip_score": config.clip_score, "pickscore": config.pickscore_processor}
    models = {"clip_score": config.clip_score, "pickscore": config.pickscore}
    networks = {}
    for name in needed_networks(config.metrics):
        if name in ALIGNMENT_METRICS:
            network = build_alignment_network(name, models[name], tokenizers[name], config.random_init)
        else:
            network = build_feature_network(name, weights[name], config.random_init)
        networks[name] = network.to(device)
    return networks


def quality_metrics(
    generated: torch.Tensor,
    reference: ReferenceImages | torch.Tensor,
    config: MetricsConfig,
    networks: dict[str, nn.Module] | None = None,
    captions: list[str] | None = None,
) -> dict[str, float]:
    """Scores of generated images ([-1, 1], (N, 3, H, W)) as configured: against the reference set fid, kid
    (+ kid_std), cmmd, dino_mmd, lower is better; with the images' prompts `captions`, clip_score and pickscore,
    higher is better."""
    aligned = [m for m in config.metrics if m in ALIGNMENT_METRICS]
    if aligned and captions is None:
        raise ValueError(f"metrics {aligned} score images against their prompts: pass their captions")
    networks = networks if networks is not None else load_networks(config)
    if isinstance(reference, torch.Tensor):
        reference = tensor_reference(reference)
    needed = needed_networks(config.metrics)
    missing = [name for name in needed if name not in networks]
    if missing:
        raise ValueError(f"metrics {config.metrics} need the {', '.join(missing)} network(s), which were not loaded")
    cache_dir = config.cache_dir or None
    scores: dict[str, float] = {}
    for name in needed:
        if name in ALIGNMENT_METRICS:
            continue
        network = networks[name]
        ours = extract_features(network, generated, config.batch_size)
        theirs = reference_features(reference, network, cache_dir, config.batch_size)
        for metric in config.metrics:
            if NETWORK_OF_METRIC[metric] != name:
                continue
            if metric == "fid":
                scores["fid"] = fid(ours, theirs)
            elif metric == "kid":
                scores["kid"], scores["kid_std"] = kid(ours, theirs, config.kid_subsets, config.kid_subset_size)
            else:
                scores[metric] = rbf_mmd(ours, theirs)
    if aligned:
        scores.update(alignment_scores(generated, captions, {m: networks[m] for m in aligned}, config.batch_size))
    return scores


def generate_batches(pipeline, prompts: list[str], seed: int, batch_size: int, sample=None,
                     resolution: int | None = None) -> Iterator[torch.Tensor]:
    """The images of `prompts` (pixrun.pipeline.Pipeline.generate: [-1, 1], on its device), `batch_size` at a time,
    in order; image i starts from the noise of seed `seed + i`, so they do not depend on batch_size. `sample`
    replaces the run's sampling settings."""
    for start in range(0, len(prompts), batch_size):
        yield pipeline.generate(prompts[start : start + batch_size], seed=seed + start, sample=sample,
                                resolution=resolution)


@torch.no_grad()
def generate_images(pipeline, prompts: list[str], seed: int, batch_size: int, world=None,
                    resolution: int | None = None) -> torch.Tensor | None:
    """One image per prompt, on the CPU; image i starts from the noise of seed `seed + i`, whatever the batch.

    With a `world` (pixrun.runtime.World) every rank generates its own contiguous part, all parts padded to one
    length so that a sharded model runs the same forward passes everywhere, and rank 0 gets every image (None
    elsewhere): the same images as one process makes."""
    mine, per_rank = world.share_slice(len(prompts)) if world is not None else (slice(0, len(prompts)), len(prompts))
    ours = prompts[mine] + [prompts[-1]] * (per_rank - (mine.stop - mine.start))  # padding, dropped on rank 0
    images = torch.cat(list(generate_batches(pipeline, ours, seed + mine.start, batch_size, resolution=resolution)))
    if world is not None:
        images = world.gather_to_main(images)
    return None if images is None else images[: len(prompts)].cpu()


def shapes_quality_metrics(
    pipeline, shapes_world: ShapesWorld, config: MetricsConfig, networks: dict[str, nn.Module] | None = None,
    world=None, resolution: int | None = None,
) -> dict[str, float]:
    """Generate `num_images` images for the captions of a held-out sample of `shapes_world` (the run's) and score
    them against that sample (or against the configured folder of images) and their captions, at `resolution`
    (default: the pipeline's). With a `world` (pixrun.runtime.World), every rank generates a part and rank 0
    scores (the others get {})."""
    resolution = resolution or pipeline.resolution
    shapes = shapes_reference(shapes_world, resolution, config.num_images, config.seed)
    generated = generate_images(pipeline, shapes.captions, config.seed, config.batch_size, world, resolution)
    if generated is None:
        return {}
    reference = shapes if config.reference == "shapes" else folder_reference(
        config.reference, config.num_images, resolution
    )
    return quality_metrics(generated, reference, config, networks, shapes.captions)


__all__ = [
    "ALIGNMENT_METRICS",
    "METRICS",
    "REFERENCE_METRICS",
    "T_BINS",
    "MetricsConfig",
    "ReferenceImages",
    "alignment_scores",
    "folder_reference",
    "generate_batches",
    "generate_images",
    "load_networks",
    "mse_by_t",
    "quality_metrics",
    "shapes_quality_metrics",
    "shapes_reference",
    "tensor_reference",
]
