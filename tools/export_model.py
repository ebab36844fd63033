#!/usr/bin/env python
"""Exports a trained DI-MaskDINO for deployment.

    python tools/export_model.py --config-file configs/quick_start.yaml --output output/export \\
        --formats export aoti onnx MODEL.WEIGHTS output/quick_start/model_final.pth

Writes into --output:
  model.pt2        torch.export program (torch.export.load; our deformable-attention operator)
  model_aoti.pt2   AOTInductor package (torch._inductor.aoti_load_package)
  model.onnx       ONNX, opset 17+, deformable attention in standard operators (onnxruntime)
  model_trt.onnx   with --onnx-trt-plugin: one MultiscaleDeformableAttnPlugin_TRT node per
                   deformable attention, for TensorRT's plugin of that name

Input "images": (B, 3, H, W) float32, normalised and padded to multiples of the size
divisibility (dynamic B, H, W up to --max-image-size); outputs "scores", "labels", "boxes"
(normalised cxcywh of the padded input) and "mask_logits" (1/4 resolution) of the
TEST.DETECTIONS_PER_IMAGE best (query, class) pairs per image. A model with the padding mask
(MODEL.DI_MASKDINO.PADDING_MASK) takes a second input, "image_sizes": (B, 2) int64, each
image's (h, w) before padding. The metadata (normalisation,
input format, test-time resizing, class names) is stored in each file;
`di_maskdino.Predictor.from_exported(PATH)` runs any of them with the eager model's
pre- and post-processing. With --verify every file is run next to the eager model on two
image sizes and the largest differences are printed.
"""

import argparse
import os
import sys
import time

import torch

import di_maskdino.d2  # noqa: F401 - first: detectron2 imported quietly (di_maskdino/dependencies.py)

# isort: split
from detectron2.modeling import build_model

from di_maskdino.d2 import (
    Checkpointer,
    CheckpointError,
    ConfigArgumentParser,
    MissingWeightsError,
    check_weights,
    load_config,
)
from di_maskdino.d2.modeling import class_names
from di_maskdino.export import (
    ExportedDetector,
    compile_aoti,
    decompose_deformable_attention,
    export_onnx,
    export_program,
    metadata_for,
    save_program,
)

FORMATS = ("export", "aoti", "onnx")
FILE_NAMES = {"export": "model.pt2", "aoti": "model_aoti.pt2", "onnx": "model.onnx", "trt": "model_trt.onnx"}


def parse_args():
    parser = ConfigArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="folder for the exported files")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--onnx-trt-plugin", action="store_true", help="also write model_trt.onnx")
    parser.add_argument(
        "--deformable-attention",
        choices=("kernel", "decomposed"),
        default="kernel",
        help="in model.pt2 / model_aoti.pt2: our operator (needs di_maskdino/_C*.so at run time) or standard "
        "operators (needs nothing); ONNX is always decomposed",
    )
    parser.add_argument("--max-image-size", type=int, default=2048, help="largest padded height / width")
    parser.add_argument(
        "--opset",
        type=int,
        default=18,
        help="ONNX opset, 17 or later (torch's exporter writes 18 and converts down, which can fail)",
    )
    parser.add_argument(
        "--onnx-optimize",
        action="store_true",
        help="run onnxscript's graph optimizer on the ONNX files (slow: minutes; onnxruntime optimizes anyway)",
    )
    parser.add_argument("--verify", action="store_true", help="run every file next to the eager model")
    parser.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="export without MODEL.WEIGHTS (an untrained model; for testing the export itself)",
    )
    return parser.parse_args()


def verify(model, path, size_divisibility):
    """Largest differences of the exported model's raw outputs from the eager model's on a
    batch of two images of different sizes and on one image of a third size."""
    detector = ExportedDetector(path)
    generator = torch.Generator().manual_seed(0)
    batches = [
        [torch.rand(3, 200, 300, generator=generator) * 255, torch.rand(3, 260, 180, generator=generator) * 255],
        [torch.rand(3, 330, 410, generator=generator) * 255],
    ]
    for images in batches:
        batch, sizes = model.preprocess(images)
        image_sizes = torch.tensor(sizes, dtype=torch.long)
        with torch.no_grad():
            expected = model.detect(batch, image_sizes).as_tuple()
        actual = detector(batch, image_sizes).as_tuple()
        names = ("scores", "labels", "boxes", "mask_logits")
        diffs = ", ".join(
            f"{n} {(a.float() - e.float()).abs().max().item():.2e}" for n, a, e in zip(names, actual, expected)
        )
        print(f"  {os.path.basename(path)} batch {tuple(batch.shape)}: max |diff| {diffs}")


def main() -> int:
    args = parse_args()
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    try:
        weighted = check_weights(
            cfg.MODEL.WEIGHTS,
            purpose="the export",
            allow_random=args.allow_random_weights,
            how_to_allow="--allow-random-weights",
        )
        model = build_model(cfg).eval()
        if weighted:
            Checkpointer.for_evaluation(model, cfg).load(cfg.MODEL.WEIGHTS)
    except (MissingWeightsError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    names = class_names(cfg)
    os.makedirs(args.output, exist_ok=True)

    def metadata(mode):
        return metadata_for(
            model,
            input_format=cfg.INPUT.FORMAT,
            min_size=cfg.INPUT.MIN_SIZE_TEST,
            max_size=cfg.INPUT.MAX_SIZE_TEST,
            class_names=names,
            deformable_attention=mode,
            max_image_size=args.max_image_size,
        )

    try:
        metadata("kernel")  # a model that cannot be exported faithfully is refused before exporting
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    sizes = {"max_image_size": args.max_image_size}
    program = export_program(model, **sizes)
    print(f"torch.export: {time.perf_counter() - start:.0f} s")
    torch_program = program if args.deformable_attention == "kernel" else decompose_deformable_attention(program)
    written = []
    # in FORMATS order whatever the command line's: AOTInductor before ONNX (see export_onnx)
    for kind in [k for k in FORMATS if k in args.formats] + (["trt"] if args.onnx_trt_plugin else []):
        path = os.path.join(args.output, FILE_NAMES[kind])
        start = time.perf_counter()
        if kind == "export":
            save_program(torch_program, path, metadata(args.deformable_attention))
        elif kind == "aoti":
            compile_aoti(torch_program, path, metadata(args.deformable_attention))
        elif kind == "onnx":
            # every ONNX file from a program of its own (an ONNX export leaves its program
            # untraceable, see export_onnx)
            export_onnx(
                export_program(model, **sizes),
                path,
                metadata("decomposed"),
                opset=args.opset,
                optimize=args.onnx_optimize,
            )
        else:
            export_onnx(
                export_program(model, **sizes),
                path,
                metadata("trt_plugin"),
                trt_plugin=True,
                opset=args.opset,
                optimize=args.onnx_optimize,
            )
        print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, {time.perf_counter() - start:.0f} s)")
        written.append((kind, path))
    if args.verify:
        print("verification against the eager model:")
        for kind, path in written:
            if kind != "trt":  # only TensorRT runs the plugin node
                verify(model, path, cfg.MODEL.DI_MASKDINO.SIZE_DIVISIBILITY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
