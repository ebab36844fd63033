#!/usr/bin/env python
"""Converts the BDD100K instance-segmentation labels (10K split) to COCO instance JSON with
the 8 evaluated classes, so that `bdd100k_ins_seg_train` / `bdd100k_ins_seg_val` load.

    python datasets/prepare_bdd100k.py --root datasets/bdd100k [--source bitmasks|rles]

Expected layout under --root (as BDD100K is distributed):
    images/10k/{train,val}/*.jpg
    labels/ins_seg/bitmasks/{train,val}/*.png         (--source bitmasks, the default)
    labels/ins_seg/rles/ins_seg_{train,val}.json      (--source rles)
Writes coco_annotations/ins_seg_{train,val}.json.

Bitmask PNGs are RGBA: R is the category (1-8, 0 background), G the attribute bits
(truncated << 3 | occluded << 2 | crowd << 1 | ignore), (B << 8) + A the instance id.
Crowd and ignored instances are kept with iscrowd = 1 (evaluation ignores them, training
drops them). Labels of other categories are not among the 8 classes: they are skipped and
counted in the report.
"""

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

CLASSES = ("pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CROWD_BIT, IGNORE_BIT = 2, 1


def _annotation(mask: np.ndarray, category_id: int, iscrowd: bool, annotation_id: int, image_id: int) -> dict:
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = mask_util.toBbox(encoded).tolist()
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": int(iscrowd),
        "segmentation": {"size": encoded["size"], "counts": encoded["counts"].decode()},
        "area": float(mask_util.area(encoded)),
        "bbox": [x, y, w, h],
    }


def instances_from_bitmask(path: str):
    """Yields (mask, category index 1-8, iscrowd, (H, W)) for every instance of a BDD100K bitmask."""
    with Image.open(path) as image:
        if image.mode != "RGBA":
            raise ValueError(f"{path}: a BDD100K instance bitmask is an RGBA PNG, this one is {image.mode}")
        pixels = np.asarray(image, dtype=np.int64)
    category, attributes = pixels[..., 0], pixels[..., 1]
    instance = (pixels[..., 2] << 8) + pixels[..., 3]
    for value in np.unique(instance[category > 0]):
        mask = (instance == value) & (category > 0)
        categories = np.unique(category[mask])
        if len(categories) != 1:
            raise ValueError(f"{path}: instance {value} covers several categories {categories.tolist()}")
        bits = int(np.bitwise_or.reduce(attributes[mask]))
        yield mask, int(categories[0]), bool(bits & (CROWD_BIT | IGNORE_BIT)), (mask.shape[0], mask.shape[1])


def frames_from_rles(path: str):
    with open(path) as handle:
        content = json.load(handle)
    return content["frames"] if isinstance(content, dict) else content


def convert_split(root: str, split: str, source: str) -> dict:
    image_dir = os.path.join(root, "images", "10k", split)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    skipped = Counter()
    if source == "bitmasks":
        mask_dir = os.path.join(root, "labels", "ins_seg", "bitmasks", split)
        if not os.path.isdir(mask_dir):
            raise SystemExit(
                f"{mask_dir} does not exist: download the BDD100K 10K instance segmentation bitmasks there"
            )
        for image_id, name in enumerate(sorted(f for f in os.listdir(mask_dir) if f.endswith(".png")), start=1):
            height = width = None
            masks = instances_from_bitmask(os.path.join(mask_dir, name))
            for mask, category, crowd, (height, width) in masks:  # noqa: B007 - the size is read after the loop
                coco["annotations"].append(_annotation(mask, category, crowd, len(coco["annotations"]) + 1, image_id))
            if height is None:
                with Image.open(os.path.join(mask_dir, name)) as image:
                    width, height = image.size
            coco["images"].append({"id": image_id, "file_name": name[:-4] + ".jpg", "height": height, "width": width})
    else:
        rle_file = os.path.join(root, "labels", "ins_seg", "rles", f"ins_seg_{split}.json")
        if not os.path.isfile(rle_file):
            raise SystemExit(
                f"{rle_file} does not exist: download the BDD100K 10K instance segmentation RLE labels there"
            )
        for image_id, frame in enumerate(sorted(frames_from_rles(rle_file), key=lambda f: f["name"]), start=1):
            height = width = None
            for label in frame.get("labels") or []:
                if label.get("category") not in CLASSES:
                    skipped[label.get("category")] += 1
                    continue
                rle = {"size": label["rle"]["size"], "counts": label["rle"]["counts"].encode()}
                mask = mask_util.decode(rle).astype(bool)
                height, width = mask.shape
                attributes = label.get("attributes") or {}
                crowd = bool(
                    attributes.get("crowd")
                    or attributes.get("ignore")
                    or attributes.get("ignored")
                    or label.get("ignored")
                )
                category = CLASSES.index(label["category"]) + 1
                coco["annotations"].append(_annotation(mask, category, crowd, len(coco["annotations"]) + 1, image_id))
            if height is None:
                with Image.open(os.path.join(image_dir, frame["name"])) as image:
                    width, height = image.size
            coco["images"].append({"id": image_id, "file_name": frame["name"], "height": height, "width": width})
    out_dir = os.path.join(root, "coco_annotations")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"ins_seg_{split}.json")
    with open(out, "w") as handle:
        json.dump(coco, handle)
    crowd = sum(a["iscrowd"] for a in coco["annotations"])
    report = (
        f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} instances ({crowd} crowd/ignored) -> {out}"
    )
    if skipped:
        report += f"; skipped labels of other categories: {dict(skipped)}"
    print(report)
    return coco


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.join("datasets", "bdd100k"))
    parser.add_argument("--source", choices=("bitmasks", "rles"), default="bitmasks")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    args = parser.parse_args()
    if not os.path.isdir(args.root):
        sys.exit(f"--root {args.root} does not exist")
    for split in args.splits:
        convert_split(args.root, split, args.source)


if __name__ == "__main__":
    main()
