"""Inference: from the final predictions of one image to scored instances.

The top `topk` (query, class) pairs by sigmoid class score are kept; a pair's mask is its
query's mask logits > 0 at the output resolution; its score is the class score times the
mean mask probability inside that mask; its box is the query's box, clipped to the image
(as detectron2's models report boxes). Outputs without masks
(the token-interaction outputs) give boxes scored by class alone.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.nn import functional as F
from torchvision.ops import box_convert

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
    # NOTE: the release reports boxes unclipped (a box can reach past the image border);
    # detectron2's models clip them to the image, and so do we.
    absolute[:, 0::2] = absolute[:, 0::2].clamp(min=0, max=width)
    absolute[:, 1::2] = absolute[:, 1::2].clamp(min=0, max=height)
    return Detections(scores=scores, labels=labels, boxes=absolute, masks=binary)
