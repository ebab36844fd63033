#!/usr/bin/env python
"""Runs a trained DI-MaskDINO on images and draws the results with detectron2's Visualizer.

    python tools/demo.py --config-file configs/quick_start.yaml --input datasets/synthetic/val \\
        --output output/demo --json output/demo/instances.json MODEL.WEIGHTS output/quick_start/model_final.pth

--input takes image files, folders and glob patterns. Every input image gives one drawing
in OUTPUT (<name>.jpg; inputs sharing a name, such as a.jpg and a.png, get distinct
names). --json writes the instances in the COCO results format (image_id, category_id of
the dataset, bbox [x, y, w, h], score, RLE segmentation) with the class name and file name;
pycocotools' COCO.loadRes reads it. Unreadable images are reported by name and skipped;
the exit status is then 1. Without CUDA the demo runs on the CPU and says so.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np
import torch
import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import di_maskdino.d2  # noqa: E402, F401 - first: imports detectron2 without its import-time warnings

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from di_maskdino.d2 import (  # noqa: E402
    Checkpointer,
    CheckpointError,
    ImageReadError,
    load_config,
    read_image_rgb,
    use_available_device,
)
from di_maskdino.d2.visualization import draw_predictions  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def expand_inputs(patterns):
    """Files, folders (their images, sorted) and glob patterns -> list of paths; a folder or
    pattern without images is an error naming it."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f) for f in os.listdir(pattern) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise SystemExit(f"--input {pattern}: the folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise SystemExit(f"--input {pattern}: no such file, folder or matching image")
            paths += matches
    return list(dict.fromkeys(paths))  # an image named twice is drawn once


def output_names(paths):
    """A distinct drawing name per input: <stem>.jpg, else <stem>_<ext>.jpg, else <stem>_<n>.jpg."""
    names, taken = [], set()
    for path in paths:
        stem, ext = os.path.splitext(os.path.basename(path))
        candidates = [f"{stem}.jpg", f"{stem}_{ext.lstrip('.').lower()}.jpg"]
        candidates += [f"{stem}_{n}.jpg" for n in range(2, len(paths) + 2)]
        name = next(c for c in candidates if c not in taken)
        taken.add(name)
        names.append(name)
    return names


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    if args.device:
        cfg.MODEL.DEVICE = args.device
    note = use_available_device(cfg)
    if note:
        print(note)
    cfg.freeze()
    return cfg


def load_model(cfg, allow_random_weights: bool):
    """The model of the config with MODEL.WEIGHTS, which must fill it."""
    model = build_model(cfg).eval()
    if not cfg.MODEL.WEIGHTS:
        if not allow_random_weights:
            raise SystemExit(
                "MODEL.WEIGHTS is not set: the demo would draw the predictions of an untrained (random) model. "
                "Give the weights, e.g. MODEL.WEIGHTS output/quick_start/model_final.pth, or pass "
                "--allow-random-weights to draw them anyway."
            )
        print(
            "WARNING: no MODEL.WEIGHTS, --allow-random-weights: the drawings show an UNTRAINED model", file=sys.stderr
        )
        return model
    try:
        Checkpointer(model, mode="strict", what="MODEL.WEIGHTS").load(cfg.MODEL.WEIGHTS)
    except CheckpointError as error:
        raise SystemExit(str(error)) from error
    return model


def predict(model, cfg, image: np.ndarray):
    """detectron2 Instances (on the CPU) of one (H, W, 3) uint8 RGB image, at its size."""
    height, width = image.shape[:2]
    resized = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST).get_transform(image)
    resized = resized.apply_image(image)
    model_input = resized[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else resized
    tensor = torch.as_tensor(np.ascontiguousarray(model_input.transpose(2, 0, 1)))
    with torch.no_grad():
        return model([{"image": tensor, "height": height, "width": width}])[0]["instances"].to("cpu")


class DatasetTerms:
    """Class names, dataset category ids and image ids of the config's first test dataset
    (DATASETS.TEST[0]) when it is registered and readable; otherwise the model's 0-based class
    indices and image ids numbered from 1 in input order."""

    def __init__(self, cfg):
        self.name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
        self.metadata = MetadataCatalog.get(self.name or "__demo")
        self.image_ids = {}
        self.note = ""
        if self.name and self.name in DatasetCatalog.list():
            try:
                for record in DatasetCatalog.get(self.name):  # also fills the category id mapping
                    self.image_ids[os.path.basename(record["file_name"])] = record["image_id"]
            except Exception as error:  # noqa: BLE001 - the demo works without the dataset
                self.note = f"dataset {self.name!r} not readable here ({str(error).splitlines()[0]})"
        to_dataset = self.metadata.get("thing_dataset_id_to_contiguous_id")
        self.category_ids = {v: k for k, v in to_dataset.items()} if to_dataset else None
        if self.category_ids is None:
            self.note = (self.note + "; " if self.note else "") + "category_id is the model's 0-based class index"
        self.classes = self.metadata.get("thing_classes", None)

    def category(self, label: int):
        name = self.classes[label] if self.classes and label < len(self.classes) else str(label)
        return (self.category_ids[label] if self.category_ids else label), name

    def image_id(self, path: str, fallback: int) -> int:
        return self.image_ids.get(os.path.basename(path), fallback)


def coco_results(instances, path, image_id, terms):
    """COCO results records (detectron2's instances_to_coco_json, in the dataset's ids)."""
    records = []
    boxes = instances.pred_boxes.tensor.clone()
    boxes[:, 2:] -= boxes[:, :2]
    for score, label, box, mask in zip(
        instances.scores.tolist(), instances.pred_classes.tolist(), boxes.tolist(), instances.pred_masks.numpy()
    ):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        category_id, category_name = terms.category(label)
        records.append(
            {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": box,
                "score": score,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "category_name": category_name,
                "file_name": path,
            }
        )
    return records


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config-file", required=True, help="the config the weights were trained with")
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, help="folder for the drawings")
    parser.add_argument("--json", default=None, help="also write the instances of all images (COCO results format)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="instances scored below are left out")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: MODEL.DEVICE of the config)")
    parser.add_argument(
        "--allow-random-weights", action="store_true", help="run without MODEL.WEIGHTS (an untrained model)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS model.pth")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    cfg = setup_cfg(args)
    paths = expand_inputs(args.input)
    model = load_model(cfg, args.allow_random_weights)
    terms = DatasetTerms(cfg)
    os.makedirs(args.output, exist_ok=True)

    records, failures = [], []
    drawn = kept = below = 0
    best_below = 0.0
    for number, (path, name) in enumerate(tqdm.tqdm(list(zip(paths, output_names(paths))), desc="demo", unit="image")):
        try:
            image = read_image_rgb(path)
        except ImageReadError as error:
            failures.append(str(error))
            tqdm.tqdm.write(f"skipped: {error}")
            continue
        instances = predict(model, cfg, image)
        keep = instances.scores >= args.confidence_threshold
        below += int((~keep).sum())
        if (~keep).any():
            best_below = max(best_below, float(instances.scores[~keep].max()))
        instances = instances[keep]
        kept += len(instances)
        Image.fromarray(draw_predictions(image, instances, terms.metadata)).save(os.path.join(args.output, name))
        drawn += 1
        records += coco_results(instances, path, terms.image_id(path, number + 1), terms)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(records, handle)
    print(
        f"{len(paths)} image(s) given, {drawn} drawn into {args.output}: {kept} instance(s) scored >= "
        f"{args.confidence_threshold}" + (f", written to {args.json}" if args.json else "")
    )
    if args.json and terms.note:
        print(f"  ({terms.note})")
    if kept == 0 and drawn:
        print(
            f"No instance reached --confidence-threshold {args.confidence_threshold}: {below} prediction(s) fell "
            f"below it (the highest scored {best_below:.3f}); lower it, e.g. --confidence-threshold "
            f"{max(0.0, round(best_below - 0.005, 2))}"
        )
    if failures:
        print(f"{len(failures)} image(s) could not be read:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
