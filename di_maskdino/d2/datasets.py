"""Dataset registration.

- `register_coco_instances_checked(name, json_file, image_root)`: any COCO-format instance
  dataset, checked when it is first loaded: a missing folder or JSON, malformed JSON,
  annotations that detectron2 would drop or that pycocotools cannot evaluate (polygons of
  fewer than 3 points, unknown categories or images, missing boxes), and images listed but
  missing on disk each raise `DatasetError` naming the file, the annotation ids and the fix.
- `check_dataset_classes(name, num_classes, training)`: the dataset's categories against
  MODEL.DI_MASKDINO.NUM_CLASSES (any dataset, detectron2's COCO included).
- Built-in names (under $DETECTRON2_DATASETS, default "datasets"):
  "synthetic_train" / "synthetic_val"   written by datasets/make_synthetic.py
  "bdd100k_ins_seg_train" / "_val"      written by datasets/prepare_bdd100k.py
  COCO ("coco_2017_train", ...) is registered by detectron2 itself.
"""

import json
import logging
import os
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from ..data.synthetic import SHAPE_CLASSES

__all__ = [
    "register_coco_instances_checked",
    "register_builtin_datasets",
    "check_dataset_classes",
    "check_images_exist",
    "BDD100K_CLASSES",
    "DatasetError",
]

LISTED = 10  # problems listed by name before "... and N more"

logger = logging.getLogger(__name__)

BDD100K_CLASSES = ("pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names the file and the fix."""


def read_coco_json(path: str, name: str, kind: str) -> dict:
    """The content of a COCO `kind` ("instance", "panoptic") annotation file of dataset
    `name`; invalid JSON and missing top-level keys are DatasetErrors naming the file."""
    try:
        with open(path) as handle:
            content = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(f"dataset {name!r}: {path} is not valid JSON ({error})") from error
    missing = [key for key in ("images", "annotations", "categories") if key not in content]
    if missing:
        raise DatasetError(f"dataset {name!r}: {path} is not a COCO {kind} file: no {', '.join(missing)}")
    return content


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


def _some(lines: List[str]) -> str:
    more = f"\n  ... and {len(lines) - LISTED} more" if len(lines) > LISTED else ""
    return "\n  " + "\n  ".join(lines[:LISTED]) + more


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
            f"dataset {name!r}: {len(problems)} annotation(s) of {json_file} cannot be used:{_some(problems)}\n"
            f"Fix or remove them in {json_file}."
        )


def check_images_exist(dataset_dicts: List[dict], name: str, image_root: str = "") -> None:
    """Raises DatasetError naming the image files listed in a dataset but missing on disk."""
    missing = [d["file_name"] for d in dataset_dicts if not os.path.isfile(d["file_name"])]
    if missing:
        where = f" under {image_root}" if image_root else ""
        raise DatasetError(
            f"dataset {name!r}: {len(missing)} of {len(dataset_dicts)} listed images do not exist{where}:"
            f"{_some(missing)}\nCopy them there, or remove them (and their annotations) from the annotation file."
        )


def check_dataset_classes(name: str, num_classes: int, training: bool, segmentation: bool = False) -> None:
    """The categories of dataset `name` (loaded) against MODEL.DI_MASKDINO.NUM_CLASSES: a
    training set may not have more categories than the model predicts; an evaluation set
    must have exactly as many (detectron2's evaluator maps every predicted class back to one
    of the dataset's categories). With `segmentation` (panoptic / semantic recipes) the
    categories are the metadata's "stuff_classes", which in detectron2 list things and stuff."""
    dicts = DatasetCatalog.get(name)
    metadata = MetadataCatalog.get(name)
    classes = list(metadata.get("stuff_classes" if segmentation else "thing_classes", []))
    used = {a["category_id"] for d in dicts for a in d.get("annotations", [])}
    count = len(classes) if classes else (max(used) + 1 if used else 0)
    listing = f" ({', '.join(map(str, classes[:20]))}{', ...' if len(classes) > 20 else ''})" if classes else ""
    fix = f"Set MODEL.DI_MASKDINO.NUM_CLASSES {count}"
    if count > num_classes or (used and max(used) >= num_classes):
        raise DatasetError(
            f"dataset {name!r} has {count} categories{listing}, but MODEL.DI_MASKDINO.NUM_CLASSES is {num_classes}. "
            f"{fix}."
        )
    if not training and count and count != num_classes:
        raise DatasetError(
            f"dataset {name!r} (evaluation) has {count} categories{listing}, but MODEL.DI_MASKDINO.NUM_CLASSES is "
            f"{num_classes}; the model's classes must be the dataset's. {fix}."
        )
    if training and count and count < num_classes:
        logger.warning(
            f"dataset {name!r} has {count} categories but MODEL.DI_MASKDINO.NUM_CLASSES is {num_classes}: "
            f"classes {count}..{num_classes - 1} are never trained"
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


def register_builtin_datasets(root: str) -> None:
    synthetic = os.path.join(root, "synthetic")
    for split in ("train", "val"):
        name = f"synthetic_{split}"
        if name not in DatasetCatalog.list():
            register_coco_instances_checked(
                name,
                os.path.join(synthetic, f"{split}.json"),
                os.path.join(synthetic, split),
                how_to_create=f"Create it with: python datasets/make_synthetic.py --output {synthetic}",
                thing_classes=list(SHAPE_CLASSES),
            )
    bdd = os.path.join(root, "bdd100k")
    for split in ("train", "val"):
        name = f"bdd100k_ins_seg_{split}"
        if name not in DatasetCatalog.list():
            register_coco_instances_checked(
                name,
                os.path.join(bdd, "coco_annotations", f"ins_seg_{split}.json"),
                os.path.join(bdd, "images", "10k", split),
                how_to_create=f"Convert the BDD100K labels with: python datasets/prepare_bdd100k.py --root {bdd}",
                thing_classes=list(BDD100K_CLASSES),
            )
    # panoptic datasets (COCO panoptic format with semantic maps): panoptic_datasets.py
    from .panoptic_datasets import register_builtin_panoptic_datasets

    register_builtin_panoptic_datasets(root)
