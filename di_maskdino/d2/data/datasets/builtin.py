"""The datasets known by name, registered when `di_maskdino.d2` is imported (as detectron2's
own `data/datasets/builtin.py` registers COCO, LVIS, Cityscapes, ADE20K, ...), with their
files under $DETECTRON2_DATASETS (default "datasets"):

  synthetic_train / _val                    datasets/make_synthetic.py (the quick start)
  synthetic_panoptic_train / _val           datasets/make_synthetic_panoptic.py
  bdd100k_ins_seg_train / _val              datasets/prepare_bdd100k.py (BDD100K's instance
                                            segmentation labels converted to COCO format)
  coco_2017_train / _val_panoptic_with_sem_seg
                                            COCO panoptic with its semantic maps
                                            (datasets/prepare_coco_panoptic_semseg.py), as
                                            MaskDINO / Mask2Former name them

detectron2 itself registers COCO instances ("coco_2017_train", "coco_2017_val"), COCO
panoptic without semantic maps ("coco_2017_{train,val}_panoptic"), ADE20K's semantic split
("ade20k_sem_seg_{train,val}") and Cityscapes. Datasets of the config's DATASETS.COCO_FORMAT
are registered by `register_config_datasets` (any COCO-format instance dataset, by path).
A dataset is read only when it is used; its checks run then.
"""

import os
from typing import Sequence

from detectron2.data import DatasetCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from ....synthetic import PANOPTIC_CATEGORIES, SHAPE_CLASSES
from .checks import DatasetError
from .coco import register_coco_instances_checked
from .coco_panoptic import register_coco_panoptic_checked

__all__ = ["BDD100K_CLASSES", "register_builtin_datasets", "register_config_datasets"]

BDD100K_CLASSES = ("pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


def _register_synthetic(root: str) -> None:
    synthetic = os.path.join(root, "synthetic")
    for split in ("train", "val"):
        register_coco_instances_checked(
            f"synthetic_{split}",
            os.path.join(synthetic, f"{split}.json"),
            os.path.join(synthetic, split),
            how_to_create=f"Create it with: python datasets/make_synthetic.py --output {synthetic}",
            thing_classes=list(SHAPE_CLASSES),
        )
    panoptic = os.path.join(root, "synthetic_panoptic")
    for split in ("train", "val"):
        register_coco_panoptic_checked(
            f"synthetic_panoptic_{split}",
            image_root=os.path.join(panoptic, split),
            panoptic_root=os.path.join(panoptic, f"panoptic_{split}"),
            panoptic_json=os.path.join(panoptic, f"panoptic_{split}.json"),
            sem_seg_root=os.path.join(panoptic, f"panoptic_semseg_{split}"),
            instances_json=os.path.join(panoptic, f"instances_{split}.json"),
            categories=PANOPTIC_CATEGORIES,
            how_to_create=f"Create it with: python datasets/make_synthetic_panoptic.py --output {panoptic}",
        )


def _register_bdd100k(root: str) -> None:
    bdd = os.path.join(root, "bdd100k")
    for split in ("train", "val"):
        register_coco_instances_checked(
            f"bdd100k_ins_seg_{split}",
            os.path.join(bdd, "coco_annotations", f"ins_seg_{split}.json"),
            os.path.join(bdd, "images", "10k", split),
            how_to_create=f"Convert the BDD100K labels with: python datasets/prepare_bdd100k.py --root {bdd}",
            thing_classes=list(BDD100K_CLASSES),
        )


def _register_coco_panoptic_with_semantic_maps(root: str) -> None:
    """MaskDINO's and Mask2Former's code registers the same names for the same files: in a
    program that imported one of them first, its registration is kept."""
    coco = os.path.join(root, "coco")
    for split in ("train", "val"):
        if f"coco_2017_{split}_panoptic_with_sem_seg" in DatasetCatalog.list():
            continue
        register_coco_panoptic_checked(
            f"coco_2017_{split}_panoptic_with_sem_seg",
            image_root=os.path.join(coco, f"{split}2017"),
            panoptic_root=os.path.join(coco, f"panoptic_{split}2017"),
            panoptic_json=os.path.join(coco, "annotations", f"panoptic_{split}2017.json"),
            sem_seg_root=os.path.join(coco, f"panoptic_semseg_{split}2017"),
            instances_json=os.path.join(coco, "annotations", f"instances_{split}2017.json"),
            categories=COCO_CATEGORIES,
            how_to_create=(
                "Unpack COCO's panoptic annotations (panoptic_annotations_trainval2017.zip) into "
                f"{coco}, then write the semantic maps with: python datasets/prepare_coco_panoptic_semseg.py "
                f"--root {coco}"
            ),
        )


def register_builtin_datasets(root: str) -> None:
    """Registers the datasets listed in the module's docstring, with their files under
    `root`; names registered already (by an earlier call) are left as they are."""
    if "synthetic_train" in DatasetCatalog.list():
        return
    _register_synthetic(root)
    _register_bdd100k(root)
    _register_coco_panoptic_with_semantic_maps(root)


def register_config_datasets(entries: Sequence[Sequence[str]]) -> None:
    """Registers the COCO-format instance datasets of DATASETS.COCO_FORMAT: each entry is
    [NAME, ANNOTATION_JSON, IMAGE_FOLDER]. A name registered already with the same files is
    left as it is (every process of a run registers the same list); with other files it is
    an error."""
    from detectron2.data import MetadataCatalog

    for entry in entries:
        if len(entry) != 3 or not all(isinstance(part, str) and part for part in entry):
            raise DatasetError(
                f"DATASETS.COCO_FORMAT: each entry is [NAME, ANNOTATION_JSON, IMAGE_FOLDER], got {list(entry)!r}"
            )
        name, json_file, image_root = entry
        if name in DatasetCatalog.list():
            metadata = MetadataCatalog.get(name)
            if (metadata.get("json_file", None), metadata.get("image_root", None)) == (json_file, image_root):
                continue
            raise DatasetError(
                f"DATASETS.COCO_FORMAT: a dataset named {name!r} is already registered (with other files); "
                "choose another name"
            )
        register_coco_instances_checked(
            name,
            json_file,
            image_root,
            how_to_create="Check the paths given in DATASETS.COCO_FORMAT (or --coco-dataset).",
        )
