"""The most a final layer of width k lets the denoiser score: the strict evaluator's ground-truth images with every
patch replaced by its projection onto the best k-dimensional affine subspace of training patches (their mean plus
the top k principal components). The final layer writes each patch as a fixed bias plus a linear map of the last
block's `width` features, so at the last sampling step (x-prediction: the image is x̂₀) every patch lies in such a
subspace of dimension `width`. Prints one JSON object: the strict scores and the patch energy kept, for each k.

    .venv/bin/python benchmarks/patch_rank_ceiling.py [--patch 16] [--ranks 32 64 128 256]
"""

import argparse
import json

import numpy as np

from pixrun.config import load_config
from pixrun.evaluate import evaluation_prompts, ground_truth_scene, score
from pixrun.pipeline import build_world

RESOLUTION = 64
IMAGES_PER_PROMPT = 4  # as the evaluator's default


def to_patches(images: np.ndarray, p: int) -> np.ndarray:
    n, h, w, c = images.shape
    return images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * c)


def from_patches(patches: np.ndarray, n: int, p: int) -> np.ndarray:
    g = RESOLUTION // p
    return patches.reshape(n, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, RESOLUTION, RESOLUTION, 3)


def group(images: np.ndarray, specs) -> list[list[np.ndarray]]:
    """The evaluator's layout: a list of uint8 images per prompt, rounded once here."""
    images = np.clip(images + 0.5, 0, 255).astype(np.uint8)
    return [list(images[i * IMAGES_PER_PROMPT:(i + 1) * IMAGES_PER_PROMPT]) for i in range(len(specs))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--train-images", type=int, default=3000, help="training scenes the components come from")
    parser.add_argument("--per-task", type=int, default=16, help="evaluation prompts per task (the evaluator's)")
    args = parser.parse_args()

    world = build_world(load_config())  # the default run's world, held-out pairs included
    rng = np.random.default_rng(1)
    train = np.stack([world.render(world.sample_scene(rng), RESOLUTION) for _ in range(args.train_images)])
    patches = to_patches(train.astype(np.float64), args.patch)
    mean = patches.mean(axis=0)
    _, singular, components = np.linalg.svd(patches - mean, full_matrices=False)
    energy = np.cumsum(singular**2) / (singular**2).sum()

    specs = evaluation_prompts(world, args.per_task)
    rng = np.random.default_rng(0)
    truth = np.stack([world.render(ground_truth_scene(world, spec, rng), RESOLUTION)
                      for spec in specs for _ in range(IMAGES_PER_PROMPT)]).astype(np.float64)
    result = {"patch": args.patch, "resolution": RESOLUTION, "ground_truth": score(specs, group(truth, specs), world)}
    centred = to_patches(truth, args.patch) - mean
    for k in args.ranks:
        basis = components[:k]
        images = from_patches(centred @ basis.T @ basis + mean, len(truth), args.patch)
        result[f"rank_{k}"] = {"energy_kept": float(energy[k - 1]), **score(specs, group(images, specs), world)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
