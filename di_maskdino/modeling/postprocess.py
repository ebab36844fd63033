"""Inference: from the final predictions of one image to scored instances.

The top `topk` (query, class) pairs by sigmoid class score are kept; a pair's mask is its
query's mask logits > 0 at the output resolution; its score is the class score times the
mean mask probability inside that mask; its box is the query's box, clipped to the image.
Outputs without masks (the token-interaction outputs, a detection-only model) give boxes
scored by class alone.

The mask logits (at 1/4 of the padded input) are resized as the release does - bilinearly
to the padded input, cropped to the image, bilinearly to the output size - but only where a
mask can be positive: a bilinear value is a convex combination of its taps, so a pixel
whose taps are all <= 0 is <= 0. `paste_masks` computes each mask inside the span of its
positive low-resolution cells only, with PyTorch's bilinear sampling rule, and skips the
second resize when it is the identity. A score threshold drops pairs before their masks are
made (a final score never exceeds the class score).

Shape glossary: N queries, K classes, k kept pairs, h x w mask logits, H x W output size.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F
from torchvision.ops import box_convert, roi_align

from .outputs import RawDetections

__all__ = ["Detections", "instance_inference", "detections_from_raw", "paste_masks"]


@dataclass
class Detections:
    """Detections of one image at its original size (H, W): scores (n,), labels (n,)
    int64, boxes (n, 4) absolute xyxy, masks (n, H, W) bool or None (box-only outputs)."""

    scores: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    masks: Optional[torch.Tensor]

    def __len__(self) -> int:
        return self.scores.shape[0]

    def filtered(self, score_threshold: float = 0.0, max_detections: Optional[int] = None) -> "Detections":
        """The detections scoring at least `score_threshold`, at most `max_detections` of them
        (the best), in their order."""
        keep = (self.scores >= score_threshold).nonzero()[:, 0]
        if max_detections is not None and keep.shape[0] > max_detections:
            keep = keep[self.scores[keep].topk(max_detections).indices.sort().values]
        return self.subset(keep)

    def subset(self, keep: torch.Tensor) -> "Detections":
        """The detections `keep` selects (a boolean mask or indices), in its order."""
        masks = None if self.masks is None else self.masks[keep]
        return Detections(self.scores[keep], self.labels[keep], self.boxes[keep], masks)


@dataclass
class _Taps:
    """Bilinear resampling of one axis: output i = (1 - weight[i]) * in[low[i]] + weight[i] * in[high[i]]."""

    low: torch.Tensor
    high: torch.Tensor
    weight: torch.Tensor
    identity: bool


def _bilinear_taps(in_size: int, out_size: int, device: torch.device) -> _Taps:
    """PyTorch's rule for `interpolate(mode="bilinear", align_corners=False)` along one axis,
    in float32 as its CPU kernel computes it: source = (i + 0.5) * in / out - 0.5, clamped at 0."""
    index = torch.arange(out_size, device=device)
    if in_size == out_size:
        return _Taps(index, index, torch.zeros(out_size, device=device), True)
    scale = torch.tensor(float(in_size), dtype=torch.float32, device=device) / out_size
    source = (scale * (index.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=in_size - 1)
    weight = (source - low).clamp(0, 1)
    high = torch.where(low < in_size - 1, low + 1, low)
    return _Taps(low, high, weight, False)


class _AxisResampler:
    """One axis of the release's resize: mask cells -> padded size (first resize), crop to
    the image size, -> output size (second resize)."""

    def __init__(self, mask_size: int, padded_size: int, image_size: int, output_size: int, device):
        self.mask_size = mask_size
        self.size = output_size
        self.first = _bilinear_taps(mask_size, padded_size, device)
        self.second = _bilinear_taps(image_size, output_size, device)
        # an integer first scale lets F.interpolate compute any window of the first resize
        # exactly (see `window`)
        self.scale = padded_size // mask_size if padded_size % mask_size == 0 else None
        # the first and last mask cell each output index reads (taps are monotonic)
        self.reads_from = self.first.low[self.second.low]
        self.reads_to = self.first.high[self.second.high]

    def span(self, low: int, high: int) -> Tuple[int, int]:
        """Output indices [start, end) that read any mask cell in [low, high]."""
        start = int(torch.searchsorted(self.reads_to, torch.tensor(low, device=self.reads_to.device)))
        end = int(torch.searchsorted(self.reads_from, torch.tensor(high, device=self.reads_from.device), right=True))
        return start, end

    def first_span(self, start: int, end: int) -> Tuple[int, int]:
        """Indices [start, end) of the first resize that output indices [start, end) read."""
        if self.second.identity:
            return start, end
        return int(self.second.low[start]), int(self.second.high[end - 1]) + 1

    def window(self, start: int, end: int) -> Tuple[int, int]:
        """Mask cells [first, last) from which F.interpolate by the integer first scale gives
        indices [start, end) of the first resize exactly: with align_corners=False and an
        integer scale, a window's sampling positions are the full map's shifted by the
        window's start, except within half a cell of a window edge that is not a map edge,
        where the window clamps; one cell of margin keeps those out of [start, end)."""
        first = max(int(self.first.low[start]) - 1, 0)
        last = min(int(self.first.high[end - 1]) + 2, self.mask_size)
        return first, last

    def cells(self, start: int, end: int) -> Tuple[int, int]:
        """Mask cells [first, last) that first-resize indices [start, end) read."""
        return int(self.first.low[start]), int(self.first.high[end - 1]) + 1


def _lerp(values: torch.Tensor, dim: int, taps: _Taps, offset: int, start: int, end: int) -> torch.Tensor:
    """Outputs [start, end) of `taps` along `dim` of `values`, whose index 0 is input `offset`."""
    if taps.identity:
        return values.narrow(dim, start - offset, end - start)
    shape = [1] * values.dim()
    shape[dim] = -1
    weight = taps.weight[start:end].view(shape)
    low = values.index_select(dim, taps.low[start:end] - offset)
    high = values.index_select(dim, taps.high[start:end] - offset)
    return low.mul_(1 - weight).add_(high.mul_(weight))


def _resize_window(logits: torch.Tensor, rows: _AxisResampler, cols: _AxisResampler, region) -> torch.Tensor:
    """The resized (h, w) logits on output rows [y0, y1) x columns [x0, x1)."""
    (y0, y1), (x0, x1) = region
    (p0, p1), (q0, q1) = rows.first_span(y0, y1), cols.first_span(x0, x1)
    if rows.scale is not None and cols.scale is not None:
        (a0, a1), (b0, b1) = rows.window(p0, p1), cols.window(q0, q1)
        size = (rows.scale * (a1 - a0), cols.scale * (b1 - b0))
        block = F.interpolate(logits[None, None, a0:a1, b0:b1], size=size, mode="bilinear", align_corners=False)[0, 0]
        first = block[p0 - rows.scale * a0 : p1 - rows.scale * a0, q0 - cols.scale * b0 : q1 - cols.scale * b0]
    else:
        (a0, a1), (b0, b1) = rows.cells(p0, p1), cols.cells(q0, q1)
        first = _lerp(logits[a0:a1, b0:b1], 0, rows.first, a0, p0, p1)
        first = _lerp(first, 1, cols.first, b0, q0, q1)
    if not rows.second.identity and not cols.second.identity and region == ((0, rows.size), (0, cols.size)):
        # the whole output: one resize of the whole cropped image, as the release does it
        return F.interpolate(first[None, None], size=(rows.size, cols.size), mode="bilinear", align_corners=False)[0, 0]
    return _lerp(_lerp(first, 0, rows.second, p0, y0, y1), 1, cols.second, q0, x0, x1)


def paste_masks(
    mask_logits: torch.Tensor,
    image_size: Tuple[int, int],
    padded_size: Tuple[int, int],
    output_size: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Binary masks at the output size and their mean probability inside the mask.

    Args:
        mask_logits: (n, h, w) at 1/4 of the padded input (any resolution works).
        image_size, padded_size, output_size: as in `instance_inference`.

    Returns:
        masks (n, H, W) bool, the resized logits > 0; scores (n,) float32, the mean sigmoid
        of the resized logits over each mask (0 for an empty mask).
    """
    count, height, width = mask_logits.shape
    device = mask_logits.device
    masks = torch.zeros((count,) + tuple(output_size), dtype=torch.bool, device=device)
    scores = torch.zeros(count, dtype=torch.float32, device=device)
    if count == 0:
        return masks, scores
    rows = _AxisResampler(height, padded_size[0], image_size[0], output_size[0], device)
    cols = _AxisResampler(width, padded_size[1], image_size[1], output_size[1], device)
    logits = mask_logits.float()
    positive = logits > 0
    row_any, col_any = positive.any(2), positive.any(1)  # (n, h), (n, w)
    for index in range(count):
        ys = row_any[index].nonzero()[:, 0]
        if ys.numel() == 0:
            continue
        xs = col_any[index].nonzero()[:, 0]
        region = rows.span(int(ys[0]), int(ys[-1])), cols.span(int(xs[0]), int(xs[-1]))
        (y0, y1), (x0, x1) = region
        if y0 >= y1 or x0 >= x1:
            continue
        resized = _resize_window(logits[index], rows, cols, region)
        binary = resized > 0
        area = binary.count_nonzero()
        # sum of sigmoid over the mask: sigmoid(x) > 1/2 exactly where x > 0, and
        # sigmoid(x) - 1/2 is exact there, so this is sum(sigmoid * mask) without a masked pass
        inside = resized.sigmoid_().sub_(0.5).relu_().sum() + 0.5 * area
        scores[index] = inside / (area + 1e-6)
        masks[index, y0:y1, x0:x1] = binary
    return masks, scores


def _scaled_boxes(
    boxes: torch.Tensor, image_size: Tuple[int, int], padded_size: Tuple[int, int], output_size: Tuple[int, int]
) -> torch.Tensor:
    """(n, 4) normalised cxcywh of the padded input -> absolute xyxy at the output size,
    clipped to the image."""
    height, width = output_size
    # Boxes are relative to the padded input; scale so that the unpadded image maps to output_size.
    scale = boxes.new_tensor([padded_size[1] / image_size[1] * width, padded_size[0] / image_size[0] * height] * 2)
    absolute = box_convert(boxes.float(), "cxcywh", "xyxy") * scale.float()
    limits = absolute.new_tensor([width, height, width, height])
    return torch.minimum(absolute.clamp(min=0), limits)


def _finish(
    scores: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    mask_logits: Optional[torch.Tensor],
    image_size: Tuple[int, int],
    padded_size: Tuple[int, int],
    output_size: Tuple[int, int],
    score_threshold: float,
    max_detections: Optional[int],
) -> Detections:
    """Kept pairs (class probabilities `scores`, best first) -> Detections."""
    keep = scores >= score_threshold if score_threshold > 0 else None
    if keep is not None:
        scores, labels, boxes = scores[keep], labels[keep], boxes[keep]
        mask_logits = None if mask_logits is None else mask_logits[keep]
    masks = None
    if mask_logits is not None:
        masks, mask_scores = _paste_best(scores, mask_logits, image_size, padded_size, output_size, max_detections)
        scores = scores * mask_scores
    order = None
    if score_threshold > 0:
        order = (scores >= score_threshold).nonzero()[:, 0]
    if max_detections is not None and (order if order is not None else scores).shape[0] > max_detections:
        candidates = order if order is not None else torch.arange(scores.shape[0], device=scores.device)
        best = scores[candidates].topk(max_detections).indices
        order = candidates[best]
    if order is not None:
        scores, labels, boxes = scores[order], labels[order], boxes[order]
        masks = None if masks is None else masks[order]
    return Detections(scores, labels, _scaled_boxes(boxes, image_size, padded_size, output_size), masks)


def _paste_best(scores, mask_logits, image_size, padded_size, output_size, max_detections):
    """`paste_masks` of the pairs that can still be among the `max_detections` best: pairs
    are visited by class score, and once `max_detections` final scores exceed the next class
    score the rest cannot enter (their masks stay empty and their mask scores 0)."""
    count = scores.shape[0]
    if max_detections is None or count <= max_detections:
        return paste_masks(mask_logits, image_size, padded_size, output_size)
    masks = torch.zeros((count,) + tuple(output_size), dtype=torch.bool, device=mask_logits.device)
    mask_scores = torch.zeros(count, dtype=torch.float32, device=mask_logits.device)
    done, chunk = 0, max(max_detections, 1)
    while done < count:
        end = min(done + chunk, count)
        masks[done:end], mask_scores[done:end] = paste_masks(
            mask_logits[done:end], image_size, padded_size, output_size
        )
        done = end
        final = scores[:done] * mask_scores[:done]
        if done < count and final.topk(max_detections).values[-1] > scores[done]:
            break
    return masks, mask_scores


def detections_from_raw(
    raw: RawDetections,
    image_sizes: Sequence[Tuple[int, int]],
    padded_size: Tuple[int, int],
    output_sizes: Sequence[Tuple[int, int]],
    *,
    score_threshold: float = 0.0,
    max_detections: Optional[int] = None,
) -> List[Detections]:
    """Detections of every image of a batch from the model's (or an exported model's) raw
    output.

    Args:
        raw: scores, labels, boxes and mask logits of the kept pairs (`RawDetections`).
        image_sizes: (H_in, W_in) of every image before padding; padded_size: the batch's
            (H_pad, W_pad); output_sizes: (H, W) to report each image at.
        score_threshold: drop instances whose final score is below it.
        max_detections: keep at most this many instances per image, the best by final
            score (then ordered by it); None keeps the kept pairs' order.
    """
    results = []
    for index in range(raw.scores.shape[0]):
        masks = None if raw.mask_logits is None else raw.mask_logits[index]
        results.append(
            _finish(
                raw.scores[index].float(),
                raw.labels[index],
                raw.boxes[index],
                masks,
                tuple(image_sizes[index]),
                tuple(padded_size),
                tuple(output_sizes[index]),
                score_threshold,
                max_detections,
            )
        )
    return results


def instance_inference(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    mask_logits: Optional[torch.Tensor],
    image_size: Tuple[int, int],
    padded_size: Tuple[int, int],
    output_size: Tuple[int, int],
    topk: int = 100,
) -> Detections:
    """
    Args:
        logits: (N, K) class logits; boxes: (N, 4) normalised cxcywh of the padded input;
        mask_logits: (N, h, w) at 1/4 of the padded input, or None for box-only outputs.
        image_size: (H_in, W_in) of the resized image before padding.
        padded_size: (H_pad, W_pad) of the network input.
        output_size: (H, W) to report results at (the original image size).
        topk: instances kept.
    """
    num_queries, num_classes = logits.shape
    scores, index = logits.sigmoid().flatten().topk(min(topk, num_queries * num_classes))
    query = index // num_classes
    labels = index % num_classes
    masks = None if mask_logits is None else mask_logits[query]
    return _finish(scores, labels, boxes[query], masks, image_size, padded_size, output_size, 0.0, None)


# --- Box-conditioned masks (modeling/box_mask_head.py): selection, pasting, scoring ---

__all__ += ["top_pairs", "paste_box_masks", "box_mask_detections"]


def top_pairs(logits: torch.Tensor, topk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `topk` (query, class) pairs of (N, K) logits by sigmoid score, as
    `instance_inference` keeps them: (scores, query indices, labels), each (n,)."""
    num_queries, num_classes = logits.shape
    scores, index = logits.sigmoid().flatten().topk(min(topk, num_queries * num_classes))
    return scores, index // num_classes, index % num_classes


def paste_box_masks(probabilities: torch.Tensor, boxes: torch.Tensor, output_size: Tuple[int, int]) -> torch.Tensor:
    """Pastes (n, M, M) box-frame masks into an image: (n, 4) absolute xyxy boxes of that
    image, output_size (H, W) -> (n, H, W) values.

    Pixel (y, x) reads the mask at box-frame position ((x + 0.5 - x0) / (x1 - x0) * M, ...),
    bilinearly, zero outside the mask: the inverse of RoIAlign with aligned=True, and the
    same geometry as detectron2's `paste_masks_in_image` (tests compare the two). It is
    torchvision's `roi_align` run backwards: each mask (zero-padded by one cell, so that
    roi_align's border replication reads zeros) is the "image" and the whole output image,
    in the mask's cell units, is the "box", sampled once per output pixel.

    NOTE: torchvision's own `paste_masks_in_image` rounds boxes to integers and widens them
    by one pixel (the legacy "+1" box convention); this keeps sub-pixel box geometry.
    """
    height, width = output_size
    count, size = probabilities.shape[0], probabilities.shape[-1]
    padded = F.pad(probabilities[:, None].float(), (1, 1, 1, 1))
    x0, y0, x1, y1 = boxes.float().unbind(1)
    cells_x = size / (x1 - x0).clamp(min=1e-3)  # mask cells per image pixel
    cells_y = size / (y1 - y0).clamp(min=1e-3)
    rois = torch.stack(
        [
            torch.arange(count, dtype=padded.dtype, device=padded.device),
            1.0 - x0 * cells_x,
            1.0 - y0 * cells_y,
            1.0 + (width - x0) * cells_x,
            1.0 + (height - y0) * cells_y,
        ],
        dim=1,
    )
    return roi_align(padded, rois, (height, width), spatial_scale=1.0, sampling_ratio=1, aligned=True)[:, 0]


def box_mask_detections(
    scores: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    mask_logits: torch.Tensor,
    mask_boxes: torch.Tensor,
    quality: Optional[torch.Tensor],
    image_size: Tuple[int, int],
    padded_size: Tuple[int, int],
    output_size: Tuple[int, int],
) -> Detections:
    """Detections of one image from box-frame masks.

    Args:
        scores, labels: (n,) of the kept pairs (`top_pairs`); boxes: (n, 4) their queries'
        normalised cxcywh boxes of the padded input; mask_logits: (n, M, M) logits in the
        frames of `mask_boxes` (n, 4, normalised cxcywh; the head's RoI boxes);
        quality: (n,) predicted-IoU logits or None; sizes as in `instance_inference`.

    A mask is its pasted probability > 0.5; the score is the class score times the mean
    probability inside the mask (as for the detector's masks), times the predicted IoU when
    the head has a quality branch.
    """
    scale = boxes.new_tensor(
        [padded_size[1] / image_size[1] * output_size[1], padded_size[0] / image_size[0] * output_size[0]] * 2
    )
    absolute = _scaled_boxes(boxes, image_size, padded_size, output_size)  # clipped, as the detector's
    frames = box_convert(mask_boxes.float(), "cxcywh", "xyxy") * scale  # not clipped: the masks' frames
    probability = paste_box_masks(mask_logits.sigmoid(), frames, output_size)
    binary = probability > 0.5
    inside = binary.flatten(1)
    scores = scores * (probability.flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    if quality is not None:
        scores = scores * quality.sigmoid()
    return Detections(scores=scores, labels=labels, boxes=absolute, masks=binary)
