#!/usr/bin/env python
"""Runs a trained DI-MaskDINO on images and draws the results with detectron2's Visualizer.

    python tools/demo.py --config-file configs/quick_start.yaml --input datasets/synthetic/val \\
        --output output/demo --json output/demo/instances.json MODEL.WEIGHTS output/quick_start/model_final.pth
    python tools/demo.py --exported output/export/model.onnx --config-file configs/quick_start.yaml \\
        --input datasets/synthetic/val --output output/demo_onnx

The predictions come from `di_maskdino.Predictor`: the config's model with MODEL.WEIGHTS
(refined masks for a model with a box mask head; things for a panoptic model), or with
--exported, a file written by tools/export_model.py (torch.export archive, AOTInductor
package or ONNX model), whose input convention is stored in it; the config then only
names the dataset (ids and class names) and may be left out.

--input takes image files, folders and glob patterns. Every input image gives one drawing
in OUTPUT (<name>.jpg; inputs sharing a name, such as a.jpg and a.png, get distinct
names). --json writes the instances in the COCO results format (image_id, category_id of
the dataset, bbox [x, y, w, h], score, RLE segmentation) with the class name and file name;
pycocotools' COCO.loadRes reads it. Unreadable images are reported by name and skipped;
the exit status is then 1. Without CUDA the demo runs on the CPU and says so.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import tqdm

import di_maskdino.d2  # noqa: F401 - first: detectron2 imported quietly (di_maskdino/dependencies.py)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from PIL import Image
from pycocotools import mask as mask_util

from di_maskdino import Predictor
from di_maskdino.cpu_inference import CPUInference
from di_maskdino.d2 import (
    CheckpointError,
    ConfigArgumentParser,
    MissingWeightsError,
    build_predictor,
    detections_to_instances,
    load_config,
    use_available_device,
)
from di_maskdino.d2.engine import TOOL_DEFAULTS
from di_maskdino.d2.modeling import labels_index_every_class
from di_maskdino.d2.visualizer import draw_predictions
from di_maskdino.images import ImageReadError, image_paths, read_image_rgb


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


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
    """The config (None when --exported runs without one), on the CPU when CUDA is absent."""
    if args.config_file is None:
        return None
    cfg = load_config(args.config_file, list(TOOL_DEFAULTS) + args.opts)
    if args.device:
        cfg.MODEL.DEVICE = args.device
    note = use_available_device(cfg)
    if note:
        print(note)
    cfg.freeze()
    return cfg


def make_predictor(args, cfg) -> Predictor:
    """The Predictor of the exported file, or of the config's model with MODEL.WEIGHTS (which
    must fill it). Every prediction is kept (score_threshold 0): the demo filters them, to
    say how many fell under --confidence-threshold."""
    if args.exported:
        if not os.path.isfile(args.exported):
            raise SystemExit(f"--exported {args.exported}: no such file (write one with tools/export_model.py)")
        if cfg is not None:
            device = cfg.MODEL.DEVICE  # --device, else the config's; the CPU when CUDA is absent (said above)
        else:
            device = args.device or "cpu"
            if device.startswith("cuda") and not torch.cuda.is_available():
                print(f"CUDA is not available: running on the CPU (--device {device} -> cpu)")
                device = "cpu"
        try:
            return Predictor.from_exported(
                args.exported, device=device, input_format="RGB", convert=detections_to_instances
            )
        except (ValueError, RuntimeError, ImportError, OSError) as error:
            raise SystemExit(f"--exported {args.exported}: {error}") from error
    try:
        return build_predictor(
            cfg,
            allow_random_weights=args.allow_random_weights,
            purpose="the demo",
            how_to_allow="--allow-random-weights",
            input_format="RGB",
        )
    except (MissingWeightsError, CheckpointError) as error:
        raise SystemExit(str(error)) from error


class DatasetTerms:
    """Class names, dataset category ids and image ids of the config's first test dataset
    (DATASETS.TEST[0]) when it is registered and readable; otherwise the predictor's class
    names (those stored in an exported file), the model's 0-based class indices and image
    ids numbered from 1 in input order. Labels index the things ("thing_classes") of an
    instance model and every class ("stuff_classes") of a panoptic / semantic one."""

    def __init__(self, cfg, predictor: Predictor):
        self.name = cfg.DATASETS.TEST[0] if cfg is not None and cfg.DATASETS.TEST else None
        dataset = MetadataCatalog.get(self.name or "__demo")
        self.image_ids = {}
        self.note = ""
        if self.name and self.name in DatasetCatalog.list():
            try:
                for record in DatasetCatalog.get(self.name):  # also fills the category id mapping
                    self.image_ids[os.path.basename(record["file_name"])] = record["image_id"]
            except Exception as error:  # noqa: BLE001 - the demo works without the dataset
                self.note = f"dataset {self.name!r} not readable here ({str(error).splitlines()[0]})"
        prefix = "stuff" if cfg is not None and labels_index_every_class(cfg) else "thing"
        # a panoptic dataset's stuff map holds every class (ours) or the stuff only (detectron2's
        # COCO and Cityscapes), its thing map the things: together, every label
        to_dataset = dict(dataset.get("stuff_dataset_id_to_contiguous_id", None) or {}) if prefix == "stuff" else {}
        to_dataset.update(dataset.get("thing_dataset_id_to_contiguous_id", None) or {})
        self.category_ids = {v: k for k, v in to_dataset.items()} if to_dataset else None
        if self.category_ids is None:
            self.note = (self.note + "; " if self.note else "") + "category_id is the model's 0-based class index"
        self.classes = list(dataset.get(f"{prefix}_classes", None) or predictor.class_names) or None
        # what the Visualizer reads: the names (and colours) of the labels
        drawing = {"thing_classes": self.classes} if self.classes else {}
        colors = dataset.get(f"{prefix}_colors", None)
        if colors:
            drawing["thing_colors"] = colors
        self.metadata = Metadata(name=self.name or "__demo", **drawing)

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
    masks = instances.pred_masks.numpy() if instances.has("pred_masks") else [None] * len(instances)
    for score, label, box, mask in zip(
        instances.scores.tolist(), instances.pred_classes.tolist(), boxes.tolist(), masks
    ):
        category_id, category_name = terms.category(label)
        record = {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}
        if mask is not None:  # a detection-only model gives boxes
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        records.append({**record, "category_name": category_name, "file_name": path})
    return records


def parse_args():
    parser = ConfigArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--config-file",
        default=None,
        help="the config the weights were trained with (required unless --exported; with it, the dataset's terms)",
    )
    parser.add_argument(
        "--exported", default=None, help="run this exported model (tools/export_model.py) instead of MODEL.WEIGHTS"
    )
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, help="folder for the drawings")
    parser.add_argument("--json", default=None, help="also write the instances of all images (COCO results format)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="instances scored below are left out")
    parser.add_argument(
        "--device", default=None, help="cpu or cuda (default: the config's MODEL.DEVICE; cpu for --exported alone)"
    )
    parser.add_argument(
        "--allow-random-weights", action="store_true", help="run without MODEL.WEIGHTS (an untrained model)"
    )
    args = parser.parse_args()
    if args.config_file is None and args.exported is None:
        parser.error("give --config-file (the model of MODEL.WEIGHTS) or --exported (an exported model)")
    if args.config_file is None and args.opts:
        parser.error(f"config overrides ({' '.join(args.opts)}) need --config-file")
    return args


def main() -> int:
    args = parse_args()
    cfg = setup_cfg(args)
    try:
        paths = image_paths(args.input)
    except ValueError as error:
        raise SystemExit(f"--input {error}") from error
    predictor = make_predictor(args, cfg)
    if predictor.device.type == "cpu" and (cfg is None or cfg.TEST.CPU_SPEEDUPS):
        CPUInference().apply_process_settings()  # one forward after another: reuse their memory
    terms = DatasetTerms(cfg, predictor)
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
        instances = predictor([image])[0].to("cpu")
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
    if kept == 0 and drawn and below == 0:
        print("The model predicted no instance at all in these images.")
    elif kept == 0 and drawn:
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
