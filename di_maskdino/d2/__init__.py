"""The detectron2 layer: configuration (`config/`), data and datasets (`data/`), evaluation
(`evaluation/`), the meta-architecture and backbones (`modeling/`), checkpointing, the
optimizer, the trainer and the tools' shared set-up (`engine/`).

Importing it registers the meta-architecture "DIMaskDINOArch", the backbone builders
"build_timm_backbone", "build_swin_backbone" and "build_vit_backbone", and the built-in
datasets (under $DETECTRON2_DATASETS, default "datasets"; see `data/datasets/builtin.py`), as
importing detectron2 registers its own.
"""

import os

from ..dependencies import import_quietly

import_quietly("detectron2.modeling")  # see di_maskdino/dependencies.py for why quietly

from .checkpointer import (  # noqa: E402
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    ReleaseCheckpointError,
)
from .config import ConfigError, add_di_maskdino_config, load_config, use_available_device  # noqa: E402
from .data import build_mapper  # noqa: E402
from .data.datasets import (  # noqa: E402
    DatasetError,
    register_builtin_datasets,
    register_coco_instances_checked,
    register_coco_panoptic_checked,
)
from .engine import (  # noqa: E402
    ConfigArgumentParser,
    MissingWeightsError,
    NonFiniteLossError,
    Trainer,
    build_predictor,
    check_weights,
    setup,
)
from .modeling import DIMaskDINOArch, detections_to_instances  # noqa: E402
from .solver import build_optimizer  # noqa: E402

register_builtin_datasets(os.environ.get("DETECTRON2_DATASETS", "datasets"))

__all__ = [
    "add_di_maskdino_config",
    "load_config",
    "use_available_device",
    "ConfigError",
    "DIMaskDINOArch",
    "detections_to_instances",
    "build_mapper",
    "register_builtin_datasets",
    "register_coco_instances_checked",
    "register_coco_panoptic_checked",
    "DatasetError",
    "Checkpointer",
    "CheckpointError",
    "CheckpointMismatchError",
    "ReleaseCheckpointError",
    "build_optimizer",
    "Trainer",
    "NonFiniteLossError",
    "setup",
    "build_predictor",
    "check_weights",
    "MissingWeightsError",
    "ConfigArgumentParser",
]
