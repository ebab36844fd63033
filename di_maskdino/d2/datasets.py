"""Dataset registration.

- `register_coco_instances_checked(name, json_file, image_root)`: any COCO-format instance
  dataset, with a clear error when the folder or JSON is missing or malformed.
- Built-in names (under $DETECTRON2_DATASETS, default "datasets"):
  "synthetic_train" / "synthetic_val"   written by datasets/make_synthetic.py
  "bdd100k_ins_seg_train" / "_val"      written by datasets/prepare_bdd100k.py
  COCO ("coco_2017_train", ...) is registered by detectron2 itself.
"""

import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from ..data.synthetic import SHAPE_CLASSES

__all__ = ["register_coco_instances_checked", "register_builtin_datasets", "BDD100K_CLASSES", "DatasetError"]

BDD100K_CLASSES = ("pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names the file and the fix."""


def _load_checked(json_file: str, image_root: str, name: str, how_to_create: str):
    if not os.path.isfile(json_file):
        raise DatasetError(f"dataset {name!r}: annotation file {json_file} does not exist. {how_to_create}")
    if not os.path.isdir(image_root):
        raise DatasetError(f"dataset {name!r}: image folder {image_root} does not exist. {how_to_create}")
    try:
        with open(json_file) as handle:
            content = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(f"dataset {name!r}: {json_file} is not valid JSON ({error})") from error
    missing = [key for key in ("images", "annotations", "categories") if key not in content]
    if missing:
        raise DatasetError(f"dataset {name!r}: {json_file} is not a COCO instance file: no {', '.join(missing)}")
    return load_coco_json(json_file, image_root, name)


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
