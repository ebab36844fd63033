"""The COCO panoptic annotation format, without detectron2 or panopticapi.

A panoptic annotation is a PNG whose colour encodes a segment id per pixel,
id = R + 256 G + 256^2 B (0 = void), and a list of segments ("segments_info": id,
category_id, iscrowd, ...). A semantic map gives every pixel a contiguous class index
(255 = void), the format of detectron2's semantic datasets.
"""

from typing import Dict, Iterable, Mapping

import numpy as np

__all__ = ["rgb_to_id", "id_to_rgb", "panoptic_to_semantic", "IGNORE_LABEL"]

IGNORE_LABEL = 255


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours -> (H, W) int64 segment ids."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb_to_id: expected an (H, W, 3) image, got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids (0 <= id < 256^3) -> (H, W, 3) uint8 colours."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError(f"id_to_rgb: segment ids must lie in [0, 256^3), got [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def panoptic_to_semantic(ids: np.ndarray, segments: Iterable[Mapping], category_to_class: Dict[int, int]) -> np.ndarray:
    """(H, W) segment ids and their segments -> (H, W) uint8 semantic map: the class index
    (`category_to_class[segment["category_id"]]`) of every segment, crowd ones included,
    and IGNORE_LABEL on void pixels and pixels of segments not listed."""
    semantic = np.full(ids.shape, IGNORE_LABEL, dtype=np.uint8)
    for segment in segments:
        semantic[ids == segment["id"]] = category_to_class[segment["category_id"]]
    return semantic
