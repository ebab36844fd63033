#!/usr/bin/env python
"""How long the stage explorer (tools/explorer.py) takes to answer, against the model's own
inference on the same image.

    python dev/benchmark_explorer.py --config-file configs/coco/dimaskdino_r50_12ep.yaml --input-size 800x1333
    python dev/benchmark_explorer.py --config-file configs/quick_start.yaml --input-size 128x128

Alternating, --repeats times after --warmup runs, on one random image of --input-size (the
model's test-time size, so that no resizing happens) and the config's model (random weights
unless --weights names a checkpoint):
  inference    the `Predictor` of the model (`Predictor.from_model`): what `tools/demo.py` runs
  new image    what the explorer does before it answers a new image: every stage of the
               model from one forward pass (`di_maskdino.stages.stage_predictor`) and the view
               of one stage (the drawing and the instance table)
  slider move  the view of the decoder layer before the last, not drawn ahead: its
               post-processing (the masks pasted at the image's size) and drawing (the app
               draws the other stages in the background after answering, so that a slider
               move usually finds its view drawn)
Prints the medians and the ratio new image / inference. The browser's response times (the
app's server and page included) are printed by `tests/tools/test_explorer.py`'s browser test
(`python -m pytest -s tests/tools/test_explorer.py -k browser`).
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

import numpy as np
import torch

import di_maskdino.d2  # noqa: F401 - first: detectron2 imported quietly (di_maskdino/dependencies.py)

# isort: split
from detectron2.modeling import build_model

from di_maskdino.cpu_inference import CPUInference
from di_maskdino.d2 import Checkpointer, ConfigArgumentParser, load_config
from di_maskdino.d2.engine import TOOL_DEFAULTS
from di_maskdino.d2.modeling import class_names
from di_maskdino.predictor import Predictor
from di_maskdino.stages import stage_predictor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def explorer_module():
    """tools/explorer.py, loaded from its file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("explorer", os.path.join(ROOT, "tools", "explorer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = ConfigArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input-size", default="800x1333", help="HxW of the image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--weights", help="a checkpoint of the model (default: random weights)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.input_size.lower().split("x"))
    cfg = load_config(args.config_file, list(TOOL_DEFAULTS) + ["MODEL.DEVICE", "cpu"] + args.opts)
    cfg.freeze()
    model = build_model(cfg).eval()
    if args.weights:
        Checkpointer.for_evaluation(model, cfg).load(args.weights)
    cpu = CPUInference() if cfg.TEST.CPU_SPEEDUPS else None
    if cpu is not None:
        cpu.apply_process_settings()
    settings = dict(model_format=cfg.INPUT.FORMAT, max_detections=cfg.TEST.DETECTIONS_PER_IMAGE, cpu_inference=cpu)
    inference = Predictor.from_model(model, **settings)
    stages = stage_predictor(model, **settings)
    tool = explorer_module()
    entry = tool.ExplorerModel("model", lambda image: stages([image])[0], class_names(cfg), model)
    explorer = tool.Explorer([entry], {})
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)

    def answer_new_image():
        analysis = explorer.analyse(image, "random")
        explorer.view(analysis, len(analysis.stages[0]) - 1, 0.3, [], "boxes and masks")
        return analysis

    analysis = answer_new_image()
    count = len(analysis.stages[0])
    times = {"inference": [], "new image": [], "slider move": []}
    for run in range(args.warmup + args.repeats):
        start = time.perf_counter()
        inference([image])
        inferred = time.perf_counter() - start
        start = time.perf_counter()
        analysis = answer_new_image()
        answered = time.perf_counter() - start
        start = time.perf_counter()
        explorer.view(analysis, count - 2, 0.3, [], "boxes and masks")
        moved = time.perf_counter() - start
        if run >= args.warmup:
            times["inference"].append(inferred)
            times["new image"].append(answered)
            times["slider move"].append(moved)
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.config_file}, {height} x {width}, {count} stages, {torch.get_num_threads()} threads")
    for name, values in times.items():
        runs = ", ".join(f"{1000 * v:.0f}" for v in values)
        print(f"  {name:12s} median {1000 * medians[name]:8.1f} ms   ({runs})")
    print(f"  new image / inference: {medians['new image'] / medians['inference']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
