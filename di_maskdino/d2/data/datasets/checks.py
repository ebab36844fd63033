"""Checks of registered datasets, run before the first iteration (and their error).

- `check_images_exist(dicts, name)`: the image files a dataset lists exist.
- `check_dataset_classes(name, num_classes, training)`: the dataset's categories against
  MODEL.DI_MASKDINO.NUM_CLASSES (any dataset, detectron2's COCO included).
- `check_registered(names, key)`: every name of DATASETS.TRAIN / TEST is registered.
Each raises `DatasetError` naming the dataset, the files and the fix.
"""

import json
import logging
import os
from typing import List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "DatasetError",
    "read_coco_json",
    "check_images_exist",
    "check_dataset_classes",
    "check_registered",
]

LISTED = 10  # problems listed by name before "... and N more"

logger = logging.getLogger(__name__)


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


def listed(lines: List[str]) -> str:
    more = f"\n  ... and {len(lines) - LISTED} more" if len(lines) > LISTED else ""
    return "\n  " + "\n  ".join(lines[:LISTED]) + more


def check_images_exist(dataset_dicts: List[dict], name: str, image_root: str = "") -> None:
    """Raises DatasetError naming the image files listed in a dataset but missing on disk."""
    missing = [d["file_name"] for d in dataset_dicts if not os.path.isfile(d["file_name"])]
    if missing:
        where = f" under {image_root}" if image_root else ""
        raise DatasetError(
            f"dataset {name!r}: {len(missing)} of {len(dataset_dicts)} listed images do not exist{where}:"
            f"{listed(missing)}\nCopy them there, or remove them (and their annotations) from the annotation file."
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


def check_registered(names: Sequence[str], key: str) -> None:
    """Raises DatasetError when a dataset of `names` (the value of config key `key`) is not
    registered, listing the registered names and how to register a COCO-format dataset."""
    registered = DatasetCatalog.list()
    missing = [name for name in names if name not in registered]
    if missing:
        raise DatasetError(
            f"{key}: dataset(s) {', '.join(map(repr, missing))} not registered. Registered: "
            f"{', '.join(sorted(registered))}.\nTo use a COCO-format dataset, name its annotation file and image "
            "folder in the config (DATASETS.COCO_FORMAT [[NAME, JSON, IMAGE_FOLDER], ...]) or on the command line "
            "of tools/train_net.py (--coco-dataset NAME JSON IMAGE_FOLDER); see GETTING_STARTED.md, 'Your own dataset'."
        )
