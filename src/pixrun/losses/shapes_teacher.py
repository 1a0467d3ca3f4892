"""A feature network the shapes world trains for itself: REPA's teacher and the network of a perceptual loss where
no pretrained network (DINO, VGG) can be downloaded.

A small conv net (3x3 convs with stride, GroupNorm, SiLU; about 10 M multiply-adds per 64-px image) learns, for
each cell of an 8x8 grid, the kind and the colour of the object covering the cell (or background) and where the
cell lies in that object (its offset from the centre and the object's size): labels the world knows exactly
(`ShapesWorld.render_labels`). It trains with AdamW for a fixed number of steps on a fixed pool of rendered
scenes, deterministically from its seed and without touching the run's random state, and is cached as
safetensors + JSON under `$PIXRUN_CACHE` (default ~/.cache/pixrun)/shapes_teacher, keyed by a hash of everything
that defines it; the JSON keeps its training time and held-out accuracy, which the run prints.

It is trained on every kind and colour of the world (so it serves any `data.kinds` / `data.colors`) but never on
the default's held-out pairs (`ShapesConfig.heldout`), so the evaluation's unseen pairs stay unseen.
"""

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pixrun.data.shapes import COLOR_RGB, SHAPE_KINDS, ShapesConfig, ShapesWorld

KIND_CLASSES = ("background", *SHAPE_KINDS)
COLOR_CLASSES = ("background", *COLOR_RGB)
GEOMETRY = 3  # offset of the cell centre from the object centre (x, y), in object sizes, and the object's size
CELL = 8  # pixels per label cell: the network's output stride
BACKGROUND_WEIGHT = 0.2  # of a background cell in the classification losses, against 1 for an object's
FORMAT = 1  # bump when the network or its training changes in a way the spec does not name


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that defines a trained teacher: its cache key is a hash of these."""

    resolution: int = 64  # scenes are rendered at this size; other images are resized to it
    widths: tuple[int, int, int] = (16, 32, 64)  # channels of the three stages (strides 2, 4, 8)
    scenes: int = 2048  # rendered once, then trained on with random horizontal flips and noise
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    heldout: tuple[str, ...] = tuple(ShapesConfig().heldout)  # pairs the teacher never sees
    test_scenes: int = 256  # held-out scenes its accuracy is measured on

    def key(self) -> str:
        description = json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(description.encode()).hexdigest()[:16]


DEFAULT_SPEC = TeacherSpec()  # the teacher runs use; tests swap in a smaller one


def conv_block(inputs: int, outputs: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride, 1), nn.GroupNorm(8, outputs), nn.SiLU())


class ShapesFeatures(nn.Module):
    """The network: three stages at strides 2, 4 and 8 (their outputs are the perceptual loss's taps, the last one
    REPA's target), and a 1x1 head that reads the labels off the last stage (used only in training)."""

    def __init__(self, widths: tuple[int, int, int], resolution: int):
        super().__init__()
        a, b, c = widths
        self.resolution = resolution
        self.stages = nn.ModuleList([
            conv_block(3, a, 2),
            nn.Sequential(conv_block(a, b, 2), conv_block(b, b, 1)),
            nn.Sequential(conv_block(b, c, 2), conv_block(c, c, 1), conv_block(c, c, 1)),
        ])
        self.head = nn.Conv2d(c, len(KIND_CLASSES) + len(COLOR_CLASSES) + GEOMETRY, 1)
        self.dim = c

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1], (B, 3, H, W), any size -> the three stages' outputs at the network's resolution."""
        x = x.float()  # x̂₀ may come out of autocast in bf16, which antialiased resizing does not take on CPU
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        taps = []
        for stage in self.stages:
            x = stage(x)
            taps.append(x)
        return taps

    def grid_tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The last stage's features (8 x 8 cells) average-pooled to a `grid` of tokens, (B, grid_h * grid_w, dim)
        in raster order; a grid finer than the cells repeats them."""
        features = F.adaptive_avg_pool2d(self.taps(x)[-1], grid)
        return features.flatten(2).transpose(1, 2)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-cell kind logits, colour logits and geometry, each (B, C, cells, cells)."""
        out = self.head(self.taps(x)[-1])
        return out.split([len(KIND_CLASSES), len(COLOR_CLASSES), GEOMETRY], dim=1)

    def train(self, mode: bool = True) -> "ShapesFeatures":
        return super().train(False)  # nothing in it acts differently in training; frozen under a parent's .train()


def cell_labels(world: ShapesWorld, scene, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell (resolution / CELL per side): kind class, colour class (0 background) of the object covering most
    of the cell, and its geometry (dx, dy, size; 0 for background)."""
    cells = resolution // CELL
    pixels = torch.from_numpy(world.render_labels(scene, resolution)).long()
    share = F.avg_pool2d(F.one_hot(pixels, len(scene.objects) + 1).permute(2, 0, 1).float(), CELL)
    owner = share.argmax(0).numpy()  # 0 background, i + 1 object i
    kind_of = np.array([0] + [KIND_CLASSES.index(o.kind) for o in scene.objects])
    color_of = np.array([0] + [COLOR_CLASSES.index(o.color) for o in scene.objects])
    centre = (np.arange(cells) + 0.5) / cells
    geometry = np.zeros((GEOMETRY, cells, cells), dtype=np.float32)
    for i, obj in enumerate(scene.objects, start=1):
        mine = owner == i
        geometry[0][mine] = np.broadcast_to((centre[None, :] - obj.cx) / obj.size, (cells, cells))[mine]
        geometry[1][mine] = np.broadcast_to((centre[:, None] - obj.cy) / obj.size, (cells, cells))[mine]
        geometry[2][mine] = obj.size
    return kind_of[owner], color_of[owner], geometry


def rendered_pool(spec: TeacherSpec, stream: int, count: int) -> dict[str, torch.Tensor]:
    """`count` scenes of the teacher's world (scene i from (seed, stream, i)) with their cell labels."""
    world = ShapesWorld(kinds=SHAPE_KINDS, colors=tuple(COLOR_RGB), heldout=spec.heldout)
    images, kinds, colors, geometry = [], [], [], []
    for i in range(count):
        scene = world.sample_scene(np.random.default_rng([spec.seed, stream, i]))
        images.append(world.render(scene, spec.resolution))
        kind, color, geo = cell_labels(world, scene, spec.resolution)
        kinds.append(kind)
        colors.append(color)
        geometry.append(geo)
    image_batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return {"images": image_batch, "kinds": torch.from_numpy(np.stack(kinds)),
            "colors": torch.from_numpy(np.stack(colors)), "geometry": torch.from_numpy(np.stack(geometry))}


def teacher_loss(network: ShapesFeatures, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    kind_logits, color_logits, geometry = network.predict(batch["images"])
    inside = (batch["kinds"] > 0).unsqueeze(1).float()
    geometry_error = ((geometry - batch["geometry"]).pow(2) * inside).sum() / inside.sum().clamp(min=1)
    # background is most cells and the easy answer: weighted down, the objects are learnt sooner
    kind_weights, color_weights = (torch.ones(len(classes)).index_fill(0, torch.tensor(0), BACKGROUND_WEIGHT)
                                   for classes in (KIND_CLASSES, COLOR_CLASSES))
    return (F.cross_entropy(kind_logits, batch["kinds"], weight=kind_weights)
            + F.cross_entropy(color_logits, batch["colors"], weight=color_weights) + geometry_error)


@torch.no_grad()
def cell_accuracy(network: ShapesFeatures, pool: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-cell accuracy of kind and colour, over all cells and over the cells an object covers."""
    kind_logits, color_logits, _ = network.predict(pool["images"])
    kind_right = kind_logits.argmax(1) == pool["kinds"]
    color_right = color_logits.argmax(1) == pool["colors"]
    inside = pool["kinds"] > 0
    return {"kind": kind_right.float().mean().item(), "color": color_right.float().mean().item(),
            "kind_on_objects": kind_right[inside].float().mean().item(),
            "color_on_objects": color_right[inside].float().mean().item()}


def flipped(batch: dict[str, torch.Tensor], flip: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows where `flip` mirrored left-right, labels with them (every kind is symmetric about its vertical axis)."""
    def pick(x: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
        return torch.where(flip.view(-1, *[1] * (x.dim() - 1)), mirrored, x)

    geometry = batch["geometry"].flip(-1) * torch.tensor([-1.0, 1.0, 1.0]).view(1, GEOMETRY, 1, 1)
    return {"images": pick(batch["images"], batch["images"].flip(-1)),
            "kinds": pick(batch["kinds"], batch["kinds"].flip(-1)),
            "colors": pick(batch["colors"], batch["colors"].flip(-1)),
            "geometry": pick(batch["geometry"], geometry)}


def train_teacher(spec: TeacherSpec) -> tuple[ShapesFeatures, dict]:
    """The network trained from `spec` (the caller's random state untouched), and what to know of its training:
    seconds (rendering included; wall clock and CPU time of this process) and held-out cell accuracy."""
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        network = ShapesFeatures(spec.widths, spec.resolution)
        pool = rendered_pool(spec, 1, spec.scenes)
        optimizer = torch.optim.AdamW(network.parameters(), lr=spec.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, spec.lr, total_steps=spec.steps, pct_start=0.1)
        for _ in range(spec.steps):
            rows = torch.randint(spec.scenes, (spec.batch_size,))
            batch = flipped({k: v[rows] for k, v in pool.items()}, torch.rand(spec.batch_size) < 0.5)
            # noise of random strength: the perceptual loss feeds it imperfect predictions
            noise = torch.rand(spec.batch_size, 1, 1, 1) * 0.3
            batch["images"] = batch["images"] + noise * torch.randn_like(batch["images"])
            loss = teacher_loss(network, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    network.zero_grad(set_to_none=True)
    network.requires_grad_(False)
    accuracy = cell_accuracy(network, rendered_pool(spec, 2, spec.test_scenes))
    return network, {"train_seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "accuracy": accuracy}


def cache_root() -> Path:
    return Path(os.environ.get("PIXRUN_CACHE", "~/.cache/pixrun")).expanduser() / "shapes_teacher"


def load_teacher(spec: TeacherSpec | None = None, cache: Path | None = None) -> tuple[ShapesFeatures, dict]:
    """The teacher of `spec` (None: DEFAULT_SPEC) from the cache, or trained and cached; with its record
    (`train_seconds`, `accuracy`, `cached`: whether it came from the cache). Prints one line to stderr saying which,
    with the training time (stdout stays the caller's: `pixrun bench --json` prints only its JSON)."""
    spec = spec or DEFAULT_SPEC
    folder = cache or cache_root()
    weights, record_path = folder / f"{spec.key()}.safetensors", folder / f"{spec.key()}.json"
    if weights.is_file() and record_path.is_file():
        network = ShapesFeatures(spec.widths, spec.resolution)
        network.load_state_dict(load_file(weights), strict=True)
        record = {**json.loads(record_path.read_text()), "cached": True}
        print(f"pixrun: shapes teacher {spec.key()} from {folder} (trained in {record['train_seconds']} s)",
              file=sys.stderr)
        return network.requires_grad_(False), record
    network, record = train_teacher(spec)
    folder.mkdir(parents=True, exist_ok=True)
    # written under temporary names, then renamed: a process reading the cache meanwhile sees all or nothing
    tmp_weights, tmp_record = (path.with_name(f"{path.name}.{os.getpid()}.tmp") for path in (weights, record_path))
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, tmp_weights)
    tmp_record.write_text(json.dumps({"spec": dataclasses.asdict(spec), **record}, indent=1))
    os.replace(tmp_weights, weights)
    os.replace(tmp_record, record_path)
    accuracy = record["accuracy"]
    print(f"pixrun: shapes teacher {spec.key()} trained in {record['train_seconds']} s, held-out cell accuracy: "
          f"kind {accuracy['kind']:.3f}, colour {accuracy['color']:.3f} (on objects {accuracy['kind_on_objects']:.3f}"
          f", {accuracy['color_on_objects']:.3f}); cached in {folder}", file=sys.stderr)
    return network, {**record, "cached": False}
