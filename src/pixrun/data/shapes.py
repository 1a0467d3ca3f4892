"""The shapes world: an endless, seeded stream of captioned scenes of flat-coloured shapes, and the data source
that trains on it (`data.source: shapes`, the default).

Captions follow the six GenEval task templates, so a model trained here can be scored with
GenEval's rules by pixrun.evaluate. Scene layout lives in relative coordinates ([0, 1], y down),
so the same scene renders at any resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from pixrun.data.source import DataSource, HeldOut, LocalBatch, register_source
from pixrun.errors import ConfigError

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}

SHAPE_KINDS = ("circle", "square", "triangle", "cross", "diamond")
# Saturated and far apart (closest pair, blue/purple, is 26 apart in CIELAB), and all far from the light
# background; pixrun.evaluate names a colour only within 0.75 of that distance.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (240, 130, 20),
    "yellow": (245, 215, 25),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "purple": (130, 50, 190),
    "pink": (240, 110, 185),
    "cyan": (30, 190, 210),
}
DEFAULT_KINDS = ("circle", "square", "triangle", "cross")
DEFAULT_COLORS = ("red", "orange", "yellow", "green", "blue", "purple")

# Object size (side of its bounding square, relative to the image side) by number of objects: as large as
# the layout allows. Large objects make the caption explain much of the image, so that at high noise, where
# the image says little, the text lowers the loss a lot: this is what makes a model learn to follow it.
SIZE_RANGE = {1: (0.36, 0.52), 2: (0.28, 0.38), 3: (0.22, 0.30), 4: (0.20, 0.27)}
FRAME_MARGIN = 0.04  # empty border between objects and the image edge
OBJECT_GAP = 0.04  # minimum gap between object bounding boxes: keeps them separate components
PLACEMENT_CANDIDATES = 64  # candidate centres drawn at once per object
PLACEMENT_ATTEMPTS = 100
SUPERSAMPLE = 4  # draw at 4x, then box-downsample: anti-aliased edges


@dataclass(frozen=True)
class ShapeObject:
    kind: str
    color: str
    cx: float  # centre, relative to the image side
    cy: float
    size: float  # side of the bounding square, relative to the image side


@dataclass(frozen=True)
class Scene:
    task: str
    caption: str
    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]  # RGB at the image centre
    gradient: tuple[float, float]  # brightness change across the full width and height


def plural(kind: str) -> str:
    return kind + "es" if kind.endswith("s") else kind + "s"


def with_article(phrase: str) -> str:
    """The phrase with its article: "a circle", "an orange circle" (as GenEval's prompts write it)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def make_caption(
    task: str, kinds: Sequence[str], colors: Sequence[str] = (), relation: str | None = None
) -> str:
    """The caption of a scene: one kind per object (counting: the same kind repeated), colours
    for the colour tasks, and for `position` the relation of kinds[0] to kinds[1]."""
    if task == "single_object":
        return f"a photo of {with_article(kinds[0])}"
    if task == "two_object":
        return f"a photo of {with_article(kinds[0])} and {with_article(kinds[1])}"
    if task == "counting":
        return f"a photo of {NUMBER_WORDS[len(kinds)]} {plural(kinds[0])}"
    if task == "colors":
        return f"a photo of {with_article(f'{colors[0]} {kinds[0]}')}"
    if task == "position":
        return f"a photo of {with_article(kinds[0])} {relation} {with_article(kinds[1])}"
    if task == "color_attr":
        first, second = f"{colors[0]} {kinds[0]}", f"{colors[1]} {kinds[1]}"
        return f"a photo of {with_article(first)} and {with_article(second)}"
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, size: float, fill: int | tuple[int, int, int]
) -> None:
    """Draw one shape in pixel coordinates; it exactly fills the square of side `size` at (cx, cy)."""
    r = size / 2
    if kind == "circle":
        # PIL's ellipse box is inclusive of its last pixel.
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=fill)
        return
    if kind == "square":
        points = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif kind == "triangle":
        points = [(0, -r), (r, r), (-r, r)]
    elif kind == "diamond":
        points = [(0, -r), (r, 0), (0, r), (-r, 0)]
    elif kind == "cross":
        a = r / 3  # half the arm width: arms are a third of the size
        arm = [(-a, -r), (a, -r), (a, -a)]  # one arm's outline, clockwise from the top arm's left
        points = arm + [(-y, x) for x, y in arm] + [(-x, -y) for x, y in arm] + [(y, -x) for x, y in arm]
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPE_KINDS}")
    # PIL polygon vertices are pixel centres; shift by half a pixel to draw in continuous coordinates.
    draw.polygon([(cx + x - 0.5, cy + y - 0.5) for x, y in points], fill=fill)


def _separated(centres: np.ndarray, sizes: np.ndarray, candidates: np.ndarray, size: float) -> np.ndarray:
    """Which candidate centres keep a square of `size` at least OBJECT_GAP away from every placed one."""
    if len(centres) == 0:
        return np.ones(len(candidates), dtype=bool)
    distance = np.abs(candidates[:, None, :] - centres[None, :, :])  # candidate × placed × (x, y)
    needed = (sizes[None, :] + size) / 2 + OBJECT_GAP
    return ((distance >= needed[..., None]).any(axis=-1)).all(axis=-1)


def _satisfies(relation: str, a: np.ndarray, b: np.ndarray, size_a: float, size_b: float) -> np.ndarray:
    """Whether centres `a` (candidates) stand in `relation` to `b` with a clear margin: separated along
    the relation's axis and at most half as far off across it. This puts GenEval's normalised offset at
    >= 0.71 along the axis and <= 0.45 across it (the rule needs > 0.5), whatever the sizes."""
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
    along = sign * (a[:, axis] - b[axis])
    across = np.abs(a[:, 1 - axis] - b[1 - axis])
    return (along >= (size_a + size_b) / 2 + OBJECT_GAP) & (across <= along / 2)


class ShapesWorld:
    def __init__(
        self,
        kinds: Sequence[str] = DEFAULT_KINDS,
        colors: Sequence[str] = DEFAULT_COLORS,
        heldout: Sequence[str] = (),
        task_weights: Mapping[str, float] | None = None,
    ) -> None:
        """`heldout`: "colour kind" pairs never drawn in training scenes. `task_weights`: relative
        sampling weight per task; tasks left out get weight 0 (None: all tasks equally)."""
        self.kinds = tuple(dict.fromkeys(kinds))
        self.colors = tuple(dict.fromkeys(colors))
        for kind in self.kinds:
            if kind not in SHAPE_KINDS:
                raise ValueError(f"unknown shape kind {kind!r}; available: {SHAPE_KINDS}")
        for color in self.colors:
            if color not in COLOR_RGB:
                raise ValueError(f"unknown colour {color!r}; available: {tuple(COLOR_RGB)}")
        if len(self.kinds) < 2 or len(self.colors) < 2:
            raise ValueError("the shapes world needs at least two kinds and two colours")

        heldout_pairs = []
        for pair in heldout:
            words = pair.split()
            if len(words) != 2 or words[0] not in self.colors or words[1] not in self.kinds:
                raise ValueError(
                    f"held-out pair {pair!r} must be 'colour kind' with colour in {self.colors} "
                    f"and kind in {self.kinds}"
                )
            heldout_pairs.append((words[0], words[1]))
        self.heldout: tuple[tuple[str, str], ...] = tuple(dict.fromkeys(heldout_pairs))

        # (colour, kind) pairs training scenes may draw, and the colours each kind may take.
        self.allowed_pairs = tuple(
            (c, k) for k in self.kinds for c in self.colors if (c, k) not in self.heldout
        )
        self._kind_colors = {k: [c for c, k2 in self.allowed_pairs if k2 == k] for k in self.kinds}
        for kind, kind_colors in self._kind_colors.items():
            if not kind_colors:
                raise ValueError(f"every colour of {kind!r} is held out; keep at least one")
        # Ordered ((colour, kind), (colour, kind)) pairs for color_attr: different kinds and colours.
        self.color_attr_pairs = tuple(
            (p, q) for p in self.allowed_pairs for q in self.allowed_pairs if p[0] != q[0] and p[1] != q[1]
        )
        if not self.color_attr_pairs:
            raise ValueError("held-out pairs leave no two-colour, two-kind scene for color_attr")

        weights = dict.fromkeys(TASKS, 1.0) if task_weights is None else dict(task_weights)
        for task, weight in weights.items():
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r} in task_weights; expected one of {TASKS}")
            if weight < 0:
                raise ValueError(f"task weight for {task!r} is negative")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("task_weights must give some task a positive weight")
        self.task_weights = {task: weights.get(task, 0.0) for task in TASKS}
        self._task_probs = np.array([self.task_weights[task] / total for task in TASKS])

    def sample_scene(self, rng: np.random.Generator, task: str | None = None) -> Scene:
        """A training scene (never showing a held-out pair); `task` None samples by task weight."""
        if task is None:
            task = TASKS[rng.choice(len(TASKS), p=self._task_probs)]
        relation = None
        colors: list[str] = []
        if task in ("single_object", "colors"):
            color, kind = self.allowed_pairs[rng.integers(len(self.allowed_pairs))]
            kinds, colors = [kind], [color]
        elif task in ("two_object", "position"):
            kinds = [self.kinds[i] for i in rng.choice(len(self.kinds), size=2, replace=False)]
            relation = RELATIONS[rng.integers(len(RELATIONS))] if task == "position" else None
        elif task == "counting":
            kinds = [self.kinds[rng.integers(len(self.kinds))]] * int(rng.integers(2, 5))
        elif task == "color_attr":
            first, second = self.color_attr_pairs[rng.integers(len(self.color_attr_pairs))]
            colors, kinds = [first[0], second[0]], [first[1], second[1]]
        else:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        caption = make_caption(task, kinds, colors, relation)
        # Objects whose colour the caption leaves open still avoid held-out pairs.
        colors = colors or [self.random_color(rng, kind) for kind in kinds]
        return self.compose(rng, task, caption, kinds, colors, (0, relation, 1) if relation else None)

    def render(self, scene: Scene, resolution: int) -> np.ndarray:
        """uint8 H×W×3 image. Shapes are drawn at SUPERSAMPLE× as a colour layer (black elsewhere) and a
        coverage mask; box-downsampled, they composite exactly over the background (shapes never overlap)."""
        side = resolution * SUPERSAMPLE
        color_layer = Image.new("RGB", (side, side))
        coverage = Image.new("L", (side, side))
        draw_color, draw_coverage = ImageDraw.Draw(color_layer), ImageDraw.Draw(coverage)
        for obj in scene.objects:
            cx, cy, size = obj.cx * side, obj.cy * side, obj.size * side
            draw_shape(draw_color, obj.kind, cx, cy, size, COLOR_RGB[obj.color])
            draw_shape(draw_coverage, obj.kind, cx, cy, size, 255)
        premultiplied = np.asarray(color_layer.reduce(SUPERSAMPLE), dtype=np.float32)
        alpha = np.asarray(coverage.reduce(SUPERSAMPLE), dtype=np.float32)[..., None] / 255

        ramp = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
        brightness = scene.gradient[0] * ramp[None, :] + scene.gradient[1] * ramp[:, None]
        background = np.array(scene.background, dtype=np.float32) + brightness[..., None]
        image = background * (1 - alpha) + premultiplied
        return np.clip(image + 0.5, 0, 255).astype(np.uint8)

    def render_labels(self, scene: Scene, resolution: int) -> np.ndarray:
        """uint8 H×W map of which object covers each pixel of `render`'s image: 0 background, i + 1 object i of
        `scene.objects`. A pixel is an object's when the object covers at least half of it (same geometry, same
        supersampling as `render`)."""
        side = resolution * SUPERSAMPLE
        labels = np.zeros((resolution, resolution), dtype=np.uint8)
        for i, obj in enumerate(scene.objects):
            coverage = Image.new("L", (side, side))
            draw_shape(ImageDraw.Draw(coverage), obj.kind, obj.cx * side, obj.cy * side, obj.size * side, 255)
            labels[np.asarray(coverage.reduce(SUPERSAMPLE)) >= 128] = i + 1
        return labels

    def batch(
        self, seed: int, index: int, batch_size: int, resolution: int, rows: slice = slice(None)
    ) -> tuple[torch.Tensor, list[str]]:
        """Rows `rows` of batch `index` of stream `seed` (all by default): uint8 b×3×H×W images and their captions.
        The scene of global row i is drawn from its own generator, seeded by (seed, index, i): a pure function of
        the three, so training can resume mid-stream exactly, any rank renders the same scene for row i, and no
        rank draws for rows it does not render."""
        scenes = [self.sample_scene(np.random.default_rng([seed, index, row])) for row in range(batch_size)[rows]]
        images = torch.empty(len(scenes), 3, resolution, resolution, dtype=torch.uint8)
        for image, scene in zip(images, scenes):
            image.copy_(torch.from_numpy(self.render(scene, resolution)).permute(2, 0, 1))
        return images, [scene.caption for scene in scenes]

    def vocabulary(self) -> list[str]:
        """Every word a caption or evaluation prompt of this world can contain, sorted."""
        words = {"a", "photo", "of", "and", *NUMBER_WORDS.values(), *self.colors}
        words.update(word for relation in RELATIONS for word in relation.split())
        words.update(self.kinds)
        words.update(plural(kind) for kind in self.kinds)
        if any(word[0] in "aeiou" for word in (*self.kinds, *self.colors)):
            words.add("an")
        return sorted(words)

    def random_color(self, rng: np.random.Generator, kind: str) -> str:
        """A colour `kind` takes in training scenes (never a held-out pair)."""
        kind_colors = self._kind_colors[kind]
        return kind_colors[rng.integers(len(kind_colors))]

    def compose(
        self,
        rng: np.random.Generator,
        task: str,
        caption: str,
        kinds: Sequence[str],
        colors: Sequence[str],
        relation: tuple[int, str, int] | None,
    ) -> Scene:
        """Lay out the objects and pick a background. `relation` (i, rel, j): object i is `rel` object j."""
        sizes, centres = self._layout(rng, len(kinds), relation)
        objects = tuple(
            ShapeObject(kind, color, float(x), float(y), float(size))
            for kind, color, (x, y), size in zip(kinds, colors, centres, sizes)
        )
        # Light grey/off-white, random brightness, tint and gradient: stays far from every shape colour.
        brightness = rng.uniform(222, 242)
        red, green, blue = (brightness + rng.uniform(-5, 5, size=3)).round().astype(int).tolist()
        gradient_x, gradient_y = rng.uniform(-10, 10, size=2).tolist()
        return Scene(task, caption, objects, (red, green, blue), (gradient_x, gradient_y))

    def _layout(
        self, rng: np.random.Generator, count: int, relation: tuple[int, str, int] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sizes and centres for `count` objects, inside the frame and apart from each other. Objects are
        placed in turn, each at the first valid one of a batch of random candidates; a dead end restarts."""
        low, high = SIZE_RANGE[count]
        # The relation's reference object goes first, so its partner can be placed relative to it.
        order = list(range(count))
        if relation is not None:
            order.remove(relation[2])
            order.insert(0, relation[2])
        for _ in range(PLACEMENT_ATTEMPTS):
            sizes = rng.uniform(low, high, size=count)
            centres = np.zeros((count, 2))
            for placed, i in enumerate(order):
                lowest, highest = FRAME_MARGIN + sizes[i] / 2, 1 - FRAME_MARGIN - sizes[i] / 2
                candidates = rng.uniform(lowest, highest, size=(PLACEMENT_CANDIDATES, 2))
                done = order[:placed]
                valid = _separated(centres[done], sizes[done], candidates, sizes[i])
                if relation is not None and i == relation[0]:
                    _, rel, j = relation
                    valid &= _satisfies(rel, candidates, centres[j], sizes[i], sizes[j])
                if not valid.any():
                    break
                centres[i] = candidates[np.argmax(valid)]
            else:
                return sizes, centres
        raise RuntimeError(f"could not lay out {count} objects; the frame is too crowded")


@dataclass
class ShapesConfig:
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    colors: list[str] = field(default_factory=lambda: list(DEFAULT_COLORS))
    heldout: list[str] = field(default_factory=lambda: ["purple triangle", "orange circle"])  # never trained on
    task_weights: dict[str, float] | None = None  # None: the six tasks equally

    def validate(self, config) -> None:
        self.world()

    def world(self) -> ShapesWorld:
        try:
            return ShapesWorld(kinds=self.kinds, colors=self.colors, heldout=self.heldout,
                               task_weights=self.task_weights)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None


@register_source
class ShapesSource(DataSource):
    """The built-in world: nothing to read and nothing to save; a row's scene depends on (seed, step, row) alone."""

    name = "shapes"
    config_class = ShapesConfig

    def __init__(self, world: ShapesWorld, seed: int, rank: int, world_size: int, *, pin_memory: bool = False):
        self.world, self.seed, self.rank, self.world_size, self.pin_memory = world, seed, rank, world_size, pin_memory

    @classmethod
    def build(cls, config, world, text_tower=None, autoencoder=None, pin_memory: bool = False) -> ShapesSource:
        return cls(config.data.section.world(), config.train.seed, world.rank, world.size, pin_memory=pin_memory)

    @classmethod
    def tokenizer_captions(cls, config) -> list[str]:
        """The world's words, each one token."""
        return config.data.section.world().vocabulary()

    def batch(self, step: int, stage, stage_start: int) -> LocalBatch:
        """Each rank draws and renders only its own rows."""
        per_rank = stage.batch_size // self.world_size
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        images, captions = self.world.batch(self.seed, step, stage.batch_size, stage.resolution, rows=mine)
        return LocalBatch(images.pin_memory() if self.pin_memory else images, captions)

    def held_out(self, stage, count: int, seed: int) -> HeldOut:
        """`count` scenes drawn as in training (held-out pairs never shown), scene i from (seed, i) alone."""
        world, resolution = self.world, stage.resolution
        scenes = [world.sample_scene(np.random.default_rng([seed, i])) for i in range(count)]
        images = np.stack([world.render(scene, resolution) for scene in scenes]).transpose(0, 3, 1, 2)
        # as pixrun.metrics.reference.shapes_reference names the same scenes: they share cached features
        description = {"source": "shapes", "kinds": world.kinds, "colors": world.colors, "heldout": world.heldout,
                       "task_weights": world.task_weights, "resolution": resolution, "count": count, "seed": seed}
        return HeldOut(torch.from_numpy(np.ascontiguousarray(images)), [s.caption for s in scenes],
                       [f"scene_{i}" for i in range(count)], description)
