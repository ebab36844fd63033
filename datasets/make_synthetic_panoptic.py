#!/usr/bin/env python
"""Writes a small COCO-panoptic-format dataset: the coloured shapes of make_synthetic.py as
things (rectangle, ellipse, triangle) in front of two stuff regions (sky, ground) and an
unlabelled band; deterministic by seed. The panoptic quick start trains on it.

    python datasets/make_synthetic_panoptic.py --output datasets/synthetic_panoptic

Layout, per split (train, val):
    OUTPUT/{split}/*.png                     images
    OUTPUT/panoptic_{split}/*.png            panoptic PNGs (id = R + 256 G + 256^2 B, 0 void)
    OUTPUT/panoptic_{split}.json             COCO panoptic annotations (categories with isthing)
    OUTPUT/panoptic_semseg_{split}/*.png     semantic maps (contiguous class, 255 void)
    OUTPUT/instances_{split}.json            COCO instance annotations of the things (RLE)
Category ids: things 1-3, stuff 4-5 (contiguous classes 0-4). A thing is a crowd region with
probability --crowd-probability.
"""

import argparse
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from di_maskdino.panoptic_format import id_to_rgb, panoptic_to_semantic
from di_maskdino.synthetic import PANOPTIC_CATEGORIES, PANOPTIC_CLASSES, THING_CLASSES, render_panoptic_scene


def categories():
    return [dict(c) for c in PANOPTIC_CATEGORIES]


def bbox_of(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def write_split(args, split: str, count: int, rng: np.random.Generator) -> None:
    out = args.output
    for folder in (split, f"panoptic_{split}", f"panoptic_semseg_{split}"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    images, panoptic, instances = [], [], []
    category_to_class = {i + 1: i for i in range(len(PANOPTIC_CLASSES))}
    for image_id in range(1, count + 1):
        num_objects = int(rng.integers(1, args.max_objects + 1))
        image, ids, segments = render_panoptic_scene(rng, args.size, args.size, num_objects, args.crowd_probability)
        name = f"{image_id:06d}.png"
        Image.fromarray(image).save(os.path.join(out, split, name))
        Image.fromarray(id_to_rgb(ids)).save(os.path.join(out, f"panoptic_{split}", name))
        info = []
        for segment in segments:
            mask = ids == segment["id"]
            entry = {
                "id": segment["id"],
                "category_id": segment["category"] + 1,
                "iscrowd": segment["iscrowd"],
                "area": int(mask.sum()),
                "bbox": bbox_of(mask),
            }
            info.append(entry)
            if PANOPTIC_CLASSES[segment["category"]] in THING_CLASSES:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                instances.append(
                    {
                        "id": len(instances) + 1,
                        "image_id": image_id,
                        "category_id": entry["category_id"],
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                        "area": float(entry["area"]),
                        "bbox": entry["bbox"],
                        "iscrowd": entry["iscrowd"],
                    }
                )
        semantic = panoptic_to_semantic(ids, info, category_to_class)
        Image.fromarray(semantic).save(os.path.join(out, f"panoptic_semseg_{split}", name))
        images.append({"id": image_id, "file_name": name, "height": args.size, "width": args.size})
        panoptic.append({"image_id": image_id, "file_name": name, "segments_info": info})
    with open(os.path.join(out, f"panoptic_{split}.json"), "w") as handle:
        json.dump({"images": images, "annotations": panoptic, "categories": categories()}, handle)
    thing_categories = [{"id": c["id"], "name": c["name"]} for c in categories() if c["isthing"]]
    with open(os.path.join(out, f"instances_{split}.json"), "w") as handle:
        json.dump({"images": images, "annotations": instances, "categories": thing_categories}, handle)
    segments = sum(len(a["segments_info"]) for a in panoptic)
    print(f"{split}: {count} images, {segments} segments ({len(instances)} things) -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join("datasets", "synthetic_panoptic"))
    parser.add_argument("--num-train", type=int, default=48)
    # NOTE: 64 validation scenes, as make_synthetic.py (whose 16 gave AP estimates too noisy
    # to compare seeds or schedules); the first 16 are the former set
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--crowd-probability", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    write_split(args, "train", args.num_train, rng)
    write_split(args, "val", args.num_val, rng)


if __name__ == "__main__":
    main()
