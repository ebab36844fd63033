"""Dataset mapping for detectron2 data loaders.

`DIMaskDINODatasetMapper` reads an image, applies the configured augmentation - large-scale
jitter ("lsj": flip, random resize to 0.1-2.0 of 1024, fixed 1024 crop; the paper's COCO
setting) or shortest-edge resizing ("resize") - and turns the annotations (polygons or RLE)
into detectron2 `Instances` with bitmask masks and boxes recomputed from the masks.

Images are read by `di_maskdino.images.read_image_rgb` (re-exported here).
"""

import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks

from ..images import ImageReadError, read_image_rgb

__all__ = ["DIMaskDINODatasetMapper", "read_image_rgb", "ImageReadError", "build_augmentation", "lsj_augmentation"]

logger = logging.getLogger(__name__)


def lsj_augmentation(cfg):
    """Large-scale jitter of INPUT.IMAGE_SIZE, INPUT.MIN_SCALE, INPUT.MAX_SCALE: flip, rescale,
    crop (or pad) to IMAGE_SIZE x IMAGE_SIZE."""
    size = cfg.INPUT.IMAGE_SIZE
    return [
        T.RandomFlip(horizontal=True),
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE, max_scale=cfg.INPUT.MAX_SCALE, target_height=size, target_width=size
        ),
        # NOTE: detectron2 pads segmentations with 255 (the semantic "ignore" label), which would
        # turn the padding into foreground of instance masks; 0 is background for instance
        # masks and void (id 0) for panoptic PNGs.
        T.FixedSizeCrop(crop_size=(size, size), seg_pad_value=0),
    ]


def build_augmentation(cfg, is_train: bool):
    """Augmentations of INPUT.DATASET_MAPPER_NAME ("lsj" or "resize")."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in ("lsj", "resize"):
        raise ValueError(f"INPUT.DATASET_MAPPER_NAME must be 'lsj' or 'resize', got {name!r}")
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    if name == "lsj":
        return lsj_augmentation(cfg)
    return [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING),
        T.RandomFlip(horizontal=True),
    ]


class DIMaskDINODatasetMapper:
    """detectron2 dataset dict -> {"image": (3, H, W) uint8 tensor (RGB), "instances", "height",
    "width", ...}. In training, crowd annotations and instances emptied by cropping are
    dropped (detectron2's convention). With `use_instance_mask` False (a detection-only
    model) the masks are not read and the boxes are the annotations' boxes."""

    @configurable
    def __init__(self, is_train: bool, *, augmentations, image_format: str = "RGB", use_instance_mask: bool = True):
        self.is_train = is_train
        self.use_instance_mask = use_instance_mask
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        logger.info(f"DIMaskDINODatasetMapper ({'train' if is_train else 'test'}): {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {cfg.INPUT.FORMAT!r}")
        return {
            "is_train": is_train,
            "augmentations": build_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "use_instance_mask": cfg.MODEL.MASK_ON,
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_rgb(dataset_dict["file_name"])
        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        utils.check_image_size(dataset_dict, image)
        augmented = T.AugInput(image)
        transforms = self.augmentations(augmented)
        image = augmented.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        annotations = [a for a in dataset_dict.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        if not self.use_instance_mask:
            annotations = [{k: v for k, v in a.items() if k != "segmentation"} for a in annotations]
        annotations = [utils.transform_instance_annotations(a, transforms, image.shape[:2]) for a in annotations]
        if not self.use_instance_mask:
            instances = utils.annotations_to_instances(annotations, image.shape[:2])
            dataset_dict["instances"] = utils.filter_empty_instances(instances)
            return dataset_dict
        instances = utils.annotations_to_instances(annotations, image.shape[:2], mask_format="bitmask")
        if not instances.has("gt_masks"):
            instances.gt_masks = BitMasks(torch.zeros((0,) + image.shape[:2], dtype=torch.bool))
        instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
