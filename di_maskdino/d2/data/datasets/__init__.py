"""Dataset registration: COCO-format instance datasets (`coco.py`), COCO-format panoptic
datasets (`coco_panoptic.py`), the built-in names (`builtin.py`) and the checks run before
training and evaluation (`checks.py`)."""

from .builtin import BDD100K_CLASSES, register_builtin_datasets, register_config_datasets
from .checks import DatasetError, check_dataset_classes, check_images_exist, check_registered
from .coco import register_coco_instances_checked
from .coco_panoptic import panoptic_metadata, register_coco_panoptic_checked

__all__ = [
    "BDD100K_CLASSES",
    "register_builtin_datasets",
    "register_config_datasets",
    "DatasetError",
    "check_dataset_classes",
    "check_images_exist",
    "check_registered",
    "register_coco_instances_checked",
    "register_coco_panoptic_checked",
    "panoptic_metadata",
]
