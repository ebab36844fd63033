"""The dataset mappers of panoptic and semantic segmentation training.

- "panoptic_lsj" (`PanopticDatasetMapper`): COCO panoptic with large-scale jitter, MaskDINO's
  panoptic recipe. Every non-crowd segment of the panoptic PNG is a target (things and
  stuff); crowd segments are dropped.
- "semantic" (`SemanticDatasetMapper`): a semantic map (ADE20K style) with the semantic
  recipe (`augmentation.semantic_augmentation`). Every class present is one target (its
  whole region).

Targets are detectron2 `Instances` with gt_classes, gt_masks (bitmasks), gt_boxes (the tight
boxes of the masks) and gt_is_thing (bool; the criterion supervises boxes of things only
unless MODEL.DI_MASKDINO.LOSS.STUFF_BOX_LOSS). At test time every recipe resizes the shortest
edge to INPUT.MIN_SIZE_TEST; the evaluators read the ground truth from the files.

NOTE: images are padded by the model (to a multiple of 32, zeros after normalisation, i.e.
the mean colour) and target masks with zeros, whereas the semantic mapper of the releases
pads images with 128 and maps with the ignore label in the mapper.
"""

import copy
import logging
from typing import Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances
from PIL import Image

from ...images import ImageReadError, read_image_rgb
from ...panoptic_format import IGNORE_LABEL, rgb_to_id
from .augmentation import lsj_augmentation, semantic_augmentation

__all__ = ["PanopticDatasetMapper", "SemanticDatasetMapper"]

logger = logging.getLogger(__name__)


def _train_metadata(cfg):
    return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if len(cfg.DATASETS.TRAIN) else None


def _read_map(path: str, what: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except FileNotFoundError as error:
        raise ImageReadError(f"{what} not found: {path}") from error
    except OSError as error:
        raise ImageReadError(f"cannot decode {what} {path}: {error}") from error


def _targets(image_shape, masks, classes, is_thing) -> Instances:
    instances = Instances(image_shape)
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    instances.gt_is_thing = torch.tensor(is_thing, dtype=torch.bool)
    if masks:
        stacked = torch.from_numpy(np.ascontiguousarray(np.stack(masks)))
    else:
        stacked = torch.zeros((0,) + tuple(image_shape), dtype=torch.bool)
    instances.gt_masks = BitMasks(stacked)
    instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
    return utils.filter_empty_instances(instances)


class _SegmentationMapper:
    """Shared reading and augmentation of the two recipes."""

    def __init__(self, augmentations, image_format: str, num_classes: int):
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        logger.info(f"{type(self).__name__} (train): {augmentations}")

    def _image(self, dataset_dict) -> np.ndarray:
        image = read_image_rgb(dataset_dict["file_name"])
        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        utils.check_image_size(dataset_dict, image)
        return image

    def _check_class(self, category: int, source: str) -> int:
        if not 0 <= category < self.num_classes:
            raise ValueError(
                f"{source}: class {category} is outside the model's {self.num_classes} classes "
                "(MODEL.DI_MASKDINO.NUM_CLASSES must cover every class of the dataset)"
            )
        return category


class PanopticDatasetMapper(_SegmentationMapper):
    """detectron2 panoptic dataset dict (file_name, pan_seg_file_name, segments_info with
    contiguous category_id, isthing, iscrowd) -> {"image": (3, H, W) uint8, "instances", ...}."""

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations, image_format: str = "RGB", num_classes: int):
        if not is_train:
            raise ValueError("PanopticDatasetMapper is for training; test images need no targets (see build_mapper)")
        super().__init__(augmentations, image_format, num_classes)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": lsj_augmentation(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.DI_MASKDINO.NUM_CLASSES,
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        if "pan_seg_file_name" not in dataset_dict:
            raise ValueError(
                f"{dataset_dict.get('file_name')}: no 'pan_seg_file_name' - INPUT.DATASET_MAPPER_NAME 'panoptic_lsj' "
                "needs a panoptic dataset (e.g. coco_2017_train_panoptic)"
            )
        image = self._image(dataset_dict)
        augmented = T.AugInput(image)
        transforms = self.augmentations(augmented)
        image = augmented.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        path = dataset_dict.pop("pan_seg_file_name")
        colours = _read_map(path, "panoptic PNG")
        if colours.ndim != 3 or colours.shape[2] < 3:
            raise ImageReadError(f"panoptic PNG {path} is not an RGB image (shape {colours.shape})")
        ids = rgb_to_id(transforms.apply_segmentation(np.ascontiguousarray(colours[..., :3])))
        masks, classes, is_thing = [], [], []
        for segment in dataset_dict.pop("segments_info"):
            if segment.get("iscrowd", 0):
                continue
            masks.append(ids == segment["id"])
            classes.append(self._check_class(segment["category_id"], path))
            is_thing.append(bool(segment["isthing"]))
        dataset_dict["instances"] = _targets(image.shape[:2], masks, classes, is_thing)
        return dataset_dict


class SemanticDatasetMapper(_SegmentationMapper):
    """detectron2 semantic dataset dict (file_name, sem_seg_file_name) -> {"image",
    "instances" (one per class present), ...}. `thing_classes`: contiguous indices of the
    classes that count as things (none for ADE20K's semantic split)."""

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations,
        image_format: str = "RGB",
        num_classes: int,
        ignore_label: int = IGNORE_LABEL,
        thing_classes: Sequence[int] = (),
    ):
        if not is_train:
            raise ValueError("SemanticDatasetMapper is for training; test images need no targets (see build_mapper)")
        super().__init__(augmentations, image_format, num_classes)
        self.ignore_label = ignore_label
        self.thing_classes = set(int(c) for c in thing_classes)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        metadata = _train_metadata(cfg)
        ignore_label = getattr(metadata, "ignore_label", IGNORE_LABEL) if metadata is not None else IGNORE_LABEL
        things = getattr(metadata, "thing_dataset_id_to_contiguous_id", {}) if metadata is not None else {}
        return {
            "is_train": is_train,
            "augmentations": semantic_augmentation(cfg, ignore_label),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.DI_MASKDINO.NUM_CLASSES,
            "ignore_label": ignore_label,
            "thing_classes": sorted(things.values()),
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        if "sem_seg_file_name" not in dataset_dict:
            raise ValueError(
                f"{dataset_dict.get('file_name')}: no 'sem_seg_file_name' - INPUT.DATASET_MAPPER_NAME 'semantic' needs "
                "a semantic-segmentation dataset (e.g. ade20k_sem_seg_train)"
            )
        image = self._image(dataset_dict)
        path = dataset_dict.pop("sem_seg_file_name")
        semantic = _read_map(path, "semantic map")
        if semantic.ndim != 2:
            raise ImageReadError(f"semantic map {path} must have one channel, got shape {semantic.shape}")
        # 8-bit maps stay uint8 (resized with PIL, nearest); wider ones go through float64
        # (detectron2 resizes non-uint8 arrays with torch, which has no integer nearest)
        semantic = semantic if semantic.dtype == np.uint8 else semantic.astype(np.float64)
        augmented = T.AugInput(image, sem_seg=semantic)
        self.augmentations(augmented)
        image, semantic = augmented.image, augmented.sem_seg
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        semantic = semantic.astype(np.int64)
        dataset_dict["sem_seg"] = torch.as_tensor(np.ascontiguousarray(semantic))
        classes = [int(c) for c in np.unique(semantic) if c != self.ignore_label]
        masks = [semantic == c for c in classes]
        classes = [self._check_class(c, path) for c in classes]
        dataset_dict["instances"] = _targets(
            image.shape[:2], masks, classes, [c in self.thing_classes for c in classes]
        )
        return dataset_dict
