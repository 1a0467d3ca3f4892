"""Compositional evaluation: GenEval's rules, applied to images of the shapes world.

GenEval detects objects with Mask2Former and names colours with CLIP; here the world is simple enough
to detect by segmenting from the background, naming the colour in CIELAB against the world's colours and
GenEval's other colour names, and matching shape templates (placed by the component's area and centroid,
and blurred as much as the image is, so soft generations are still recognised). The prompts, their
include/exclude metadata and the judging rules follow GenEval (djghosh13/geneval,
evaluation/evaluate_images.py), counting included: counting prompts count only confident detections.
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
    Scene,
    ShapesWorld,
    draw_shape,
    make_caption,
)
from pixrun.metrics import generate_images
from pixrun.pipeline import build_world, load_run, load_run_config, to_uint8
from pixrun.runtime import resolve_device

POSITION_THRESHOLD = 0.1  # GenEval's default: offsets shrink by 10% of the objects' summed sizes
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that makes a pixel foreground
MIN_AREA_FRACTION = 0.004  # smaller components (of the image area) are noise
MAX_COLOR_SPREAD = 40.0  # median RGB distance from the component's median colour: above, not a flat shape

# GenEval's colour names (plus grey) that the shapes module has no colour for, at the RGB the xkcd colour
# survey gives each: a blob nearest one of them takes that name, which no prompt of the world asks for.
OTHER_COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "brown": (101, 55, 0),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (146, 149, 145),
}
NAMED_COLOR_RGB = {**COLOR_RGB, **OTHER_COLOR_RGB}
# A blob takes the nearest name only within this fraction of the smallest CIELAB distance between two of
# the world's colours (blue and purple, 26: radius 19.5). Above what a 20-level colour cast leaves after
# white balance (<= 14); the two closest colours' discs overlap, and the nearest name settles that overlap.
COLOR_RADIUS_FRACTION = 0.75
# sRGB's linear RGB -> CIE XYZ (IEC 61966-2-1, D65 white); its rows' sums are the white point.
SRGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])

# A kind is named when its template IoU reaches MIN_SHAPE_IOU, above the most a clean shape scores against
# another kind's template (0.85, a 13 px diamond against the circle at 64 px; tests/test_evaluate.py) ...
MIN_SHAPE_IOU = 0.86
# ... and leads the next kind by MIN_SHAPE_MARGIN: about half the least a clean shape leads by at 64 px (0.09).
MIN_SHAPE_MARGIN = 0.05
# Counting prompts count only detections this confident, as GenEval counts at detector score 0.9 (detects
# at 0.3): shapes about as clean as the world's own, which score >= 0.91 at 64 px (>= 0.95 at 128 px).
COUNTING_SHAPE_IOU = 0.89
TEMPLATE_BLURS = (0.0, 0.5, 1.0, 1.5)  # Gaussian sigmas (px) tried on each template: soft images, soft templates
EDGE_BAND = 2  # px around a component that still count towards its coverage: blur spreads it over the edge
BACKGROUND_RING = 2  # px beyond that band whose median is the background there (images may have gradients)
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
    color: str  # a name of NAMED_COLOR_RGB, or "unknown"
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


def ground_truth_scene(world: ShapesWorld, spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A scene of the world that meets `spec` (held-out pairs allowed): the prompt's ground truth."""
    kinds: list[str] = []
    colors: list[str] = []
    first_object: list[int] = []  # index of each include entry's first object
    relation = None
    for req in spec.include:
        first_object.append(len(kinds))
        for _ in range(req.count):
            kinds.append(req.kind)
            colors.append(req.color or world.random_color(rng, req.kind))
        if req.position is not None:
            rel, target = req.position
            relation = (first_object[-1], rel, first_object[target])
    return world.compose(rng, spec.task, spec.prompt, kinds, colors, relation)


def detect(image: np.ndarray, world: ShapesWorld) -> list[Detection]:
    """Objects in a uint8 H×W×3 image: connected components that differ from the background (the
    median of the border), named by their interior's median colour and their best-matching template."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    labels, _ = ndimage.label(np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE)
    radius = color_radius(world.colors)

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
        color = name_color(median, background, radius)
        if np.median(np.linalg.norm(colors - median, axis=-1)) > MAX_COLOR_SPREAD:
            detections.append(Detection("unknown", color, bbox, 0.0))
            continue

        # How much of each pixel the object covers: where its colour lies from the background around it
        # (a ring just outside) to the object colour, over the component and a band around it (not other
        # components) where its blurred edge fades out.
        reach = EDGE_BAND + BACKGROUND_RING
        window = tuple(slice(max(s.start - reach, 0), s.stop + reach) for s in box)
        own, free = labels[window] == label, labels[window] == 0
        near = ndimage.binary_dilation(own, iterations=EDGE_BAND)
        ring = ndimage.binary_dilation(near, iterations=BACKGROUND_RING) & ~near & free
        local_background = np.median(pixels[window][ring], axis=0) if ring.any() else background
        direction = median - local_background
        coverage = (pixels[window] - local_background) @ direction / (direction @ direction)
        ious = template_ious(np.clip(coverage, 0, 1) * (near & (own | free)), world.kinds)
        best, second = sorted(ious.values(), reverse=True)[:2]
        named = best >= MIN_SHAPE_IOU and best - second >= MIN_SHAPE_MARGIN
        kind = max(ious, key=ious.__getitem__) if named else "unknown"
        detections.append(Detection(kind, color, bbox, best))
    return detections


def srgb_to_lab(rgb: np.ndarray, white: np.ndarray | None = None) -> np.ndarray:
    """CIELAB of sRGB colours (0-255, last axis RGB). `white`: the sRGB colour to see as neutral (von Kries:
    linear channels scaled so it becomes a grey of its own luminance); None: sRGB's own D65 white."""

    def linear(values: np.ndarray) -> np.ndarray:
        c = np.asarray(values, dtype=np.float64) / 255
        return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)

    rgb_linear = linear(rgb)
    if white is not None:
        white_linear = linear(white) + 1e-3  # a black "white" has nothing to balance: gains of 1, not 0 / 0
        rgb_linear = rgb_linear * (SRGB_TO_XYZ[1] @ white_linear) / white_linear
    xyz = rgb_linear @ SRGB_TO_XYZ.T / SRGB_TO_XYZ.sum(axis=1)
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def color_radius(colors: Sequence[str]) -> float:
    """How far (CIELAB) a colour may lie from a name and still take it: COLOR_RADIUS_FRACTION of the
    smallest distance between two of `colors`."""
    lab = srgb_to_lab(np.array([COLOR_RGB[c] for c in colors]))
    distances = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    return COLOR_RADIUS_FRACTION * float(distances[np.triu_indices(len(colors), k=1)].min())


def name_color(rgb: np.ndarray, background: np.ndarray, radius: float) -> str:
    """The name in NAMED_COLOR_RGB nearest `rgb` in CIELAB, seen against the (near-neutral) background
    as white, so that a colour cast over the whole image does not change it; "unknown" beyond `radius`."""
    names = list(NAMED_COLOR_RGB)
    distances = np.linalg.norm(
        srgb_to_lab(np.array(list(NAMED_COLOR_RGB.values()))) - srgb_to_lab(rgb, white=background), axis=-1
    )
    nearest = int(np.argmin(distances))
    return names[nearest] if distances[nearest] <= radius else "unknown"


def template_ious(coverage: np.ndarray, kinds: Sequence[str]) -> dict[str, float]:
    """Soft IoU (sum of min over sum of max) of a component's coverage with each kind drawn over it
    with the same area and centroid, which blur leaves unchanged (unlike the outline or bounding box),
    and blurred by whichever of TEMPLATE_BLURS fits best."""
    area = coverage.sum()
    blur_reach = math.ceil(4 * max(TEMPLATE_BLURS))  # scipy's Gaussian kernels reach 4 sigma
    # Room for any kind's template, and for its blurred edge.
    pad = int(math.sqrt(area / min(SHAPE_FILL.values()))) + blur_reach + 2
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
        # Blur and compare only where either is non-zero, plus the kernel's reach: both are zero elsewhere.
        ys, xs = np.nonzero((observed > 0) | (template > 0))
        box = (
            slice(max(ys.min() - blur_reach, 0), ys.max() + 1 + blur_reach),
            slice(max(xs.min() - blur_reach, 0), xs.max() + 1 + blur_reach),
        )
        ious[kind] = max(
            float(np.minimum(observed[box], blurred).sum() / np.maximum(observed[box], blurred).sum())
            for blurred in (ndimage.gaussian_filter(template[box], sigma) for sigma in TEMPLATE_BLURS)
        )
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
    no exclude clause's count is reached; counting prompts see only detections of COUNTING_SHAPE_IOU
    and above (GenEval's counting threshold), other prompts every detection of a known kind."""
    min_score = COUNTING_SHAPE_IOU if spec.task == "counting" else MIN_SHAPE_IOU
    by_kind: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: d.score, reverse=True):
        if detection.score >= min_score:
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


def evaluate_pipeline(pipeline, world: ShapesWorld, config, per_task: int | None = None,
                      ranks=None) -> dict[str, float | None] | None:
    """Score `pipeline` (with its sampling settings): images for `world`'s evaluation prompts (`config`: an
    EvalConfig; `per_task` overrides its prompts_per_task), image i from the noise of seed `config.seed + i`, then
    `score`. With `ranks` (pixrun.runtime.World) every rank generates a part and rank 0 scores (None elsewhere)."""
    generated = evaluation_images(pipeline, world, config, per_task, ranks)
    return None if generated is None else score(*generated, world)


def evaluation_images(pipeline, world: ShapesWorld, config, per_task: int | None = None,
                      ranks=None) -> tuple[list[PromptSpec], list[list[np.ndarray]]] | None:
    """The evaluation's prompts and, for each, its uint8 images, as `evaluate_pipeline` scores them (None on ranks
    other than 0)."""
    specs = evaluation_prompts(world, per_task or config.prompts_per_task, seed=config.seed)
    prompts = [spec.prompt for spec in specs for _ in range(config.images_per_prompt)]
    images = generate_images(pipeline, prompts, config.seed, config.batch_size, ranks)
    if images is None:
        return None
    images, n = list(to_uint8(images)), config.images_per_prompt
    return specs, [images[i * n : (i + 1) * n] for i in range(len(specs))]


def evaluation_record(scores: dict, pipeline, config, per_task: int | None, weights: str) -> dict:
    """What eval.json holds: the scores and how they were made."""
    return {**scores, "weights": weights, "prompts": len(TASKS) * (per_task or config.prompts_per_task),
            "images_per_prompt": config.images_per_prompt, "sample": dataclasses.asdict(pipeline.sample)}


def scores_source(config) -> bool:
    """Whether the strict evaluator can score a run of `config`: its prompts and detector are the shapes world's."""
    return config.data.source == "shapes"


def evaluate_run(
    run_dir: str | Path, per_task: int | None = None, weights: str = "ema", sample=None
) -> dict[str, float | None]:
    """Score a trained run (`evaluate_pipeline` with its eval config; `sample` replaces the run's sampling
    settings) and write its eval.json."""
    run_config = load_run_config(run_dir)
    run = load_run(run_dir, weights=weights, device=resolve_device(run_config.train.device))
    if sample is not None:
        run = dataclasses.replace(run, sample=sample)
    scores = evaluate_pipeline(run, build_world(run_config), run_config.eval, per_task)
    record = evaluation_record(scores, run, run_config.eval, per_task, weights)
    (Path(run_dir) / "eval.json").write_text(json.dumps(record, indent=1))
    return scores
