"""Data helpers of the model core (no detectron2)."""

from .synthetic import SHAPE_CLASSES, render_scene

__all__ = ["SHAPE_CLASSES", "render_scene"]
