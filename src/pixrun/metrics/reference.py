"""Reference image sets for the quality metrics, and a cache of their features.

A reference set is a folder of images or a seeded sample of the shapes world. Its features, per network, are
cached as safetensors (the features) + JSON (what they are of) under a name hashed from the network's weights and
the set's description (source, count, resolution), so that repeated evaluations only run the feature networks on
the generated images.
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from pixrun.data.shapes import ShapesWorld
from pixrun.metrics.features import extract_features

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Shapes-world scenes for references and held-out measurements come from this stream; training draws its
# batches from the stream of train.seed (0 by default), a different one unless train.seed is set to this value.
REFERENCE_SEED = 2_000_003


@dataclass
class ReferenceImages:
    """How to get a reference set's images ([-1, 1], (N, 3, H, W)), and the description that names them in the
    cache (None: never cached). `captions`: the shapes world's captions, to generate images for the same prompts."""

    load: Callable[[], torch.Tensor]
    description: dict | None
    captions: list[str] | None = None


def tensor_reference(images: torch.Tensor) -> ReferenceImages:
    return ReferenceImages(lambda: images, None)


def shapes_scenes(world: ShapesWorld, count: int, seed: int = REFERENCE_SEED):
    """`count` scenes drawn as in training (held-out pairs never shown); scene i depends on (seed, i) only."""
    return [world.sample_scene(np.random.default_rng([seed, i])) for i in range(count)]


def render_scenes(world: ShapesWorld, scenes, resolution: int) -> torch.Tensor:
    images = np.stack([world.render(scene, resolution) for scene in scenes]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1


def shapes_reference(world: ShapesWorld, resolution: int, count: int, seed: int = REFERENCE_SEED) -> ReferenceImages:
    scenes = shapes_scenes(world, count, seed)
    description = {
        "source": "shapes",
        "kinds": world.kinds,
        "colors": world.colors,
        "heldout": world.heldout,
        "task_weights": world.task_weights,
        "resolution": resolution,
        "count": count,
        "seed": seed,
    }
    return ReferenceImages(lambda: render_scenes(world, scenes, resolution), description, [s.caption for s in scenes])


def folder_reference(folder: str | Path, count: int, resolution: int) -> ReferenceImages:
    """The first `count` images of a folder (sorted by name), as RGB, resized (bicubic) to `resolution` square
    when they are not already: the generated images' size, so both sets reach the networks alike."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if len(files) < count:
        raise FileNotFoundError(f"reference folder {folder} has {len(files)} images, {count} are needed")
    listing = hashlib.sha256("".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files).encode())

    def load() -> torch.Tensor:
        images = []
        for path in files:
            image = Image.open(path).convert("RGB")
            if image.size != (resolution, resolution):
                image = image.resize((resolution, resolution), Image.BICUBIC)
            images.append(np.asarray(image))
        array = np.stack(images).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(array)).float() / 127.5 - 1

    description = {
        "source": "folder", "path": str(folder), "files": listing.hexdigest(), "count": count, "resolution": resolution
    }
    return ReferenceImages(load, description)


def reference_features(
    reference: ReferenceImages, network: nn.Module, cache_dir: str | Path | None, batch_size: int = 32
) -> np.ndarray:
    """float64 (N, D) features of the reference set, read from the cache when it has them."""
    cacheable = cache_dir is not None and reference.description is not None and network.key is not None
    if not cacheable:
        return extract_features(network, reference.load(), batch_size)
    record = {"network": network.key, **reference.description}
    name = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    tensors_path = Path(cache_dir).expanduser() / f"{name}.safetensors"
    if tensors_path.is_file():
        return load_file(tensors_path)["features"].double().numpy()
    features = extract_features(network, reference.load(), batch_size)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    # Features come out of fp32 networks, so float32 stores them exactly.
    partial = tensors_path.with_suffix(".partial")
    save_file({"features": torch.from_numpy(features).float()}, partial)
    partial.replace(tensors_path)  # atomic: a killed run never leaves a truncated cache entry
    tensors_path.with_suffix(".json").write_text(json.dumps({**record, "shape": list(features.shape)}, indent=1))
    return features
