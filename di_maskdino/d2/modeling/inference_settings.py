"""Inference settings read from the config and the dataset's metadata: the panoptic /
semantic inference MODEL.DI_MASKDINO.TEST asks for (which classes are things), and the
names of the model's classes."""

from typing import List, Optional

import torch
from detectron2.data import MetadataCatalog

from ...modeling.segmentation_inference import SegmentationInference

__all__ = ["build_segmentation_inference", "class_names", "labels_index_every_class"]


def _metadata_dataset(cfg) -> Optional[str]:
    """The dataset whose metadata describes the model's classes: DATASETS.TEST[0], else
    DATASETS.TRAIN[0]."""
    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    return names[0] if names else None


def labels_index_every_class(cfg) -> bool:
    """Whether the model's labels index things and stuff (a panoptic / semantic model:
    MODEL.DI_MASKDINO.TEST.PANOPTIC_ON or SEMANTIC_ON), named by the dataset's
    "stuff_classes", rather than things only ("thing_classes")."""
    t = cfg.MODEL.DI_MASKDINO.TEST
    return bool(t.PANOPTIC_ON or t.SEMANTIC_ON)


def class_names(cfg) -> List[str]:
    """The names of the model's labels, in label order (see `labels_index_every_class`), from
    the dataset of DATASETS.TEST (else TRAIN); [] without a dataset."""
    name = _metadata_dataset(cfg)
    if name is None:
        return []
    key = "stuff_classes" if labels_index_every_class(cfg) else "thing_classes"
    return list(MetadataCatalog.get(name).get(key, None) or [])


def build_segmentation_inference(cfg) -> Optional[SegmentationInference]:
    """The panoptic / semantic inference MODEL.DI_MASKDINO.TEST asks for, or None when only
    instance inference is on (the model then gives instances exactly as before).

    Which classes are things comes from the metadata of the first dataset of DATASETS.TEST
    (else DATASETS.TRAIN): its "thing_dataset_id_to_contiguous_id" (none: every class is
    stuff, as in ADE20K's semantic split); its "stuff_classes" must list NUM_CLASSES classes.
    """
    t = cfg.MODEL.DI_MASKDINO.TEST
    instance, panoptic, semantic = t.INSTANCE_ON, t.PANOPTIC_ON, t.SEMANTIC_ON
    object_mask_threshold, overlap_threshold, temperature = t.OBJECT_MASK_THRESHOLD, t.OVERLAP_THRESHOLD, t.TEMPERATURE
    if not (panoptic or semantic):
        return None
    num_classes = cfg.MODEL.DI_MASKDINO.NUM_CLASSES
    name = _metadata_dataset(cfg)
    if name is None:
        raise ValueError(
            "panoptic / semantic inference needs a dataset in DATASETS.TEST or DATASETS.TRAIN whose metadata says "
            "which classes are things"
        )
    metadata = MetadataCatalog.get(name)
    classes = getattr(metadata, "stuff_classes", None)
    if classes is None:
        raise ValueError(
            f"dataset {name!r} has no 'stuff_classes': panoptic / semantic inference needs a panoptic or semantic "
            "dataset (e.g. coco_2017_val_panoptic_with_sem_seg, ade20k_sem_seg_val)"
        )
    if len(classes) != num_classes:
        raise ValueError(
            f"dataset {name!r} has {len(classes)} classes but MODEL.DI_MASKDINO.NUM_CLASSES is {num_classes}"
        )
    is_thing = torch.zeros(num_classes, dtype=torch.bool)
    for index in getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).values():
        is_thing[index] = True
    return SegmentationInference(
        is_thing,
        instance=instance,
        panoptic=panoptic,
        semantic=semantic,
        object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold,
        temperature=temperature if temperature > 0 else None,
        topk=cfg.TEST.DETECTIONS_PER_IMAGE,
    )
