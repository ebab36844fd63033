"""The detectron2 layer: configuration, registration of the meta-architecture, backbones and
datasets, data mapping, optimizer, checkpointer and trainer. Importing it registers
everything."""

import os
import warnings

with warnings.catch_warnings():
    # detectron2 scripts two box-transform classes with torch.jit when detectron2.modeling is
    # first imported, which torch deprecates: warnings about code neither we nor the user
    # call. Importing it here, first, keeps them out of every run; other warnings stay.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    import detectron2.modeling  # noqa: F401

from .backbone import D2TimmBackbone, build_timm_backbone
from .checkpoint import Checkpointer, CheckpointError, CheckpointMismatchError, ReleaseCheckpointError
from .config import (
    add_di_maskdino_config,
    architecture_from_config,
    load_config,
    parse_command_line,
    use_available_device,
)
from .data import DIMaskDINODatasetMapper, ImageReadError, build_augmentation, read_image_rgb
from .datasets import (
    BDD100K_CLASSES,
    DatasetError,
    check_dataset_classes,
    register_builtin_datasets,
    register_coco_instances_checked,
)
from .meta_arch import DIMaskDINOArch, build_criterion
from .panoptic import PanopticEvaluator, build_segmentation_evaluators, build_segmentation_inference
from .panoptic_data import PanopticDatasetMapper, SemanticDatasetMapper, build_mapper
from .panoptic_datasets import register_coco_panoptic_checked
from .solver import build_optimizer
from .trainer import NonFiniteLossError, Trainer, setup
from .validation import ConfigError, validate_config

register_builtin_datasets(os.environ.get("DETECTRON2_DATASETS", "datasets"))

__all__ = [
    "add_di_maskdino_config",
    "architecture_from_config",
    "load_config",
    "parse_command_line",
    "ConfigError",
    "validate_config",
    "DIMaskDINOArch",
    "build_criterion",
    "D2TimmBackbone",
    "build_timm_backbone",
    "DIMaskDINODatasetMapper",
    "ImageReadError",
    "read_image_rgb",
    "build_augmentation",
    "register_coco_instances_checked",
    "register_builtin_datasets",
    "DatasetError",
    "BDD100K_CLASSES",
    "Checkpointer",
    "CheckpointError",
    "CheckpointMismatchError",
    "use_available_device",
    "check_dataset_classes",
    "NonFiniteLossError",
    "ReleaseCheckpointError",
    "build_optimizer",
    "Trainer",
    "setup",
    # panoptic and semantic segmentation
    "build_segmentation_inference",
    "build_segmentation_evaluators",
    "PanopticEvaluator",
    "PanopticDatasetMapper",
    "SemanticDatasetMapper",
    "build_mapper",
    "register_coco_panoptic_checked",
]
