import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from pixrun.data.shapes import (
    COLOR_RGB,
    FRAME_MARGIN,
    NUMBER_WORDS,
    OBJECT_GAP,
    RELATIONS,
    SHAPE_KINDS,
    TASKS,
    ShapesWorld,
    plural,
)
from pixrun.evaluate import relative_position

HELDOUT = ("purple triangle", "orange circle", "red square")


def sample_scenes(world: ShapesWorld, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng) for _ in range(count)]


def true_box(obj):
    half = obj.size / 2
    return (obj.cx - half, obj.cy - half, obj.cx + half, obj.cy + half)


def test_training_scenes_never_show_heldout_pairs():
    heldout = {tuple(pair.split()) for pair in HELDOUT}
    shown = {(o.color, o.kind) for s in sample_scenes(ShapesWorld(heldout=HELDOUT), 4000) for o in s.objects}
    assert not shown & heldout
    # Without holding them out, the same sampler does draw these pairs: the check above is not vacuous.
    shown_anyway = {(o.color, o.kind) for s in sample_scenes(ShapesWorld(), 4000) for o in s.objects}
    assert heldout <= shown_anyway


@pytest.mark.parametrize(
    "heldout", [["magenta circle"], ["red hexagon"], ["red"], ["red circle square"], ["pink circle"]]
)
def test_unknown_heldout_pair_raises(heldout):
    # pink exists, but is not one of the default world's colours
    with pytest.raises(ValueError, match="held-out pair"):
        ShapesWorld(heldout=heldout)


def test_invalid_configuration_raises():
    with pytest.raises(ValueError, match="unknown shape kind"):
        ShapesWorld(kinds=("circle", "hexagon"))
    with pytest.raises(ValueError, match="unknown colour"):
        ShapesWorld(colors=("red", "magenta"))
    with pytest.raises(ValueError, match="unknown task"):
        ShapesWorld(task_weights={"counting": 1.0, "spelling": 1.0})
    with pytest.raises(ValueError, match="every colour"):
        ShapesWorld(colors=("red", "blue"), heldout=["red circle", "blue circle"])


def test_captions_follow_the_templates_and_describe_the_scene():
    world = ShapesWorld(kinds=SHAPE_KINDS, heldout=HELDOUT)
    kind = "|".join(world.kinds)
    color = "|".join(world.colors)
    article = r"(a|an)"
    templates = {
        "single_object": rf"a photo of {article} (?P<k0>{kind})",
        "two_object": rf"a photo of {article} (?P<k0>{kind}) and {article} (?P<k1>{kind})",
        "counting": r"a photo of (?P<n>two|three|four) (?P<plural>\w+)",
        "colors": rf"a photo of {article} (?P<c0>{color}) (?P<k0>{kind})",
        "position": rf"a photo of {article} (?P<k0>{kind}) (?P<rel>{'|'.join(RELATIONS)}) {article} (?P<k1>{kind})",
        "color_attr": (
            rf"a photo of {article} (?P<c0>{color}) (?P<k0>{kind}) and {article} (?P<c1>{color}) (?P<k1>{kind})"
        ),
    }
    seen_tasks = set()
    for scene in sample_scenes(world, 1500):
        seen_tasks.add(scene.task)
        match = re.fullmatch(templates[scene.task], scene.caption)
        assert match, scene.caption
        words = scene.caption.split()
        for i, word in enumerate(words[:-1]):
            if word in ("a", "an"):
                assert word == ("an" if words[i + 1][0] in "aeiou" else "a"), scene.caption
        kinds = [o.kind for o in scene.objects]
        colors = [o.color for o in scene.objects]
        groups = match.groupdict()
        if scene.task == "counting":
            count = {word: n for n, word in NUMBER_WORDS.items()}[groups["n"]]
            assert groups["plural"] == plural(kinds[0])
            assert kinds == [kinds[0]] * count
        elif scene.task in ("single_object", "colors"):
            assert kinds == [groups["k0"]]
        else:
            assert kinds == [groups["k0"], groups["k1"]] and kinds[0] != kinds[1]
        if scene.task in ("colors", "color_attr"):
            assert colors == [groups[f"c{i}"] for i in range(len(colors))]
        if scene.task == "color_attr":
            assert colors[0] != colors[1]
        if scene.task == "position":
            a, b = scene.objects
            assert groups["rel"] in relative_position(true_box(a), true_box(b))
    assert seen_tasks == set(TASKS)
    assert "a photo of an orange" in " ".join(s.caption for s in sample_scenes(ShapesWorld(), 300))


def test_objects_are_apart_inside_the_frame_and_large_enough():
    world = ShapesWorld(kinds=SHAPE_KINDS)
    rng = np.random.default_rng(1)
    scenes = [world.sample_scene(rng, task="counting") for _ in range(300)]
    scenes += [world.sample_scene(rng, task="position") for _ in range(300)]
    assert max(len(s.objects) for s in scenes) == 4
    for scene in scenes:
        boxes = [true_box(o) for o in scene.objects]
        for o, (x0, y0, x1, y1) in zip(scene.objects, boxes):
            assert min(x0, y0) >= FRAME_MARGIN - 1e-9 and max(x1, y1) <= 1 - FRAME_MARGIN + 1e-9
            assert o.size * 64 >= 10  # at the default training resolution
        for i in range(len(boxes)):
            for j in range(i):
                gap_x = max(boxes[i][0] - boxes[j][2], boxes[j][0] - boxes[i][2])
                gap_y = max(boxes[i][1] - boxes[j][3], boxes[j][1] - boxes[i][3])
                assert max(gap_x, gap_y) >= OBJECT_GAP - 1e-9
    # Rendered, every object is its own connected component.
    for scene in scenes[:50]:
        image = world.render(scene, 64).astype(float)
        foreground = np.linalg.norm(image - np.array(scene.background), axis=-1) > 60
        assert ndimage.label(foreground)[1] == len(scene.objects)


def test_render_is_antialiased_flat_shapes_on_a_light_background():
    world = ShapesWorld()
    for resolution in (32, 64, 512):
        scene = world.sample_scene(np.random.default_rng(resolution), task="colors")
        image = world.render(scene, resolution)
        assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
        (obj,) = scene.objects
        centre = image[int(obj.cy * resolution), int(obj.cx * resolution)]
        assert tuple(centre) == COLOR_RGB[obj.color]
        corner = image[0, 0].astype(int)
        assert np.abs(corner - np.array(scene.background)).max() <= 12  # within the gradient
        # The edges are background only; across them brightness follows the gradient.
        left, right = image[:, 0].astype(float).mean(), image[:, -1].astype(float).mean()
        top, bottom = image[0].astype(float).mean(), image[-1].astype(float).mean()
        span = 1 - 1 / resolution  # from first to last pixel centre
        assert right - left == pytest.approx(scene.gradient[0] * span, abs=1)
        assert bottom - top == pytest.approx(scene.gradient[1] * span, abs=1)
        shape_or_background = (image == np.array(COLOR_RGB[obj.color])).all(-1)
        shape_or_background |= np.abs(image.astype(int) - np.array(scene.background)).max(-1) <= 12
        assert (~shape_or_background).sum() >= 8  # blended edge pixels


def test_background_stays_far_from_every_shape_colour():
    world = ShapesWorld(colors=tuple(COLOR_RGB))
    palette = np.array(list(COLOR_RGB.values()))
    for scene in sample_scenes(world, 500):
        corners = np.array(scene.background) + np.array(
            [[sx * scene.gradient[0] / 2 + sy * scene.gradient[1] / 2] for sx in (-1, 1) for sy in (-1, 1)]
        )
        assert corners.min() >= 200
        assert np.linalg.norm(corners[:, None] - palette[None], axis=-1).min() > 100


def test_batch_shape_range_and_determinism():
    world = ShapesWorld(heldout=HELDOUT)
    images, captions = world.batch(seed=3, index=5, batch_size=8, resolution=32)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and len(captions) == 8
    assert images.min() < 64 and images.max() > 191  # uses the range: dark channels, light background

    # Batch (seed, index) is the same whatever was drawn before, and in a fresh world.
    world.batch(seed=3, index=4, batch_size=8, resolution=32)
    world.batch(seed=9, index=5, batch_size=8, resolution=32)
    again, again_captions = ShapesWorld(heldout=HELDOUT).batch(seed=3, index=5, batch_size=8, resolution=32)
    assert torch.equal(images, again) and captions == again_captions

    next_images, _ = world.batch(seed=3, index=6, batch_size=8, resolution=32)
    other_seed, _ = world.batch(seed=4, index=5, batch_size=8, resolution=32)
    for other in (next_images, other_seed):
        assert all(not torch.equal(a, b) for a, b in zip(images, other))


def test_batch_rows_are_drawn_and_rendered_alone(monkeypatch):
    world = ShapesWorld(heldout=HELDOUT)
    images, captions = world.batch(seed=3, index=5, batch_size=8, resolution=32)
    # Any rows of it, made alone, are those rows of the whole batch (each rank makes only its own).
    rows, row_captions = world.batch(seed=3, index=5, batch_size=8, resolution=32, rows=slice(2, 6))
    assert torch.equal(rows, images[2:6]) and row_captions == captions[2:6]
    # Row i's scene is its own: the same in a smaller batch, and drawing it draws no other row's scene.
    smaller, _ = world.batch(seed=3, index=5, batch_size=4, resolution=32)
    assert torch.equal(smaller, images[:4])
    drawn = []
    real = world.sample_scene
    monkeypatch.setattr(world, "sample_scene", lambda rng: drawn.append(rng) or real(rng))
    world.batch(seed=3, index=5, batch_size=4096, resolution=32, rows=slice(1024, 1026))
    assert len(drawn) == 2


def test_task_weights_select_tasks():
    world = ShapesWorld(task_weights={"counting": 1.0, "position": 3.0})
    tasks = [s.task for s in sample_scenes(world, 400)]
    assert set(tasks) == {"counting", "position"}
    assert 0.6 < tasks.count("position") / len(tasks) < 0.9


def test_vocabulary_covers_every_caption():
    world = ShapesWorld(kinds=SHAPE_KINDS)
    vocabulary = world.vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    words = {w for s in sample_scenes(world, 2000) for w in s.caption.split()}
    assert words <= set(vocabulary)
    assert {"crosses", "diamonds", "an", "four", "left", "below"} <= set(vocabulary)
    # Only the world's own words: no diamonds, no "an" without orange.
    small = ShapesWorld(kinds=("circle", "square"), colors=("red", "blue")).vocabulary()
    assert "diamond" not in small and "an" not in small and "orange" not in small
