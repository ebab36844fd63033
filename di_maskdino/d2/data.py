"""Dataset mapping for detectron2 data loaders.

`DIMaskDINODatasetMapper` reads an image, applies the configured augmentation - large-scale
jitter ("lsj": flip, random resize to 0.1-2.0 of 1024, fixed 1024 crop; the paper's COCO
setting) or shortest-edge resizing ("resize") - and turns the annotations (polygons or RLE)
into detectron2 `Instances` with bitmask masks and boxes recomputed from the masks.

`read_image_rgb` accepts what real datasets contain: grayscale, palette, RGBA, CMYK and
16-bit images, EXIF orientation. Unreadable files raise an error naming the file.
"""

import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DIMaskDINODatasetMapper", "read_image_rgb", "ImageReadError", "build_augmentation"]

logger = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and the problem."""


def read_image_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of the image at `path`, upright per its EXIF orientation."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError as error:
        raise ImageReadError(f"image file not found: {path}") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageReadError(f"cannot decode image {path} (corrupt or not an image): {error}") from error
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # high bit depth: scale the actual range to 8 bits
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
        return np.repeat(array.round().astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, LA, P, RGBA, CMYK, ...
    return np.asarray(image, dtype=np.uint8).copy()


def build_augmentation(cfg, is_train: bool):
    """Augmentations of INPUT.DATASET_MAPPER_NAME ("lsj" or "resize")."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in ("lsj", "resize"):
        raise ValueError(f"INPUT.DATASET_MAPPER_NAME must be 'lsj' or 'resize', got {name!r}")
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    if name == "lsj":
        size = cfg.INPUT.IMAGE_SIZE
        return [
            T.RandomFlip(horizontal=True),
            T.ResizeScale(
                min_scale=cfg.INPUT.MIN_SCALE, max_scale=cfg.INPUT.MAX_SCALE, target_height=size, target_width=size
            ),
            # NOTE: detectron2 pads segmentations with 255 (the semantic "ignore" label),
            # which would turn the padding into foreground of RLE / bitmask instance masks.
            T.FixedSizeCrop(crop_size=(size, size), seg_pad_value=0),
        ]
    return [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING),
        T.RandomFlip(horizontal=True),
    ]


class DIMaskDINODatasetMapper:
    """detectron2 dataset dict -> {"image": (3, H, W) uint8 tensor (RGB), "instances", "height",
    "width", ...}. In training, crowd annotations and instances emptied by cropping are
    dropped (detectron2's convention)."""

    @configurable
    def __init__(self, is_train: bool, *, augmentations, image_format: str = "RGB"):
        self.is_train = is_train
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
        annotations = [
            utils.transform_instance_annotations(a, transforms, image.shape[:2])
            for a in dataset_dict.pop("annotations", [])
            if a.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(annotations, image.shape[:2], mask_format="bitmask")
        if not instances.has("gt_masks"):
            instances.gt_masks = BitMasks(torch.zeros((0,) + image.shape[:2], dtype=torch.bool))
        instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
