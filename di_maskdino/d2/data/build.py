"""`build_mapper`: the dataset mapper INPUT.DATASET_MAPPER_NAME names, the one place where
the names of the recipes are defined (`MAPPER_NAMES`)."""

from .augmentation import INSTANCE_AUGMENTATIONS, test_augmentation
from .instance_mapper import DIMaskDINODatasetMapper
from .segmentation_mappers import PanopticDatasetMapper, SemanticDatasetMapper

__all__ = ["build_mapper", "MAPPER_NAMES", "SEGMENTATION_MAPPER_NAMES", "is_segmentation_recipe"]

SEGMENTATION_MAPPERS = {"panoptic_lsj": PanopticDatasetMapper, "semantic": SemanticDatasetMapper}
SEGMENTATION_MAPPER_NAMES = tuple(SEGMENTATION_MAPPERS)
MAPPER_NAMES = tuple(INSTANCE_AUGMENTATIONS) + SEGMENTATION_MAPPER_NAMES


def is_segmentation_recipe(cfg) -> bool:
    """Whether the config trains panoptic / semantic segmentation (its dataset's classes are
    things and stuff)."""
    return cfg.INPUT.DATASET_MAPPER_NAME in SEGMENTATION_MAPPERS


def build_mapper(cfg, is_train: bool):
    """The dataset mapper of INPUT.DATASET_MAPPER_NAME: `DIMaskDINODatasetMapper` for the
    instance recipes ("lsj", "resize"), the segmentation mappers in training for
    "panoptic_lsj" and "semantic". At test time every recipe reads the image only, resized
    by `augmentation.test_augmentation`."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPER_NAMES:
        raise ValueError(f"INPUT.DATASET_MAPPER_NAME must be one of {list(MAPPER_NAMES)}, got {name!r}")
    if name in INSTANCE_AUGMENTATIONS:
        return DIMaskDINODatasetMapper(cfg, is_train)
    if is_train:
        return SEGMENTATION_MAPPERS[name](cfg, True)
    return DIMaskDINODatasetMapper(False, augmentations=test_augmentation(cfg), image_format=cfg.INPUT.FORMAT)
