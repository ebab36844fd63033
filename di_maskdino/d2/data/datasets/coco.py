"""COCO-format instance datasets, registered with checks.

`register_coco_instances_checked(name, json_file, image_root)` registers any COCO-format
instance dataset (detectron2's `load_coco_json`), checked when it is first loaded: a missing
folder or JSON, malformed JSON, annotations that detectron2 would drop or that pycocotools
cannot evaluate (polygons of fewer than 3 points, unknown categories or images, missing
boxes), and images listed but missing on disk each raise `DatasetError` naming the file, the
annotation ids and the fix.
"""

import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from .checks import DatasetError, check_images_exist, listed, read_coco_json

__all__ = ["register_coco_instances_checked", "check_coco_annotations"]


def _load_checked(json_file: str, image_root: str, name: str, how_to_create: str):
    if not os.path.isfile(json_file):
        raise DatasetError(f"dataset {name!r}: annotation file {json_file} does not exist. {how_to_create}")
    if not os.path.isdir(image_root):
        raise DatasetError(f"dataset {name!r}: image folder {image_root} does not exist. {how_to_create}")
    content = read_coco_json(json_file, name, "instance")
    check_coco_annotations(content, json_file, name)
    dicts = load_coco_json(json_file, image_root, name)
    check_images_exist(dicts, name, image_root)
    return dicts


def _annotation_problem(annotation: dict, image_ids: set, category_ids: set) -> Optional[str]:
    """Why detectron2 would drop this annotation or pycocotools fail on it, or None."""
    if annotation.get("image_id") not in image_ids:
        return f"image_id {annotation.get('image_id')!r} is not in 'images'"
    if annotation.get("category_id") not in category_ids:
        return f"category_id {annotation.get('category_id')!r} is not in 'categories'"
    box = annotation.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return f"'bbox' must be [x, y, width, height], got {box!r}"
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        if not segmentation:
            return "'segmentation' is an empty list"
        for polygon in segmentation:
            if not isinstance(polygon, (list, tuple)) or len(polygon) < 6 or len(polygon) % 2:
                count = len(polygon) if isinstance(polygon, (list, tuple)) else "no"
                return f"a polygon of {count} coordinates (a polygon needs at least 3 (x, y) points)"
    elif isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            return "an RLE 'segmentation' needs 'counts' and 'size'"
    elif segmentation is not None:
        return f"'segmentation' must be polygons or RLE, got {type(segmentation).__name__}"
    return None


def check_coco_annotations(content: dict, json_file: str, name: str) -> None:
    """Raises DatasetError listing (by annotation id) the annotations of a COCO instance file
    that detectron2 would silently drop or that pycocotools cannot evaluate."""
    image_ids = {image.get("id") for image in content["images"]}
    category_ids = {category.get("id") for category in content["categories"]}
    problems = []
    for annotation in content["annotations"]:
        problem = _annotation_problem(annotation, image_ids, category_ids)
        if problem:
            problems.append(f"annotation id {annotation.get('id')!r} (image {annotation.get('image_id')!r}): {problem}")
    if problems:
        raise DatasetError(
            f"dataset {name!r}: {len(problems)} annotation(s) of {json_file} cannot be used:{listed(problems)}\n"
            f"Fix or remove them in {json_file}."
        )


def register_coco_instances_checked(
    name: str, json_file: str, image_root: str, how_to_create: str = "", **metadata
) -> None:
    """Registers a COCO-format instance-segmentation dataset under `name` (detectron2's
    `register_coco_instances`, with the checks above run when it is first loaded)."""
    if name in DatasetCatalog.list():
        raise DatasetError(f"a dataset named {name!r} is already registered")
    DatasetCatalog.register(name, lambda: _load_checked(json_file, image_root, name, how_to_create))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata)
