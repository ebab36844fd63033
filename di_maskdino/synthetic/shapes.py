"""Synthetic scenes of coloured shapes with instance masks, for quick starts and tests.

The class of an object is its shape (rectangle, ellipse, triangle); its colour is random,
so a model must learn shape, not colour. Objects may overlap: later ones occlude earlier
ones and the masks are cut accordingly; objects left with too few visible pixels are
dropped from the annotations.
"""

from typing import List, Tuple

import numpy as np

__all__ = ["SHAPE_CLASSES", "render_scene"]

SHAPE_CLASSES = ("rectangle", "ellipse", "triangle")


def _shape_mask(kind: int, height: int, width: int, box: Tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    y, x = np.mgrid[0:height, 0:width]
    if kind == 0:
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    if kind == 1:
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return ((x + 0.5 - cx) / rx) ** 2 + ((y + 0.5 - cy) / ry) ** 2 <= 1.0
    # triangle with apex at the top centre and base along the bottom edge
    apex_x = (x0 + x1) / 2
    t = (y + 0.5 - y0) / max(y1 - y0, 1)
    half = t * (x1 - x0) / 2
    return (t >= 0) & (t <= 1) & (np.abs(x + 0.5 - apex_x) <= half)


def render_scene(
    rng: np.random.Generator, height: int, width: int, num_objects: int, min_size: int = 12, min_visible: int = 20
) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """One scene: (H, W, 3) uint8 RGB image, (n, H, W) bool masks, n class indices."""
    if min(height, width) < 2 * min_size:
        raise ValueError(f"render_scene: a {height}x{width} image cannot hold objects of at least {min_size} pixels")
    image = (rng.integers(0, 40, size=(height, width, 3))).astype(np.uint8)
    masks, labels = [], []
    for _ in range(num_objects):
        kind = int(rng.integers(0, len(SHAPE_CLASSES)))
        w = int(rng.integers(min_size, max(min_size + 1, width // 2)))
        h = int(rng.integers(min_size, max(min_size + 1, height // 2)))
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        mask = _shape_mask(kind, height, width, (x0, y0, x0 + w, y0 + h))
        image[mask] = rng.integers(80, 256, size=3).astype(np.uint8)
        masks = [m & ~mask for m in masks]
        masks.append(mask)
        labels.append(kind)
    keep = [i for i, m in enumerate(masks) if m.sum() >= min_visible]
    stacked = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, height, width), dtype=bool)
    return image, stacked, [labels[i] for i in keep]
