#!/usr/bin/env python
"""Writes the semantic maps of COCO panoptic segmentation (what the datasets
"coco_2017_{train,val}_panoptic_with_sem_seg" read for mIoU), from the panoptic annotations.

    python datasets/prepare_coco_panoptic_semseg.py --root datasets/coco

Reads ROOT/annotations/panoptic_{split}2017.json and ROOT/panoptic_{split}2017/*.png, writes
ROOT/panoptic_semseg_{split}2017/*.png: every pixel holds the contiguous class of its segment
(the rank of the category id among the categories, i.e. detectron2's COCO_CATEGORIES order:
things 0-79, stuff 80-132), crowd segments included, 255 where the annotation is void. Works
for any dataset in COCO's panoptic layout (--splits).
"""

import argparse
import json
import os
from functools import partial
from multiprocessing import Pool

import numpy as np
from PIL import Image

from di_maskdino.panoptic_format import panoptic_to_semantic, rgb_to_id


def convert(annotation, panoptic_dir: str, output_dir: str, category_to_class) -> None:
    path = os.path.join(panoptic_dir, annotation["file_name"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"panoptic PNG {path} (of image {annotation['image_id']}) does not exist")
    ids = rgb_to_id(np.asarray(Image.open(path).convert("RGB")))
    semantic = panoptic_to_semantic(ids, annotation["segments_info"], category_to_class)
    Image.fromarray(semantic).save(os.path.join(output_dir, annotation["file_name"]))


def convert_split(root: str, split: str, workers: int) -> int:
    json_file = os.path.join(root, "annotations", f"panoptic_{split}.json")
    if not os.path.isfile(json_file):
        raise SystemExit(f"{json_file} does not exist: unpack COCO's panoptic annotations into {root} first")
    with open(json_file) as handle:
        content = json.load(handle)
    category_to_class = {c["id"]: i for i, c in enumerate(sorted(content["categories"], key=lambda c: c["id"]))}
    if len(category_to_class) > 255:
        raise SystemExit(f"{json_file}: {len(category_to_class)} categories do not fit an 8-bit map with 255 as void")
    output_dir = os.path.join(root, f"panoptic_semseg_{split}")
    os.makedirs(output_dir, exist_ok=True)
    work = partial(
        convert,
        panoptic_dir=os.path.join(root, f"panoptic_{split}"),
        output_dir=output_dir,
        category_to_class=category_to_class,
    )
    if workers > 1:
        with Pool(workers) as pool:
            pool.map(work, content["annotations"], chunksize=64)
    else:
        for annotation in content["annotations"]:
            work(annotation)
    print(f"{split}: {len(content['annotations'])} semantic maps -> {output_dir}")
    return len(content["annotations"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.join("datasets", "coco"))
    parser.add_argument("--splits", nargs="+", default=["train2017", "val2017"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    for split in args.splits:
        convert_split(args.root, split, args.workers)


if __name__ == "__main__":
    main()
