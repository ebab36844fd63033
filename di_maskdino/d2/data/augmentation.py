"""The augmentation recipes of the dataset mappers (INPUT.DATASET_MAPPER_NAME).

- "lsj" (instances, panoptic "panoptic_lsj"): large-scale jitter, the paper's COCO setting:
  flip, random resize to INPUT.MIN_SCALE-INPUT.MAX_SCALE of INPUT.IMAGE_SIZE, fixed-size crop.
- "resize" (instances): shortest-edge resize to a random INPUT.MIN_SIZE_TRAIN, flip.
- "semantic": shortest-edge resize, a crop retried until no class covers more than
  INPUT.CROP.SINGLE_CATEGORY_MAX_AREA of it, optional SSD colour jitter, flip (the recipe of
  MaskFormer / Mask2Former / MaskDINO).
At test time every recipe resizes the shortest edge to INPUT.MIN_SIZE_TEST (at most
INPUT.MAX_SIZE_TEST).
"""

from detectron2.data import transforms as T

from ...panoptic_format import IGNORE_LABEL

__all__ = [
    "INSTANCE_AUGMENTATIONS",
    "lsj_augmentation",
    "resize_augmentation",
    "build_augmentation",
    "semantic_augmentation",
    "test_augmentation",
]


def test_augmentation(cfg):
    """Shortest-edge resizing to INPUT.MIN_SIZE_TEST, at most INPUT.MAX_SIZE_TEST."""
    return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]


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
        # masks and void (id 0) for panoptic PNGs. With the padding mask the crop is not
        # padded: the model pads the batch and keeps the padding out (docs/padding_mask.md).
        T.FixedSizeCrop(crop_size=(size, size), pad=not cfg.MODEL.DI_MASKDINO.PADDING_MASK, seg_pad_value=0),
    ]


def resize_augmentation(cfg):
    """Shortest-edge resize to a random INPUT.MIN_SIZE_TRAIN (at most INPUT.MAX_SIZE_TRAIN), flip."""
    return [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING),
        T.RandomFlip(horizontal=True),
    ]


# the training recipes of instance datasets, by INPUT.DATASET_MAPPER_NAME
INSTANCE_AUGMENTATIONS = {"lsj": lsj_augmentation, "resize": resize_augmentation}


def build_augmentation(cfg, is_train: bool):
    """Augmentations of an instance recipe (INPUT.DATASET_MAPPER_NAME in
    `INSTANCE_AUGMENTATIONS`) in training, `test_augmentation` at test time."""
    if not is_train:
        return test_augmentation(cfg)
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in INSTANCE_AUGMENTATIONS:
        raise ValueError(
            f"INPUT.DATASET_MAPPER_NAME {name!r} is not an instance recipe; those are {list(INSTANCE_AUGMENTATIONS)}"
        )
    return INSTANCE_AUGMENTATIONS[name](cfg)


def semantic_augmentation(cfg, ignore_label: int = IGNORE_LABEL):
    """The semantic recipe (see the module's docstring); `ignore_label` marks void pixels."""
    augmentations = [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    ]
    crop = cfg.INPUT.CROP
    single_category_max_area = crop.SINGLE_CATEGORY_MAX_AREA
    if crop.ENABLED:
        augmentations.append(
            T.RandomCrop_CategoryAreaConstraint(crop.TYPE, crop.SIZE, single_category_max_area, ignore_label)
        )
    if cfg.INPUT.COLOR_AUG_SSD:
        from detectron2.projects.point_rend import ColorAugSSDTransform

        augmentations.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    augmentations.append(T.RandomFlip())
    return augmentations
