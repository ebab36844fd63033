"""Synthetic panoptic scenes: the coloured shapes of `synthetic.py` (things) in front of a sky
and a ground region (stuff), with an unlabelled (void) band between them.

The sky is bluish, the ground brownish, both with pixel noise and a wavy border; the void
band is dark noise. Things keep a random colour, so their class is their shape. A thing may
be marked as a crowd region.
"""

from typing import Dict, List, Tuple

import numpy as np

from .shapes import SHAPE_CLASSES, render_scene

__all__ = ["THING_CLASSES", "STUFF_CLASSES", "PANOPTIC_CLASSES", "PANOPTIC_CATEGORIES", "render_panoptic_scene"]

THING_CLASSES = SHAPE_CLASSES
STUFF_CLASSES = ("sky", "ground")
# contiguous class indices: things first, then stuff
PANOPTIC_CLASSES = THING_CLASSES + STUFF_CLASSES

_STUFF_COLOURS = {"sky": (90, 140, 220), "ground": (120, 90, 50)}
_DRAWING_COLOURS = [(220, 20, 60), (0, 0, 142), (255, 160, 0), _STUFF_COLOURS["sky"], _STUFF_COLOURS["ground"]]
# COCO-panoptic categories: dataset id = contiguous index + 1; colours for drawing
PANOPTIC_CATEGORIES = [
    {"id": i + 1, "name": name, "isthing": int(name in THING_CLASSES), "color": list(colour)}
    for i, (name, colour) in enumerate(zip(PANOPTIC_CLASSES, _DRAWING_COLOURS))
]


def _wavy_border(rng: np.random.Generator, width: int, centre: float, amplitude: float) -> np.ndarray:
    """(W,) row of a border: centre + amplitude * sin(random frequency and phase)."""
    frequency = rng.uniform(1.0, 3.0) * 2 * np.pi / width
    phase = rng.uniform(0, 2 * np.pi)
    return centre + amplitude * np.sin(frequency * np.arange(width) + phase)


def render_panoptic_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_objects: int,
    crowd_probability: float = 0.0,
    min_visible: int = 20,
) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """One scene.

    Returns:
        image: (H, W, 3) uint8 RGB.
        ids: (H, W) int64 segment ids, 0 on void pixels.
        segments: per segment {"id", "category" (index into PANOPTIC_CLASSES), "iscrowd"}, in
            id order; a stuff class has at most one segment, regions with fewer than
            `min_visible` pixels are void.
    """
    image, thing_masks, thing_labels = render_scene(rng, height, width, num_objects, min_visible=min_visible)
    rows = np.arange(height)[:, None]
    sky_border = _wavy_border(rng, width, rng.uniform(0.25, 0.4) * height, 0.05 * height)
    ground_border = _wavy_border(rng, width, rng.uniform(0.6, 0.75) * height, 0.05 * height)
    regions = {"sky": rows < sky_border[None, :], "ground": rows >= ground_border[None, :]}
    background = rng.integers(0, 40, size=(height, width, 3))  # the void band
    for name, region in regions.items():
        noise = rng.integers(-20, 21, size=(height, width, 3))
        colour = np.clip(np.array(_STUFF_COLOURS[name]) + noise, 0, 255)
        background[region] = colour[region]
    things = thing_masks.any(0) if len(thing_masks) else np.zeros((height, width), dtype=bool)
    image = np.where(things[..., None], image, background).astype(np.uint8)

    ids = np.zeros((height, width), dtype=np.int64)
    segments: List[Dict] = []
    for name, region in regions.items():
        visible = region & ~things
        if visible.sum() >= min_visible:
            segments.append({"id": len(segments) + 1, "category": PANOPTIC_CLASSES.index(name), "iscrowd": 0})
            ids[visible] = segments[-1]["id"]
    for mask, label in zip(thing_masks, thing_labels):
        crowd = int(rng.random() < crowd_probability)
        segments.append({"id": len(segments) + 1, "category": int(label), "iscrowd": crowd})
        ids[mask] = segments[-1]["id"]
    return image, ids, segments
