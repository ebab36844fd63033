"""Data helpers of the model core (no detectron2)."""

from .panoptic import IGNORE_LABEL, id_to_rgb, panoptic_to_semantic, rgb_to_id
from .synthetic import SHAPE_CLASSES, render_scene
from .synthetic_panoptic import (
    PANOPTIC_CATEGORIES,
    PANOPTIC_CLASSES,
    STUFF_CLASSES,
    THING_CLASSES,
    render_panoptic_scene,
)

__all__ = [
    "SHAPE_CLASSES",
    "render_scene",
    "THING_CLASSES",
    "STUFF_CLASSES",
    "PANOPTIC_CLASSES",
    "PANOPTIC_CATEGORIES",
    "render_panoptic_scene",
    "rgb_to_id",
    "id_to_rgb",
    "panoptic_to_semantic",
    "IGNORE_LABEL",
]
