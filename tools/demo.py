#!/usr/bin/env python
"""Runs a trained DI-MaskDINO on images and draws the results with detectron2's Visualizer.

    python tools/demo.py --config-file configs/quick_start.yaml --input datasets/synthetic/val \\
        --output output/demo --json output/demo/instances.json MODEL.WEIGHTS output/quick_start/model_final.pth

--input takes image files, folders and glob patterns. Every input image gives
OUTPUT/<name>.jpg; --json writes all instances (score, class, box xyxy, RLE mask).
Unreadable images are reported by name and skipped; the exit status is then 1.
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

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from di_maskdino.d2 import ImageReadError, load_config, read_image_rgb  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(patterns):
    """Files, folders (their images, sorted) and glob patterns -> list of paths."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            paths += sorted(
                os.path.join(pattern, f) for f in os.listdir(pattern) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise SystemExit(f"--input {pattern}: no such file, folder or matching image")
            paths += matches
    return paths


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    if args.device:
        cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, help="folder for the visualised images")
    parser.add_argument("--json", help="also write the instances of all images to this JSON file")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--device", help="cpu or cuda (default: MODEL.DEVICE of the config)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS model.pth")
    args = parser.parse_args()

    cfg = setup_cfg(args)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    os.makedirs(args.output, exist_ok=True)

    records, failures = [], []
    for path in tqdm.tqdm(expand_inputs(args.input), desc="demo", unit="image"):
        try:
            image = read_image_rgb(path)
        except ImageReadError as error:
            failures.append(str(error))
            tqdm.tqdm.write(f"skipped: {error}")
            continue
        height, width = image.shape[:2]
        resized = resize.get_transform(image).apply_image(image)
        model_input = resized[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else resized
        tensor = torch.as_tensor(np.ascontiguousarray(model_input.transpose(2, 0, 1)))
        with torch.no_grad():
            instances = model([{"image": tensor, "height": height, "width": width}])[0]["instances"].to("cpu")
        instances = instances[instances.scores >= args.confidence_threshold]
        drawing = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE).draw_instance_predictions(instances)
        name = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(drawing.get_image()).save(os.path.join(args.output, f"{name}.jpg"))
        for score, label, box, mask in zip(
            instances.scores.tolist(),
            instances.pred_classes.tolist(),
            instances.pred_boxes.tensor.tolist(),
            instances.pred_masks.numpy(),
        ):
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            records.append(
                {
                    "file_name": path,
                    "score": score,
                    "category_id": label,
                    "bbox_xyxy": box,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(records, handle)
    print(f"{len(records)} instances drawn into {args.output}" + (f", written to {args.json}" if args.json else ""))
    if failures:
        print(f"{len(failures)} image(s) could not be read:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
