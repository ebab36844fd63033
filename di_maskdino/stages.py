"""Every prediction stage of the model on an image, side by side: what the per-instance face
of the paper's detection/segmentation imbalance looks like (the explorer,
`tools/explorer.py`, and the HTML report of `tools/analyze_imbalance.py` draw from here).

    from di_maskdino.stages import stage_predictor
    predictor = stage_predictor(model)               # a DIMaskDINO in memory
    stages = predictor(["a.jpg"])[0]                 # one forward pass for every stage
    for stage in stages:
        print(stage.name, len(stage.detections), stage.box_mask_iou)

The stages, in the order the model computes them: the token-interaction outputs of the DI
module ("TI s.i": DI stage s, token-interaction layer i; boxes only), the initial
prediction ("layer 0") and every decoder layer ("layer 1", ...). Each stage's detections are
those its per-layer AP is computed from (`DIMaskDINO.instances`, the same top-k over query
and class pairs, at the image's original size), before any score threshold.

Per detection, `box_mask_iou` is the IoU of its box with the bounding box of its own mask:
near 1 where box and mask agree, low where one of them lags the other. Against ground truth,
`match_ground_truth` pairs detections with objects one to one.
"""

import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou, masks_to_boxes
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .cpu_inference import CPUInference, speedups_context
from .modeling.outputs import DIMaskDINOOutput, Predictions
from .modeling.postprocess import Detections
from .modeling.segmentation_inference import thing_detections
from .predictor import Predictor

__all__ = [
    "Stage",
    "GroundTruth",
    "GroundTruthMatch",
    "stage_predictor",
    "ordered_stages",
    "mask_boxes",
    "box_mask_iou",
    "match_ground_truth",
    "draw_detections",
]


class Stage:
    """One stage's detections of one image (best first) and, per detection, the IoU of its
    box with its mask's bounding box (None for a box-only stage).

    `detections` is the detections, or a function that computes them on first use (the
    `stage_predictor` defers each stage's post-processing, the masks pasted at the image's
    size, until the stage is looked at; several threads may ask at once)."""

    def __init__(
        self, name: str, detections: Union[Detections, Callable[[], Detections]], has_masks: Optional[bool] = None
    ):
        self.name = name
        if isinstance(detections, Detections):
            self._detections, self._compute = detections, None
            has_masks = detections.masks is not None
        else:
            self._detections, self._compute = None, detections
            if has_masks is None:
                raise ValueError("Stage: give has_masks with a deferred computation")
        self.has_masks = has_masks
        self._box_mask_iou: Optional[torch.Tensor] = None
        self._lock = threading.Lock()

    @property
    def detections(self) -> Detections:
        with self._lock:
            if self._detections is None:
                self._detections, self._compute = self._compute(), None
            return self._detections

    @property
    def box_mask_iou(self) -> Optional[torch.Tensor]:
        if not self.has_masks:
            return None
        if self._box_mask_iou is None:
            self._box_mask_iou = box_mask_iou(self.detections)
        return self._box_mask_iou

    def __repr__(self) -> str:
        state = "computed" if self._detections is not None else "deferred"
        return f"Stage({self.name!r}, {state}, masks={self.has_masks})"


def ordered_stages(output: DIMaskDINOOutput) -> List[Tuple[str, Predictions]]:
    """The model's supervised outputs in the order it computes them: the token-interaction
    outputs, then the initial prediction and the decoder layers."""
    named = output.named()
    return [n for n in named if n[0].startswith("TI")] + [n for n in named if not n[0].startswith("TI")]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(n, H, W) bool masks -> (n, 4) xyxy boxes in pixel edges (a mask covering pixel columns
    3..5 spans x 3 to 6, as a predicted box around it does); (0, 0, 0, 0) for an empty mask."""
    boxes = torch.zeros((masks.shape[0], 4), device=masks.device)
    present = masks.flatten(1).any(dim=1)
    if bool(present.any()):
        # torchvision's boxes end at the last pixel's index: one more is its far edge
        boxes[present] = masks_to_boxes(masks[present]) + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    return boxes


def box_mask_iou(detections: Detections) -> Optional[torch.Tensor]:
    """(n,) IoU of every detection's box with the bounding box of its own mask (0 for an
    empty mask); None when the detections have no masks."""
    if detections.masks is None:
        return None
    boxes = detections.boxes.float()
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0,))
    return box_iou(boxes, mask_boxes(detections.masks).to(boxes.device)).diagonal()


@dataclass
class GroundTruth:
    """The objects of an image at its original size: boxes (m, 4) xyxy, classes (m,) the
    model's class indices, masks (m, H, W) bool or None."""

    boxes: torch.Tensor
    classes: torch.Tensor
    masks: Optional[torch.Tensor] = None


@dataclass
class GroundTruthMatch:
    """Per detection: the index of its ground-truth object (-1: none), the IoU of its box
    with that object's box and of its mask with that object's mask (NaN where unmatched or
    where either has no mask)."""

    index: torch.Tensor
    box_iou: torch.Tensor
    mask_iou: torch.Tensor


def _paired_mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(k, H, W), (k, H, W) bool -> (k,) IoU of a[i] with b[i] (0 where both are empty)."""
    a, b = a.flatten(1), b.flatten(1)
    intersection = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))


def match_ground_truth(
    detections: Detections,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    gt_masks: Optional[torch.Tensor] = None,
) -> GroundTruthMatch:
    """Pairs detections with ground-truth objects of their class, one to one, maximising the
    summed box IoU (scipy's Hungarian assignment); a pair of IoU 0 is no match.

    gt_boxes: (m, 4) xyxy at the image's original size; gt_classes: (m,) the model's class
    indices; gt_masks: (m, H, W) bool, or None."""
    n, m = len(detections), gt_boxes.shape[0]
    index = torch.full((n,), -1, dtype=torch.int64)
    box_values = torch.full((n,), float("nan"))
    mask_values = torch.full((n,), float("nan"))
    if n and m:
        ious = box_iou(detections.boxes.float().cpu(), gt_boxes.float().cpu())
        ious = ious * (detections.labels.cpu()[:, None] == gt_classes.cpu()[None, :])
        rows, columns = linear_sum_assignment(ious.numpy(), maximize=True)
        keep = ious[rows, columns] > 0
        rows, columns = torch.as_tensor(rows)[keep], torch.as_tensor(columns)[keep]
        index[rows] = columns
        box_values[rows] = ious[rows, columns]
        if gt_masks is not None and detections.masks is not None:
            mask_values[rows] = _paired_mask_iou(detections.masks[rows].cpu(), gt_masks[columns].cpu().bool())
    return GroundTruthMatch(index, box_values, mask_values)


class _DeferredBatch:
    """One output's detections of every image of a batch, computed once, on first use."""

    def __init__(self, model, prediction, sizes, padded_size, output_sizes, speedups):
        self._arguments = (prediction, sizes, padded_size, output_sizes)
        self._model, self._speedups = model, speedups
        self._found: Optional[List[Detections]] = None
        self._lock = threading.Lock()

    def detections(self) -> List[Detections]:
        with self._lock:
            if self._found is None:
                prediction, sizes, padded_size, output_sizes = self._arguments
                with torch.inference_mode(), self._speedups((len(sizes), 3, *padded_size)):
                    self._found = self._model.instances(prediction, sizes, padded_size, output_sizes)
                self._arguments = None
            return self._found


def stage_predictor(model, *, cpu_inference: Optional[CPUInference] = None, **kwargs) -> Predictor:
    """A `Predictor` whose result for an image is its list of `Stage`s, every stage from one
    forward pass of `model` (a `DIMaskDINO`, put in evaluation mode); each stage's
    post-processing runs when its detections are first asked for. The input handling (files,
    arrays, resizing) is the `Predictor`'s, and so are its arguments; `score_threshold` and
    `max_detections` apply to every stage. A panoptic model's stages hold its things."""
    model.eval()
    is_thing = model.instance_class_mask()
    device = model.pixel_mean.device

    def speedups(batch_shape):
        return speedups_context(cpu_inference, batch_shape, device)

    def backend(batch: torch.Tensor, image_sizes: torch.Tensor) -> DIMaskDINOOutput:
        with torch.inference_mode(), speedups(batch.shape):
            # every layer's masks as their two factors: a stage's mask logits are made when it is
            # post-processed
            return model.run(batch, all_layer_masks=True, factored_masks=True, image_sizes=image_sizes)

    def postprocess(output, sizes, padded_size, output_sizes, score_threshold, max_detections) -> List[List[Stage]]:
        per_image: List[List[Stage]] = [[] for _ in sizes]
        for name, prediction in ordered_stages(output):
            batch = _DeferredBatch(model, prediction, sizes, padded_size, output_sizes, speedups)
            for image in range(len(sizes)):

                def compute(image=image, batch=batch):
                    found = batch.detections()[image]
                    if is_thing is not None:
                        found = thing_detections(found, is_thing)
                    return found.filtered(score_threshold, max_detections)

                per_image[image].append(Stage(name, compute, has_masks=prediction.has_masks))
        return per_image

    if kwargs.get("convert") is not None or kwargs.get("class_mask") is not None:
        raise ValueError("stage_predictor: the stages are returned as they are; convert and class_mask do not apply")
    kwargs.setdefault("device", device)
    return Predictor(
        backend,
        postprocess=postprocess,
        pixel_mean=model.pixel_mean.flatten().tolist(),
        pixel_std=model.pixel_std.flatten().tolist(),
        size_divisibility=model.size_divisibility,
        **kwargs,
    )


def _class_color(label: int) -> Tuple[int, int, int]:
    """A bright color per class, the same in every drawing (golden-ratio hues)."""
    hue = (label * 0.618033988749895) % 1.0
    sector, fraction = int(hue * 6), hue * 6 - int(hue * 6)
    high, low, rising, falling = 235, 60, int(60 + 175 * fraction), int(235 - 175 * fraction)
    return [
        (high, rising, low),
        (falling, high, low),
        (low, high, rising),
        (low, falling, high),
        (rising, low, high),
        (high, low, falling),
    ][sector % 6]


def draw_detections(
    image: np.ndarray,
    detections: Detections,
    *,
    boxes: bool = True,
    masks: bool = True,
    class_names: Sequence[str] = (),
    min_side: int = 384,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB image with the detections' masks (filled, translucent; the masks of
    a class as one region) and / or boxes (outlined, labelled with class and score) drawn in
    a color per class (torchvision's drawing); images whose
    shorter side is below `min_side` come out enlarged by an integer factor (nearest pixel)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"draw_detections: give an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    scale = max(1, int(np.ceil(min_side / max(1, min(image.shape[:2])))))
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if scale > 1:
        canvas = canvas.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    if len(detections) == 0:
        return canvas.permute(1, 2, 0).numpy()
    labels = detections.labels.tolist()
    colors = [_class_color(label) for label in labels]
    if masks and detections.masks is not None:
        # one mask per class, the union of its instances' masks: the same drawing (a color per
        # class, blended once), at the cost of the classes rather than of the instances
        classes = list(dict.fromkeys(labels))
        label_tensor = detections.labels.cpu()
        drawn = torch.stack([detections.masks.cpu()[label_tensor == c].any(dim=0) for c in classes])
        if scale > 1:
            drawn = drawn.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        canvas = draw_segmentation_masks(canvas, drawn, alpha=0.45, colors=[_class_color(c) for c in classes])
    if boxes:
        names = [class_names[c] if c < len(class_names) else str(c) for c in labels]
        text = [f"{name} {score:.2f}" for name, score in zip(names, detections.scores.tolist())]
        canvas = draw_bounding_boxes(
            canvas, detections.boxes.cpu().float() * scale, labels=text, colors=colors, width=2
        )
    return canvas.permute(1, 2, 0).numpy()
