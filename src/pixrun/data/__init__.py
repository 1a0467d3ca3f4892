from pixrun.data.shapes import (
    COLOR_RGB,
    DEFAULT_COLORS,
    DEFAULT_KINDS,
    RELATIONS,
    SHAPE_KINDS,
    TASKS,
    Scene,
    ShapeObject,
    ShapesWorld,
    make_caption,
)

__all__ = [
    "COLOR_RGB",
    "DEFAULT_COLORS",
    "DEFAULT_KINDS",
    "RELATIONS",
    "SHAPE_KINDS",
    "TASKS",
    "Scene",
    "ShapeObject",
    "ShapesWorld",
    "make_caption",
]
