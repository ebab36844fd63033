"""Panoptic and semantic inference from the same queries as instance inference
(MaskDINO / Mask2Former's universal inference; model core, no detectron2).

Every query of the final layer (or of any layer with masks) carries class logits and a mask.

Semantic inference gives per-pixel class scores: S[k, p] = sum_n c[n, k] * sigmoid(m[n, p]),
with c the class probabilities of query n.

Panoptic inference keeps the queries whose best class probability exceeds
`object_mask_threshold`, gives every pixel to the kept query with the largest
score * mask probability, and turns each kept query into a segment if it wins at least
`overlap_threshold` of its own mask (probability >= 0.5); a segment holds the pixels it won
inside its own mask. Queries of a stuff class that already has a segment add their pixels to
that segment (one segment per stuff class), things give one segment per query. Segment ids
are 1, 2, ... in query order; 0 is void.

NOTE: the class probabilities are sigmoid scores (the model is trained with a focal loss,
no "no object" class). Like MaskDINO's release, they are sharpened with a softmax over
classes at a temperature T, softmax(sigmoid(logits) / T), before they weight the masks
(T = 0.06 in the release; `temperature=None` uses the sigmoid scores as they are). The
threshold on kept queries always reads the unsharpened sigmoid scores, as in the release.

Shape glossary: N queries, K classes, h x w mask-logit resolution (1/4 of the padded
input), H x W output resolution (the original image).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from .outputs import Predictions
from .postprocess import Detections, instance_inference

__all__ = [
    "Segment",
    "PanopticSegmentation",
    "SegmentationResult",
    "SegmentationInference",
    "resize_mask_logits",
    "class_probabilities",
    "semantic_inference",
    "panoptic_inference",
    "thing_detections",
    "predict_segmentation",
]


@dataclass
class Segment:
    """One segment of a panoptic segmentation: its id in the id map, class, thing or stuff."""

    id: int
    category_id: int
    isthing: bool


@dataclass
class PanopticSegmentation:
    """ids: (H, W) int32, the segment id of every pixel (0 = void); segments: one entry per
    id present in `ids`, in increasing id order."""

    ids: torch.Tensor
    segments: List[Segment]


@dataclass
class SegmentationResult:
    """The outputs of one image; each is None when its task is off.

    instances: thing detections (see `thing_detections`); panoptic: the panoptic
    segmentation; semantic: (K, H, W) per-pixel class scores."""

    instances: Optional[Detections] = None
    panoptic: Optional[PanopticSegmentation] = None
    semantic: Optional[torch.Tensor] = None


def resize_mask_logits(
    mask_logits: torch.Tensor, image_size: Tuple[int, int], padded_size: Tuple[int, int], output_size: Tuple[int, int]
) -> torch.Tensor:
    """(N, h, w) mask logits of the padded input -> (N, H, W) at `output_size`: upsampled to
    the padded input, cropped to the image, resized to the output (bilinear; the same steps
    as instance inference)."""
    if mask_logits.shape[0] == 0:  # nothing kept (interpolate refuses empty batches of maps)
        return mask_logits.new_zeros((0, *output_size), dtype=torch.float32)
    masks = F.interpolate(mask_logits[None].float(), size=padded_size, mode="bilinear", align_corners=False)
    masks = masks[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(masks, size=output_size, mode="bilinear", align_corners=False)[0]


def class_probabilities(logits: torch.Tensor, temperature: Optional[float] = None) -> torch.Tensor:
    """(N, K) logits -> (N, K) sigmoid scores, sharpened to softmax(sigmoid / T) over the
    classes when a temperature T is given."""
    probabilities = logits.float().sigmoid()
    if temperature is not None:
        probabilities = F.softmax(probabilities / temperature, dim=-1)
    return probabilities


def semantic_inference(
    logits: torch.Tensor, mask_logits: torch.Tensor, temperature: Optional[float] = None
) -> torch.Tensor:
    """(N, K) class logits, (N, H, W) mask logits -> (K, H, W) per-pixel class scores
    sum_n c[n, k] * sigmoid(m[n])."""
    return torch.einsum("nk,nhw->khw", class_probabilities(logits, temperature), mask_logits.float().sigmoid())


def panoptic_inference(
    logits: torch.Tensor,
    mask_logits: torch.Tensor,
    is_thing: torch.Tensor,
    object_mask_threshold: float = 0.25,
    overlap_threshold: float = 0.8,
    temperature: Optional[float] = None,
    mask_threshold: float = 0.5,
) -> PanopticSegmentation:
    """
    Args:
        logits: (N, K) class logits; mask_logits: (N, H, W) at the output resolution.
        is_thing: (K,) bool, which classes are things (the others are stuff).
        object_mask_threshold: queries whose best sigmoid class score is not above it are dropped.
        overlap_threshold: a kept query becomes a segment only if it wins at least this
            fraction of its own mask.
        temperature: softmax sharpening of the class scores that weight the masks (None: off).
        mask_threshold: a query's own mask is where its mask probability is >= this.
    """
    height, width = mask_logits.shape[-2:]
    ids = torch.zeros((height, width), dtype=torch.int32, device=mask_logits.device)
    scores, labels = logits.float().sigmoid().max(-1)
    keep = scores > object_mask_threshold
    if temperature is not None:
        scores = class_probabilities(logits, temperature).max(-1).values
    scores, labels = scores[keep], labels[keep]
    masks = mask_logits[keep].float().sigmoid()
    segments: List[Segment] = []
    if masks.shape[0] == 0:
        return PanopticSegmentation(ids, segments)
    # every pixel goes to the kept query with the largest score * mask probability (first on ties)
    owner = (scores[:, None, None] * masks).argmax(0)
    stuff_segment: Dict[int, int] = {}
    for k in range(masks.shape[0]):
        category = int(labels[k])
        won = owner == k
        own = masks[k] >= mask_threshold
        region = won & own
        won_area, own_area = int(won.sum()), int(own.sum())
        if won_area == 0 or own_area == 0 or not bool(region.any()):
            continue
        # NOTE: as in MaskDINO / Mask2Former, the ratio compares all pixels the query won
        # (also those below the mask threshold) with its own mask.
        if won_area / own_area < overlap_threshold:
            continue
        thing = bool(is_thing[category])
        if not thing and category in stuff_segment:
            ids[region] = stuff_segment[category]
            continue
        segment_id = len(segments) + 1
        if not thing:
            stuff_segment[category] = segment_id
        ids[region] = segment_id
        segments.append(Segment(segment_id, category, thing))
    return PanopticSegmentation(ids, segments)


def thing_detections(detections: Detections, is_thing: torch.Tensor) -> Detections:
    """The detections whose class is a thing (instance results of a panoptic model: a stuff
    class has no instances)."""
    return detections.subset(is_thing.to(detections.labels.device)[detections.labels])


@dataclass
class SegmentationInference:
    """Which outputs inference makes, and the settings of panoptic and semantic inference.

    is_thing: (K,) bool, the thing classes; with stuff classes present, instance results
    keep things only (as MaskDINO's release does for panoptic models).
    instance, panoptic, semantic: the tasks to run (any combination).
    object_mask_threshold, overlap_threshold, temperature: see `panoptic_inference`
    (temperature also sharpens the semantic scores).
    topk: (query, class) pairs kept by instance inference.
    """

    is_thing: torch.Tensor
    instance: bool = True
    panoptic: bool = False
    semantic: bool = False
    object_mask_threshold: float = 0.25
    overlap_threshold: float = 0.8
    temperature: Optional[float] = 0.06
    topk: int = 100

    def __post_init__(self):
        self.is_thing = torch.as_tensor(self.is_thing, dtype=torch.bool)
        if self.is_thing.dim() != 1 or self.is_thing.numel() == 0:
            raise ValueError(
                f"SegmentationInference: is_thing must be a (K,) bool vector, got {tuple(self.is_thing.shape)}"
            )
        if not (self.instance or self.panoptic or self.semantic):
            raise ValueError("SegmentationInference: turn on at least one of instance, panoptic and semantic inference")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"SegmentationInference: the temperature must be positive or None, got {self.temperature}")

    @property
    def has_stuff(self) -> bool:
        return not bool(self.is_thing.all())

    def __call__(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        mask_logits: torch.Tensor,
        image_size: Tuple[int, int],
        padded_size: Tuple[int, int],
        output_size: Tuple[int, int],
    ) -> SegmentationResult:
        """The outputs of one image from its (N, K) logits, (N, 4) boxes (normalised cxcywh
        of the padded input) and (N, h, w) mask logits; sizes as in `resize_mask_logits`."""
        result = self.segmentation(logits, mask_logits, image_size, padded_size, output_size)
        if self.instance:
            found = instance_inference(logits, boxes, mask_logits, image_size, padded_size, output_size, self.topk)
            result.instances = thing_detections(found, self.is_thing) if self.has_stuff else found
        return result

    def segmentation(
        self,
        logits: torch.Tensor,
        mask_logits: torch.Tensor,
        image_size: Tuple[int, int],
        padded_size: Tuple[int, int],
        output_size: Tuple[int, int],
    ) -> SegmentationResult:
        """The panoptic and semantic outputs of one image (no instances)."""
        if logits.shape[-1] != self.is_thing.numel():
            raise ValueError(
                f"SegmentationInference: the model predicts {logits.shape[-1]} classes but is_thing describes "
                f"{self.is_thing.numel()}"
            )
        result = SegmentationResult()
        if self.panoptic:
            # only the queries that can pass the threshold are resized
            keep = logits.float().sigmoid().max(-1).values > self.object_mask_threshold
            resized = resize_mask_logits(mask_logits[keep], image_size, padded_size, output_size)
            result.panoptic = panoptic_inference(
                logits[keep],
                resized,
                self.is_thing.to(logits.device),
                self.object_mask_threshold,
                self.overlap_threshold,
                self.temperature,
            )
        if self.semantic:
            resized = resize_mask_logits(mask_logits, image_size, padded_size, output_size)
            result.semantic = semantic_inference(logits, resized, self.temperature)
        return result

    def images(
        self,
        prediction: Predictions,
        image_sizes: Sequence[Tuple[int, int]],
        padded_size: Tuple[int, int],
        output_sizes: Sequence[Tuple[int, int]],
    ) -> List[SegmentationResult]:
        """The outputs of every image of one output of the model (it must have masks)."""
        if prediction.masks is None:
            raise ValueError("SegmentationInference needs an output with masks (box-only outputs have none)")
        return [
            self(
                prediction.logits[i],
                prediction.boxes[i],
                prediction.masks[i],
                tuple(image_sizes[i]),
                tuple(padded_size),
                tuple(output_sizes[i]),
            )
            for i in range(prediction.logits.shape[0])
        ]


@torch.no_grad()
def predict_segmentation(
    model, images: Sequence[torch.Tensor], inference: SegmentationInference, output_sizes=None
) -> List[SegmentationResult]:
    """Instance, panoptic and semantic outputs of a `DIMaskDINO` for (3, H_i, W_i) images, at
    `output_sizes` (default: the input sizes)."""
    batch, sizes = model.preprocess(images)
    output_sizes = sizes if output_sizes is None else output_sizes
    padded_size = tuple(batch.shape[-2:])
    prediction = model.canvas_frame(model.run(batch, image_sizes=sizes).final, sizes, padded_size)
    return inference.images(prediction, sizes, padded_size, output_sizes)
