"""The model in detectron2: the meta-architecture "DIMaskDINOArch" (registered), the timm
backbone builders (timm, Swin as MaskDINO's releases, vision transformers; registered), the
model's outputs as detectron2 results, and the inference settings read from the dataset's
metadata."""

from .backbone_builders import (
    D2SwinBackbone,
    D2TimmBackbone,
    build_swin_backbone,
    build_timm_backbone,
    checkpoint_backbone,
)
from .inference_settings import build_segmentation_inference, class_names, labels_index_every_class
from .meta_arch import DIMaskDINOArch
from .results import detections_to_instances, segmentation_results
from .vit import D2TimmViT, ViTFeaturePyramid, build_vit_backbone

__all__ = [
    "DIMaskDINOArch",
    "D2SwinBackbone",
    "D2TimmBackbone",
    "build_swin_backbone",
    "build_timm_backbone",
    "checkpoint_backbone",
    "D2TimmViT",
    "ViTFeaturePyramid",
    "build_vit_backbone",
    "build_segmentation_inference",
    "class_names",
    "labels_index_every_class",
    "detections_to_instances",
    "segmentation_results",
]
