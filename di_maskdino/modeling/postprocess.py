"""Inference: from the final predictions of one image to scored instances.

The top `topk` (query, class) pairs by sigmoid class score are kept; a pair's mask is its
query's mask logits > 0 at the output resolution; its score is the class score times the
mean mask probability inside that mask; its box is the query's box. Outputs without masks
(the token-interaction outputs) give boxes scored by class alone.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.nn import functional as F
from torchvision.ops import box_convert, roi_align

__all__ = ["Detections", "instance_inference"]


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
    height, width = output_size
    scores, index = logits.sigmoid().flatten().topk(min(topk, num_queries * num_classes))
    query = index // num_classes
    labels = index % num_classes
    binary = None
    if mask_logits is not None:
        masks = F.interpolate(mask_logits[query][None].float(), size=padded_size, mode="bilinear", align_corners=False)
        masks = masks[:, :, : image_size[0], : image_size[1]]
        masks = F.interpolate(masks, size=output_size, mode="bilinear", align_corners=False)[0]
        binary = masks > 0
        probability = masks.sigmoid().flatten(1)
        scores = scores * (probability * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)

    # Boxes are relative to the padded input; scale so that the unpadded image maps to output_size.
    scale = boxes.new_tensor([padded_size[1] / image_size[1] * width, padded_size[0] / image_size[0] * height] * 2)
    absolute = box_convert(boxes[query].float(), "cxcywh", "xyxy") * scale
    return Detections(scores=scores, labels=labels, boxes=absolute, masks=binary)


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
    absolute = box_convert(boxes.float(), "cxcywh", "xyxy") * scale
    frames = box_convert(mask_boxes.float(), "cxcywh", "xyxy") * scale
    probability = paste_box_masks(mask_logits.sigmoid(), frames, output_size)
    binary = probability > 0.5
    inside = binary.flatten(1)
    scores = scores * (probability.flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    if quality is not None:
        scores = scores * quality.sigmoid()
    return Detections(scores=scores, labels=labels, boxes=absolute, masks=binary)
