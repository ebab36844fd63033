"""Data: the mappers (`build_mapper`: instance and segmentation recipes), their augmentation,
the resumable training stream (`samplers.py`) and the datasets (`datasets/`)."""

from .augmentation import build_augmentation, lsj_augmentation, semantic_augmentation
from .build import MAPPER_NAMES, build_mapper, is_segmentation_recipe
from .instance_mapper import DIMaskDINODatasetMapper
from .samplers import ResumableTrainingSampler, SeededMapDataset
from .segmentation_mappers import PanopticDatasetMapper, SemanticDatasetMapper

__all__ = [
    "build_mapper",
    "MAPPER_NAMES",
    "is_segmentation_recipe",
    "build_augmentation",
    "lsj_augmentation",
    "semantic_augmentation",
    "DIMaskDINODatasetMapper",
    "PanopticDatasetMapper",
    "SemanticDatasetMapper",
    "ResumableTrainingSampler",
    "SeededMapDataset",
]
