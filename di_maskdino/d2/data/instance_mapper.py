"""The dataset mapper of instance datasets (INPUT.DATASET_MAPPER_NAME "lsj" or "resize").

`DIMaskDINODatasetMapper` reads an image (`di_maskdino.images.read_image_rgb`), applies the
recipe's augmentation (`augmentation.py`) and turns the annotations (polygons or RLE) into
detectron2 `Instances` with bitmask masks and boxes recomputed from the masks.
"""

import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks

from ...images import read_image_rgb
from .augmentation import build_augmentation

__all__ = ["DIMaskDINODatasetMapper"]

logger = logging.getLogger(__name__)


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
        for annotation in annotations:
            # RLE masks come back from detectron2's resizing as PIL's read-only arrays, which
            # torch warns about when detectron2 turns them into tensors: hand over writable ones
            mask = annotation.get("segmentation")
            if isinstance(mask, np.ndarray) and not mask.flags.writeable:
                annotation["segmentation"] = mask.copy()
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
