#!/usr/bin/env python
"""An interactive explorer of every prediction stage of DI-MaskDINO (a local Gradio app):
the paper's detection/segmentation imbalance, image by image and instance by instance.

    python tools/explorer.py --config-file configs/quick_start.yaml \\
        --images datasets/synthetic/val MODEL.WEIGHTS output/quick_start/model_final.pth
    python tools/explorer.py --config-file configs/coco/dimaskdino_r50_12ep.yaml --dataset coco_2017_val \\
        --compare-config-file configs/coco/maskdino_r50_12ep.yaml --compare-weights maskdino.pth \\
        MODEL.WEIGHTS dimaskdino.pth

Choose an image (an upload, one of --images, or one of --dataset's images, whose ground truth
is then known), then move the slider over the stages: the token-interaction outputs of the DI
module, the initial prediction (layer 0) and every decoder layer, in the order the model
computes them. Each stage's kept detections (score threshold, class filter) are drawn as
boxes, masks or both (or the ground truth is drawn instead), and listed with, per instance,
the IoU of the box with the box of its own mask and, with ground truth, the IoU of box and
mask with the matched object. One forward pass per image and model computes every stage;
moving the slider redraws only.

With --compare-config-file the second model (e.g. MaskDINO) is shown beside the first, stage
by stage where their stages share a name.

The app listens on 127.0.0.1 (this machine only); --host 0.0.0.0 serves the local network
and --share asks Gradio for a public link (that needs internet access). It needs Gradio:
`pip install -r requirements-explorer.txt`.
"""

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

import di_maskdino.d2  # noqa: F401 - first: detectron2 imported quietly (di_maskdino/dependencies.py)

# isort: split
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from di_maskdino.cpu_inference import CPUInference
from di_maskdino.d2 import (
    Checkpointer,
    CheckpointError,
    ConfigArgumentParser,
    ConfigError,
    MissingWeightsError,
    check_weights,
    load_config,
    use_available_device,
)
from di_maskdino.d2.engine import TOOL_DEFAULTS
from di_maskdino.d2.evaluation import ground_truth_of
from di_maskdino.d2.modeling import class_names
from di_maskdino.images import ImageReadError, image_paths, read_image_rgb, resize_image, shortest_edge_size
from di_maskdino.modeling.postprocess import Detections
from di_maskdino.stages import GroundTruth, Stage, draw_detections, match_ground_truth, stage_predictor

# what the drawing shows: the stage's kept detections, or the ground truth (the table lists the
# detections either way)
VIEWS = ("boxes and masks", "boxes", "masks", "ground truth")
TABLE_COLUMNS = ["#", "class", "score", "box vs own mask IoU", "box IoU with GT", "mask IoU with GT"]


@dataclass
class ExplorerModel:
    """A model as the explorer runs it: its stages of an RGB uint8 image (`predict`), the
    names of its classes and the network itself."""

    name: str
    predict: Callable[[np.ndarray], List[Stage]]
    class_names: Sequence[str]
    network: torch.nn.Module
    test_size: Tuple[int, int] = (0, 0)  # INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST; (0, 0): as it is


@dataclass
class Analysis:
    """Everything the views of one image need: the image at the first model's input size (its
    size as given: `original_size`), each model's stages, the ground truth (or None) and the
    time the forward passes took; `views` keeps the views drawn for
    the latest settings (threshold, classes, drawing), so that a slider move finds its stage
    drawn (see `Explorer.prefetch`)."""

    image: np.ndarray
    title: str
    stages: List[List[Stage]]
    ground_truth: Optional[GroundTruth]
    seconds: float
    original_size: Tuple[int, int] = (0, 0)
    views: Dict[tuple, list] = field(default_factory=dict)  # (threshold, classes, mode, stage) -> view
    settings: Optional[tuple] = None  # the latest (threshold, classes, mode) drawn
    lock: threading.Lock = field(default_factory=threading.Lock)  # the app's threads share it


class Explorer:
    """The app's computations, without the user interface: `analyse` runs the models once per
    image, `view` draws a stage of every model and lists its instances."""

    def __init__(self, models: Sequence[ExplorerModel], images: Dict[str, str], ground_truth=None):
        self.models = list(models)
        self.images = images  # name shown -> file path
        self.ground_truth = ground_truth  # name -> GroundTruth, or None where it is not known

    def analyse(self, image: np.ndarray, title: str, ground_truth: Optional[GroundTruth] = None) -> Analysis:
        """Every stage of every model on `image` (RGB uint8), shown at the size the first model
        sees it (test-time resizing), the ground truth scaled to it."""
        start = time.perf_counter()
        original = image.shape[:2]
        size = shortest_edge_size(*original, *self.models[0].test_size)
        if size != original:
            image = resize_image(image, size)
            ground_truth = None if ground_truth is None else _resized_truth(ground_truth, original, size)
        stages = [model.predict(image) for model in self.models]
        return Analysis(image, title, stages, ground_truth, time.perf_counter() - start, original)

    def analyse_named(self, name: str) -> Analysis:
        """One of the listed images (--images, --dataset), with its ground truth when known."""
        image = read_image_rgb(self.images[name])
        truth = self.ground_truth(name, image.shape[:2]) if self.ground_truth is not None else None
        return self.analyse(image, name, truth)

    def view(
        self, analysis: Analysis, stage: int, threshold: float, classes: Sequence[str], mode: str
    ) -> List[Tuple[str, Optional[np.ndarray], List[list]]]:
        """Per model: (the stage's name, the drawing, the table rows) of the first model's
        stage `stage` (the same name in the other models; a model without it: no drawing)."""
        stage = min(stage, len(analysis.stages[0]) - 1)
        key = (threshold, tuple(classes), mode, stage)
        with analysis.lock:
            cached = analysis.views.get(key)
        if cached is None:
            cached = self._view(analysis, stage, threshold, classes, mode)
            with analysis.lock:
                if analysis.settings != key[:3]:  # new settings: keep only the views drawn for them
                    analysis.views = {k: v for k, v in analysis.views.items() if k[:3] == key[:3]}
                    analysis.settings = key[:3]
                analysis.views[key] = cached
        return cached

    def prefetch(self, analysis: Analysis, stage: int, threshold: float, classes: Sequence[str], mode: str) -> None:
        """Draws every stage's view for these settings ahead of the slider, the neighbours of
        `stage` first (the app runs it in the background after answering)."""
        count = len(analysis.stages[0])
        for index in sorted(range(count), key=lambda s: (abs(s - stage), s < stage)):
            with analysis.lock:
                if analysis.settings != (threshold, tuple(classes), mode):
                    return  # the settings changed meanwhile
            self.view(analysis, index, threshold, classes, mode)

    def _view(self, analysis: Analysis, stage: int, threshold: float, classes: Sequence[str], mode: str):
        name = analysis.stages[0][stage].name
        views = []
        for model, stages in zip(self.models, analysis.stages):
            found = next((s for s in stages if s.name == name), None)
            if found is None:
                views.append((f"{model.name}: no stage {name!r}", None, []))
                continue
            detections = found.detections
            keep = detections.scores >= threshold
            if classes:
                wanted = {model.class_names.index(c) for c in classes if c in model.class_names}
                keep &= torch.tensor([int(label) in wanted for label in detections.labels], dtype=torch.bool)
            kept = detections.subset(keep)
            agreement = None if found.box_mask_iou is None else found.box_mask_iou[keep]
            truth = analysis.ground_truth
            match = None if truth is None else match_ground_truth(kept, truth.boxes, truth.classes, truth.masks)
            rows = []
            for i in range(len(kept)):
                label = int(kept.labels[i])
                rows.append(
                    [
                        i + 1,
                        model.class_names[label] if label < len(model.class_names) else str(label),
                        round(float(kept.scores[i]), 3),
                        "" if agreement is None else round(float(agreement[i]), 3),
                        _iou_cell(None if match is None else match.box_iou[i]),
                        _iou_cell(None if match is None else match.mask_iou[i]),
                    ]
                )
            title = f"{model.name}: {name}, {len(kept)} instances"
            if mode == "ground truth":
                drawing = _draw_truth(analysis, model.class_names)
                title += ", drawn: the ground truth" if truth is not None else ", no ground truth to draw"
            else:
                show_boxes, show_masks = mode in ("boxes and masks", "boxes"), mode in ("boxes and masks", "masks")
                drawing = draw_detections(
                    analysis.image, kept, boxes=show_boxes, masks=show_masks, class_names=model.class_names
                )
            views.append((title, drawing, rows))
        return views


def _resized_truth(truth: GroundTruth, original: Tuple[int, int], size: Tuple[int, int]) -> GroundTruth:
    scale = torch.tensor([size[1] / original[1], size[0] / original[0]] * 2)
    masks = truth.masks
    if masks is not None and masks.shape[0]:
        masks = F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5
    elif masks is not None:
        masks = masks.new_zeros((0, *size))
    return GroundTruth(truth.boxes * scale, truth.classes, masks)


def _draw_truth(analysis: Analysis, class_names: Sequence[str]) -> np.ndarray:
    """The image with its ground-truth objects drawn (the plain image when none is known)."""
    truth = analysis.ground_truth
    if truth is None:
        nothing = Detections(torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), None)
        return draw_detections(analysis.image, nothing)
    objects = Detections(torch.ones(len(truth.classes)), truth.classes, truth.boxes, truth.masks)
    return draw_detections(analysis.image, objects, class_names=class_names)


def _iou_cell(value) -> object:
    if value is None or torch.isnan(value):
        return ""
    return round(float(value), 3)


# --- models and images from the command line ---


def load_model(name: str, config_file: str, opts: Sequence[str]) -> Tuple[ExplorerModel, object]:
    """The model a config and its weights describe, as the explorer runs it; SystemExit with
    the reason when the config, the weights or the checkpoint do not fit."""
    try:
        cfg = load_config(config_file, list(TOOL_DEFAULTS) + list(opts))
        note = use_available_device(cfg)
        if note:
            print(note)
        cfg.freeze()
        check_weights(cfg.MODEL.WEIGHTS, purpose="the explorer", how_to_allow="")
        model = build_model(cfg)
        Checkpointer.for_evaluation(model, cfg).load(cfg.MODEL.WEIGHTS)
    except (ConfigError, MissingWeightsError, CheckpointError, FileNotFoundError) as error:
        raise SystemExit(f"{name} ({config_file}): {error}") from error
    cpu = CPUInference() if cfg.MODEL.DEVICE == "cpu" and cfg.TEST.CPU_SPEEDUPS else None
    if cpu is not None:
        cpu.apply_process_settings()
    predictor = stage_predictor(
        model,
        cpu_inference=cpu,
        model_format=cfg.INPUT.FORMAT,
        min_size=cfg.INPUT.MIN_SIZE_TEST,
        max_size=cfg.INPUT.MAX_SIZE_TEST,
        max_detections=cfg.TEST.DETECTIONS_PER_IMAGE,
    )
    test_size = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    return ExplorerModel(name, lambda image: predictor([image])[0], class_names(cfg), model, test_size), cfg


def dataset_images(dataset: str, limit: int):
    """(name -> path, ground truth function) of a registered detectron2 dataset's first
    `limit` images; masks where the annotations have segmentations."""
    try:
        records = DatasetCatalog.get(dataset)[:limit]
    except KeyError as error:
        raise SystemExit(f"--dataset {dataset}: not a registered dataset ({error})") from error
    except (FileNotFoundError, OSError, ValueError) as error:
        raise SystemExit(f"--dataset {dataset}: {error}") from error
    by_name = {}
    for record in records:
        name = os.path.basename(record["file_name"])
        by_name[name if name not in by_name else record["file_name"]] = record

    def ground_truth(name: str, size: Tuple[int, int]) -> Optional[GroundTruth]:
        record = by_name.get(name)
        return None if record is None else ground_truth_of(record, size)

    return {name: record["file_name"] for name, record in by_name.items()}, ground_truth


# --- the user interface ---


def build_app(explorer: Explorer, title: str = "DI-MaskDINO stage explorer"):
    """The Gradio Blocks app of `explorer`."""
    import gradio as gr

    def read_upload(path):
        """An uploaded file -> (analysis, status, the emptied upload box, ready for the next
        file); an unreadable file -> (None, the reason, ...)."""
        return (*_read_upload(path), None)

    def _read_upload(path):
        if path is None:
            return None, "No file."
        name = os.path.basename(path)
        try:
            image = read_image_rgb(path)
        except ImageReadError as error:
            return None, f"**Could not read {name}**: {error}. Upload a JPEG, PNG, BMP, TIFF or WebP image."
        return _analysed(image, name, None)

    def _analysed(image, name, truth):
        try:
            analysis = explorer.analyse(image, name, truth)
        except (RuntimeError, ValueError, MemoryError) as error:
            return None, f"**The model failed on {name}** ({image.shape[1]} x {image.shape[0]}): {error}"
        timing = f"{1000 * analysis.seconds:.0f} ms for {len(explorer.models)} model(s)"
        known = "with ground truth" if truth is not None else "no ground truth"
        size = f"{image.shape[1]} x {image.shape[0]} pixels"
        shown = analysis.image.shape
        if shown[:2] != image.shape[:2]:
            size += f" (shown as the model sees it, {shown[1]} x {shown[0]})"
        return analysis, f"{name}: {size}, {known}; every stage computed in {timing}."

    def pick(name):
        if not name:
            return None, "No image chosen."
        try:
            image = read_image_rgb(explorer.images[name])
        except ImageReadError as error:
            return None, f"**Could not read {name}**: {error}"
        truth = explorer.ground_truth(name, image.shape[:2]) if explorer.ground_truth is not None else None
        return _analysed(image, name, truth)

    def after_analysis(analysis, status, stage, threshold, classes, mode):
        if analysis is None:
            empty = [gr.update(value=None) for _ in explorer.models] + [gr.update(value=[]) for _ in explorer.models]
            return [analysis, status, gr.update(), "", *empty]
        names = [s.name for s in analysis.stages[0]]
        # the slider keeps its position where the new image has that stage (a value sent back
        # unchanged would trigger its change event once more)
        slider = (
            gr.update(maximum=len(names) - 1) if int(stage) < len(names) else gr.update(maximum=len(names) - 1, value=0)
        )
        stage = min(int(stage), len(names) - 1)
        return [analysis, status, slider, *render(analysis, stage, threshold, classes, mode)]

    def render(analysis, stage, threshold, classes, mode):
        if analysis is None:
            return ["", *[None for _ in explorer.models], *[[] for _ in explorer.models]]
        start = time.perf_counter()
        views = explorer.view(analysis, int(stage), float(threshold), classes or [], mode)
        names = [s.name for s in analysis.stages[0]]
        label = f"**Stage {int(stage) + 1} of {len(names)}: {names[min(int(stage), len(names) - 1)]}**"
        label += f" ({1000 * (time.perf_counter() - start):.0f} ms to draw) — " + "; ".join(v[0] for v in views)
        settings = (analysis, int(stage), float(threshold), classes or [], mode)
        threading.Thread(target=explorer.prefetch, args=settings, daemon=True).start()
        return [label, *[v[1] for v in views], *[v[2] for v in views]]

    classes_all = sorted({c for m in explorer.models for c in m.class_names})
    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"## {title}\nStages in the order the model computes them: token interaction (TI), layer 0 "
            "(the initial prediction), the decoder layers."
        )
        analysis = gr.State(None)
        with gr.Row():
            upload = gr.File(label="Upload an image", type="filepath", elem_id="upload")
            listed = gr.Dropdown(
                choices=list(explorer.images), label="or choose one", value=None, elem_id="listed", interactive=True
            )
        status = gr.Markdown("Upload or choose an image.", elem_id="status")
        with gr.Row():
            stage = gr.Slider(0, 1, value=0, step=1, label="stage", elem_id="stage")
            threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="score threshold", elem_id="threshold")
        with gr.Row():
            classes = gr.Dropdown(choices=classes_all, multiselect=True, label="classes (none: all)", elem_id="classes")
            mode = gr.Radio(list(VIEWS), value=VIEWS[0], label="draw", elem_id="mode")
        stage_label = gr.Markdown("", elem_id="stage-label")
        images, tables = [], []
        with gr.Row():
            for index, model in enumerate(explorer.models):
                with gr.Column():
                    images.append(gr.Image(label=model.name, type="numpy", format="png", elem_id=f"drawing-{index}"))
                    tables.append(
                        gr.Dataframe(headers=TABLE_COLUMNS, label=f"{model.name}: instances", elem_id=f"table-{index}")
                    )
        controls = [stage, threshold, classes, mode]
        outputs = [analysis, status, stage, stage_label, *images, *tables]

        def upload_and_show(path, *settings):
            found, message, emptied = read_upload(path)
            return [*after_analysis(found, message, *settings), emptied]

        def pick_and_show(name, *settings):
            return after_analysis(*pick(name), *settings)

        # one event per new image: read, run the models, draw the current stage
        upload.upload(upload_and_show, [upload, *controls], [*outputs, upload])
        listed.input(pick_and_show, [listed, *controls], outputs)
        for control in controls:
            # redraws answer at once: no queue, no progress animation
            control.change(
                render, [analysis, *controls], [stage_label, *images, *tables], queue=False, show_progress="hidden"
            )
    return app


def main() -> int:
    parser = ConfigArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the model's config; its weights: MODEL.WEIGHTS")
    parser.add_argument("--compare-config-file", help="a second model, shown beside the first")
    parser.add_argument("--compare-weights", help="the second model's weights (default: its MODEL.WEIGHTS)")
    parser.add_argument("--images", nargs="+", default=[], help="image files, folders or glob patterns to choose from")
    parser.add_argument("--dataset", help="a registered dataset whose images (with ground truth) to choose from")
    parser.add_argument("--max-images", type=int, default=200, help="at most this many images of --dataset")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the local network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet access)")
    args = parser.parse_args()
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit(
            "the explorer needs Gradio: pip install -r requirements-explorer.txt (or pip install gradio)"
        ) from None

    models = [load_model("model", args.config_file, args.opts)[0]]
    if args.compare_config_file:
        opts = ["MODEL.WEIGHTS", args.compare_weights] if args.compare_weights else []
        models.append(load_model("compared", args.compare_config_file, opts)[0])
    images: Dict[str, str] = {}
    ground_truth = None
    if args.images:
        try:
            images.update({os.path.basename(p): p for p in image_paths(args.images)})
        except ValueError as error:
            raise SystemExit(f"--images {error}") from error
    if args.dataset:
        listed, ground_truth = dataset_images(args.dataset, args.max_images)
        images.update(listed)
    app = build_app(Explorer(models, images, ground_truth))
    print(f"explorer: http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, quiet=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
