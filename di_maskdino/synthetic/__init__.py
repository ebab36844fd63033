"""Synthetic datasets of the quick start and the tests: coloured shapes with instance masks
(`shapes`), and scenes of things on stuff with panoptic annotations (`panoptic_scenes`).
Written to disk by datasets/make_synthetic.py and datasets/make_synthetic_panoptic.py."""

from .panoptic_scenes import PANOPTIC_CATEGORIES, PANOPTIC_CLASSES, STUFF_CLASSES, THING_CLASSES, render_panoptic_scene
from .shapes import SHAPE_CLASSES, render_scene

__all__ = [
    "SHAPE_CLASSES",
    "render_scene",
    "THING_CLASSES",
    "STUFF_CLASSES",
    "PANOPTIC_CLASSES",
    "PANOPTIC_CATEGORIES",
    "render_panoptic_scene",
]
