"""Compositional evaluation: GenEval's rules, applied to images of the shapes world.

GenEval detects objects with Mask2Former and names colours with CLIP; here the world is simple enough
to detect by segmenting from the background, naming the nearest colour and matching shape templates
(placed by the component's area and centroid, so soft, blurry generations are still recognised). The
prompts, their include/exclude metadata and the judging rules follow GenEval (djghosh13/geneval,
evaluation/evaluate_images.py).
"""

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pixrun.data.shapes import (
    COLOR_RGB,
    NUMBER_WORDS,
    RELATIONS,
    SUPERSAMPLE,
    TASKS,
    ShapesWorld,
    draw_shape,
    make_caption,
)

POSITION_THRESHOLD = 0.1  # GenEval's default: offsets shrink by 10% of the objects' summed sizes
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that makes a pixel foreground
MIN_AREA_FRACTION = 0.004  # smaller components (of the image area) are noise
MAX_COLOR_SPREAD = 40.0  # median RGB distance from the component's median colour: above, not a flat shape
MIN_SHAPE_IOU = 0.6  # below this best template IoU, the component is of unknown kind
# Area of each shape as a fraction of its bounding square, and how far its centroid lies below the
# square's centre (as a fraction of the side): what places a template over a component.
SHAPE_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 1 / 2, "cross": 5 / 9, "diamond": 1 / 2}
CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0, "diamond": 0.0}
HELDOUT_COLOR_ATTR_PROMPTS = 2  # per held-out pair: the pair first, then second


@dataclass(frozen=True)
class Requirement:
    """One GenEval include/exclude clause: `count` objects of `kind` (with `color`); `position`
    (relation, j): each of them stands in `relation` to the objects matched by include entry j."""

    kind: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None


@dataclass(frozen=True)
class PromptSpec:
    task: str
    prompt: str
    include: tuple[Requirement, ...]
    exclude: tuple[Requirement, ...] = ()
    heldout: bool = False  # shows a held-out (colour, kind) pair: scored apart from the six tasks


@dataclass(frozen=True)
class Detection:
    kind: str  # a world kind, or "unknown"
    color: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive
    score: float  # IoU with the best-matching template; 0 for a blob that is not one flat colour


def prompt_spec(
    task: str,
    kinds: Sequence[str],
    colors: Sequence[str] = (),
    relation: str | None = None,
    heldout: bool = False,
) -> PromptSpec:
    """A prompt and its GenEval metadata; arguments as for shapes.make_caption."""
    prompt = make_caption(task, kinds, colors, relation)
    exclude: tuple[Requirement, ...] = ()
    if task == "single_object":
        include = (Requirement(kinds[0], 1),)
    elif task == "two_object":
        include = (Requirement(kinds[0], 1), Requirement(kinds[1], 1))
    elif task == "counting":
        include = (Requirement(kinds[0], len(kinds)),)
        exclude = (Requirement(kinds[0], len(kinds) + 1),)
    elif task == "colors":
        include = (Requirement(kinds[0], 1, colors[0]),)
    elif task == "position":
        if relation is None or relation not in RELATIONS:
            raise ValueError(f"position prompts need a relation, one of {RELATIONS}")
        include = (Requirement(kinds[1], 1), Requirement(kinds[0], 1, position=(relation, 0)))
    elif task == "color_attr":
        include = (Requirement(kinds[0], 1, colors[0]), Requirement(kinds[1], 1, colors[1]))
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return PromptSpec(task, prompt, include, exclude, heldout)


def evaluation_prompts(world: ShapesWorld, per_task: int, seed: int = 0) -> list[PromptSpec]:
    """`per_task` prompts for each task, all different while the task has enough of them, none showing
    a held-out pair; then for each held-out pair a `colors` prompt and color_attr prompts, marked heldout."""
    rng = np.random.default_rng(seed)
    kinds = world.kinds
    two_kinds = [(a, b) for a in kinds for b in kinds if a != b]
    candidates = {
        "single_object": [prompt_spec("single_object", [k]) for k in kinds],
        "two_object": [prompt_spec("two_object", pair) for pair in two_kinds],
        "counting": [prompt_spec("counting", [k] * n) for k in kinds for n in NUMBER_WORDS],
        "colors": [prompt_spec("colors", [k], [c]) for c, k in world.allowed_pairs],
        "position": [prompt_spec("position", pair, relation=r) for pair in two_kinds for r in RELATIONS],
        "color_attr": [
            prompt_spec("color_attr", [p[1], q[1]], [p[0], q[0]]) for p, q in world.color_attr_pairs
        ],
    }
    specs: list[PromptSpec] = []
    for task in TASKS:
        order = rng.permutation(len(candidates[task]))
        specs += [candidates[task][order[i % len(order)]] for i in range(per_task)]

    for color, kind in world.heldout:
        specs.append(prompt_spec("colors", [kind], [color], heldout=True))
        partners = [p for p in world.allowed_pairs if p[0] != color and p[1] != kind]
        for i, j in enumerate(rng.permutation(len(partners))[:HELDOUT_COLOR_ATTR_PROMPTS]):
            # The held-out object comes first in one prompt, second in the next.
            pair = [(color, kind), partners[j]][:: 1 if i % 2 == 0 else -1]
            specs.append(prompt_spec("color_attr", [k for _, k in pair], [c for c, _ in pair], heldout=True))
    return specs


def detect(image: np.ndarray, world: ShapesWorld) -> list[Detection]:
    """Objects in a uint8 H×W×3 image: connected components that differ from the background (the
    median of the border), named by their interior's median colour and their best-matching template."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    labels, _ = ndimage.label(np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE)
    palette = np.array([COLOR_RGB[c] for c in world.colors], dtype=np.float32)

    detections = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[box] == label
        if mask.sum() < MIN_AREA_FRACTION * labels.size:
            continue
        rows, cols = box
        bbox = (cols.start, rows.start, cols.stop, rows.stop)
        # Colour from the interior only: anti-aliased edges blend with the background.
        interior = ndimage.binary_erosion(mask)
        colors = pixels[box][interior if interior.any() else mask]
        median = np.median(colors, axis=0)
        color = world.colors[np.argmin(np.linalg.norm(palette - median, axis=-1))]
        if np.median(np.linalg.norm(colors - median, axis=-1)) > MAX_COLOR_SPREAD:
            detections.append(Detection("unknown", color, bbox, 0.0))
            continue

        # How much of each pixel the object covers: where its colour lies from background to object colour.
        direction = median - background
        coverage = (pixels[box] - background) @ direction / (direction @ direction)
        ious = _template_ious(np.clip(coverage, 0, 1) * mask, world.kinds)
        best = max(ious, key=ious.__getitem__)
        kind = best if ious[best] >= MIN_SHAPE_IOU else "unknown"
        detections.append(Detection(kind, color, bbox, ious[best]))
    return detections


def _template_ious(coverage: np.ndarray, kinds: Sequence[str]) -> dict[str, float]:
    """Soft IoU (sum of min over sum of max) of a component's coverage with each kind drawn over it
    with the same area and centroid, which blur leaves unchanged (unlike the outline or bounding box)."""
    area = coverage.sum()
    pad = int(math.sqrt(area / min(SHAPE_FILL.values()))) + 2  # room for any kind's template
    observed = np.pad(coverage, pad)
    rows, cols = np.indices(observed.shape) + 0.5
    cy, cx = (observed * rows).sum() / area, (observed * cols).sum() / area
    height, width = observed.shape
    ious = {}
    for kind in kinds:
        size = math.sqrt(area / SHAPE_FILL[kind])
        centre_y = cy - CENTROID_DROP[kind] * size
        canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE))
        draw_shape(ImageDraw.Draw(canvas), kind, cx * SUPERSAMPLE, centre_y * SUPERSAMPLE, size * SUPERSAMPLE, 255)
        template = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255
        ious[kind] = float(np.minimum(observed, template).sum() / np.maximum(observed, template).sum())
    return ious


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """GenEval's relations of box A to box B, (x0, y0, x1, y1) with y down: a relation holds when the
    centre offset, shrunk by POSITION_THRESHOLD of the summed sizes, has more than half the offset's
    length along it."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def judge(spec: PromptSpec, detections: Sequence[Detection]) -> bool:
    """GenEval's rule: every include clause holds on the most confident detections of its kind, and
    no exclude clause's count is reached."""
    by_kind: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: d.score, reverse=True):
        by_kind.setdefault(detection.kind, []).append(detection)
    matched: list[list[Detection]] = []  # found objects per include entry, for position clauses
    for req in spec.include:
        found = by_kind.get(req.kind, [])[: req.count]
        if len(found) < req.count:
            return False
        if req.color is not None and sum(d.color == req.color for d in found) < req.count:
            return False
        if req.position is not None:
            relation, target = req.position
            targets = matched[target]
            if not all(relation in relative_position(d.bbox, t.bbox) for d in found for t in targets):
                return False
        matched.append(found)
    return all(len(by_kind.get(req.kind, [])) < req.count for req in spec.exclude)


def score(
    specs: Sequence[PromptSpec], images: Sequence[Sequence[np.ndarray]], world: ShapesWorld
) -> dict[str, float | None]:
    """Accuracy per task over every image of its prompts (images[i]: the images for specs[i]); overall:
    the mean of the six task accuracies; heldout_overall: the same mean over the held-out prompts'
    tasks (None without held-out prompts)."""
    if len(specs) != len(images):
        raise ValueError(f"got {len(images)} image lists for {len(specs)} prompts")
    results: dict[tuple[str, bool], list[bool]] = {}
    for spec, spec_images in zip(specs, images):
        verdicts = results.setdefault((spec.task, spec.heldout), [])
        verdicts += [judge(spec, detect(image, world)) for image in spec_images]

    for task in TASKS:
        if not results.get((task, False)):
            raise ValueError(f"no images for task {task!r}: the overall score needs all six tasks")
    tasks = {task: float(np.mean(results[(task, False)])) for task in TASKS}
    heldout = [float(np.mean(v)) for (_, is_heldout), v in results.items() if is_heldout and v]
    return {
        "overall": float(np.mean(list(tasks.values()))),
        **tasks,
        "heldout_overall": float(np.mean(heldout)) if heldout else None,
    }


def evaluate_run(
    run_dir: str | Path, per_task: int | None = None, weights: str = "ema", sample=None
) -> dict[str, float | None]:
    """Score a trained run: generate images for its world's evaluation prompts (the run's eval config;
    `per_task` overrides prompts_per_task; `sample` replaces the run's sampling settings) and apply `score`."""
    from pixrun.pipeline import build_world, load_run, resolve_device, to_uint8  # the model stack, only here

    run = load_run(run_dir, weights=weights)
    run.to(resolve_device(run.config.train.device))
    world = build_world(run.config)
    config = run.config.eval
    specs = evaluation_prompts(world, per_task or config.prompts_per_task, seed=config.seed)
    prompts = [spec.prompt for spec in specs for _ in range(config.images_per_prompt)]
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), config.batch_size):
        # Image i of the whole list gets the noise of seed + i, whatever the batching.
        batch = prompts[start : start + config.batch_size]
        images += list(to_uint8(run.generate(batch, seed=config.seed + start, sample=sample)))
    n = config.images_per_prompt
    scores = score(specs, [images[i * n : (i + 1) * n] for i in range(len(specs))], world)
    sampling = dataclasses.asdict(sample or run.config.sample)
    record = {**scores, "weights": weights, "prompts": len(specs), "images_per_prompt": n, "sample": sampling}
    (Path(run_dir) / "eval.json").write_text(json.dumps(record, indent=1))
    return scores
