"""The training objective of the box-conditioned mask head (modeling/box_mask_head.py).

The detector's final-layer predictions are matched to the ground truth by the same
Hungarian matcher as the detector's own loss; each matched query's box and embedding feed
the head, and its box-frame mask logits are charged

    loss_box_mask     sigmoid BCE on importance-sampled points of the box frame
    loss_box_dice     dice loss on the same points
    loss_box_quality  squared error of the predicted mask IoU (with a quality head)

each summed over the matched objects, divided by the number of target objects (averaged
over workers, at least 1) and multiplied by its weight. A box-frame point (u, v) in [0, 1]^2
of box (x0, y0, x1, y1) is compared with the target mask at (x0 + u (x1 - x0), ...), the
position RoIAlign and pasting give it, so the loss sees exactly what inference pastes.
Object parts outside the predicted box cannot be predicted and are not charged.

Shape glossary: n matched objects, M mask resolution, P points, H x W padded input.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert

from .box_mask_head import BoxMasks
from .criterion import _num_objects
from .matcher import HungarianMatcher
from .outputs import Predictions
from .point_sampling import point_sample, uncertain_point_coords

__all__ = ["BoxMaskCriterion", "BoxMatches", "BOX_MASK_TERMS"]

BOX_MASK_TERMS = ("loss_box_mask", "loss_box_dice", "loss_box_quality")


@dataclass
class BoxMatches:
    """Matched (image, query, target) triples, each (n,) int64: query `query[k]` of image
    `image[k]` is matched to target `target[k]` of that image."""

    image: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor

    def __len__(self) -> int:
        return self.image.shape[0]


def box_frame_to_image(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(n, P, 2) box-frame points (u, v) in [0, 1] and (n, 4) normalised cxcywh boxes ->
    (n, P, 2) normalised (x, y) of the padded input."""
    x0y0x1y1 = box_convert(boxes.float(), "cxcywh", "xyxy")
    origin, extent = x0y0x1y1[:, None, :2], (x0y0x1y1[:, 2:] - x0y0x1y1[:, :2])[:, None]
    return origin + points * extent


class BoxMaskCriterion(nn.Module):
    """
    Args:
        matcher: the detector's Hungarian matcher.
        mask_weight, dice_weight, quality_weight: loss weights.
        num_points, oversample_ratio, importance_sample_ratio: point sampling of the box frame.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        *,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        quality_weight: float = 1.0,
        num_points: int = 3136,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_box_mask": mask_weight, "loss_box_dice": dice_weight, "loss_box_quality": quality_weight}
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    @torch.no_grad()
    def match(self, prediction: Predictions, targets: List[Dict[str, torch.Tensor]]) -> BoxMatches:
        """Matches the detector's final-layer prediction to `targets` (see `SetCriterion.forward`)."""
        indices = self.matcher(prediction, targets, name="the final layer (box-conditioned masks)")
        device = prediction.logits.device
        image = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        query = torch.cat([src for src, _ in indices])
        target = torch.cat([tgt for _, tgt in indices])
        return BoxMatches(image.to(device), query.to(device), target.to(device))

    def forward(
        self,
        masks: BoxMasks,
        targets: List[Dict[str, torch.Tensor]],
        matches: BoxMatches,
        num_objects: Optional[float] = None,
    ) -> Dict[str, torch.Tensor]:
        """Weighted losses of the head's `masks` (in the frames of their RoI boxes) for the
        matched queries; `targets` and `num_objects` as for `SetCriterion`."""
        boxes = masks.boxes
        num_objects = _num_objects(targets, masks.logits.device) if num_objects is None else num_objects
        logits = masks.logits.float()[:, None]  # (n, 1, M, M)
        if len(matches) == 0:
            zero = 0.0 * masks.logits.sum()
            if masks.quality is not None:
                zero = zero + 0.0 * masks.quality.sum()
            return {key: zero for key in self._terms(masks)}
        wanted = torch.stack(
            [targets[int(b)]["masks"][int(t)] for b, t in zip(matches.image.tolist(), matches.target.tolist())]
        )[:, None].to(logits)  # (n, 1, H, W)
        points = uncertain_point_coords(logits, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
        point_logits = point_sample(logits, points)
        point_labels = point_sample(wanted, box_frame_to_image(points, boxes))
        bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1)
        prob = point_logits.sigmoid()
        dice = 1 - (2 * (prob * point_labels).sum(1) + 1) / (prob.sum(1) + point_labels.sum(1) + 1)
        losses = {"loss_box_mask": bce.sum() / num_objects, "loss_box_dice": dice.sum() / num_objects}
        if masks.quality is not None:
            iou = self.mask_iou(logits.detach(), boxes, wanted)
            error = (masks.quality.float().sigmoid() - iou) ** 2
            losses["loss_box_quality"] = error.sum() / num_objects
        return {key: value * self.weights[key] for key, value in losses.items()}

    @staticmethod
    @torch.no_grad()
    def mask_iou(logits: torch.Tensor, boxes: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """(n,) IoU of the binarised box-frame masks (n, 1, M, M) with the targets
        (n, 1, H, W) read at the centres of the M x M cells of the box.

        NOTE: the IoU is measured inside the box (target parts outside it are not counted),
        the region the head predicts."""
        size = logits.shape[-1]
        centres = (torch.arange(size, device=logits.device, dtype=torch.float32) + 0.5) / size
        v, u = torch.meshgrid(centres, centres, indexing="ij")
        grid = torch.stack([u.flatten(), v.flatten()], dim=1)[None].expand(logits.shape[0], -1, -1)
        target = point_sample(wanted, box_frame_to_image(grid, boxes)) > 0.5
        predicted = logits.flatten(1) > 0
        intersection = (predicted & target).sum(1).float()
        union = (predicted | target).sum(1).float()
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))

    @staticmethod
    def _terms(masks: BoxMasks):
        return BOX_MASK_TERMS if masks.quality is not None else BOX_MASK_TERMS[:2]
