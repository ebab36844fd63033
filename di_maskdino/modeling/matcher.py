"""Hungarian matching of predictions to ground truth (DETR; MaskDINO's costs).

cost = w_class * focal class cost + w_box * L1(cxcywh) + w_giou * (-GIoU)
       + w_mask * sigmoid BCE + w_dice * dice,

the mask terms on `num_points` points drawn uniformly once per image and shared by all
predictions and targets. Targets marked without a box (stuff regions of panoptic data) get no
box terms: they are matched on class and mask alone. Outputs without masks (the
token-interaction outputs of the DI module) are matched on the class and box terms only. The
assignment is scipy's `linear_sum_assignment`.

GIoU follows the release: IoU = inter / (union + eps) and the enclosing-box term
(hull - union) / (hull + eps), eps = 1e-6, in the matching cost and in the loss.

Memory: factored masks (training) are sampled through their features (the D feature maps
at the P points, then dot products; see `point_sampling`), never as (N, h, w) logits, and the mask costs are
computed `chunk_size` predictions at a time, so that their (N, P) temporaries stay small.

Shape glossary: N predictions, M targets of one image, K classes, P points.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_area, box_convert

from ..layers import at_least_float32
from .outputs import Predictions
from .point_sampling import point_sample, sample_channels, uniform_points

__all__ = ["HungarianMatcher", "focal_class_cost", "sigmoid_bce_cost", "dice_cost", "generalized_box_iou", "GIOU_EPS"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]

# NOTE: the release divides by (union + 1e-6) and (hull + 1e-6) in both the matching cost and
# the loss; torchvision's GIoU uses no epsilon (cost) and 1e-7 (loss). For a box of a few pixels
# the two differ measurably (3e-4 relative for 6 x 7 px), and with the epsilon a perfect
# prediction keeps a tiny loss, as in the release. We follow the release.
GIOU_EPS = 1e-6


def generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = GIOU_EPS, pairwise: bool = True
) -> torch.Tensor:
    """GIoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M), or elementwise (N, 4) x (N, 4) -> (N,)
    with `pairwise=False`; IoU = inter / (union + eps), GIoU = IoU - (hull - union) / (hull + eps)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    if pairwise:
        boxes1, area1 = boxes1[:, None], area1[:, None]
    inter = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = inter[..., 0] * inter[..., 1]
    union = area1 + area2 - inter
    hull = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    hull = hull[..., 0] * hull[..., 1]
    return inter / (union + eps) - (hull - union) / (hull + eps)


def focal_class_cost(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """(N, K) logits, (M,) labels -> (N, M): focal loss of predicting the target class
    minus that of not predicting it. Log-probabilities come from logsigmoid, so no epsilon
    is needed (it would round to 0 in half precision)."""
    prob = logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * -F.logsigmoid(logits)
    negative = (1 - alpha) * prob**gamma * -F.logsigmoid(-logits)
    return (positive - negative)[:, labels]


def sigmoid_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) logits, (M, P) binary targets -> (N, M) mean binary cross-entropy over points."""
    positive = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (positive @ targets.T + negative @ (1 - targets).T) / logits.shape[1]


def dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) logits, (M, P) binary targets -> (N, M) dice loss, 1 - (2|p t| + 1) / (|p| + |t| + 1)."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """
    Args:
        class_weight, box_weight, giou_weight, mask_weight, dice_weight: cost weights.
        num_points: P, points for the mask costs.
        focal_alpha, focal_gamma: of the class cost.
        chunk_size: predictions whose mask costs are computed at once.
    """

    def __init__(
        self,
        class_weight: float = 4.0,
        box_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 12544,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        chunk_size: int = 64,
    ):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"HungarianMatcher: chunk_size must be at least 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.class_weight = class_weight
        self.box_weight = box_weight
        self.giou_weight = giou_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, prediction: Predictions, image: int, target: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, M) cost of image `image` of `prediction` against its target."""
        logits = at_least_float32(prediction.logits[image])
        boxes = at_least_float32(prediction.boxes[image])
        labels, target_boxes = target["labels"], target["boxes"].to(boxes.dtype)
        cost = self.class_weight * focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        l1 = torch.cdist(boxes, target_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
        if "has_box" in target:  # panoptic / semantic targets: stuff is matched without box costs
            l1 = l1 * target["has_box"].to(l1)[None, :]
            giou = giou * target["has_box"].to(giou)[None, :]
        cost = cost + self.box_weight * l1
        cost = cost - self.giou_weight * giou
        if prediction.has_masks:
            cost = cost + self.mask_cost(prediction, image, target["masks"], target.get("mask_frame"))
        return cost

    def mask_cost(
        self, prediction: Predictions, image: int, target_masks: torch.Tensor, frame: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(N, M) weighted BCE + dice cost of image `image`'s masks against (M, H, W) target
        masks; frame: the target's "mask_frame" (see `forward`), or None."""
        num_predictions = prediction.logits.shape[1]
        points = uniform_points(1, self.num_points, prediction.logits.device)
        if frame is not None:  # drawn in the image, sampled on the padded maps
            points = points * frame.to(points)
        wanted = target_masks[:, None].float()
        dtype = torch.promote_types(wanted.dtype, prediction.logits.dtype)
        wanted = point_sample(wanted.to(dtype), points.to(dtype).expand(target_masks.shape[0], -1, -1))
        if prediction.mask_embed is not None:
            sampled = sample_channels(prediction.mask_features[image].to(dtype), points[0])  # (D, P)
        costs = []
        for rows in torch.arange(num_predictions, device=points.device).split(self.chunk_size):
            if prediction.mask_embed is None:
                masks = prediction.masks[image, rows][:, None].to(dtype)
                predicted = point_sample(masks, points.to(dtype).expand(len(rows), -1, -1))
            else:
                predicted = prediction.mask_embed[image, rows].to(dtype) @ sampled
            costs.append(
                self.mask_weight * sigmoid_bce_cost(predicted, wanted) + self.dice_weight * dice_cost(predicted, wanted)
            )
        return torch.cat(costs)

    @torch.no_grad()
    def forward(
        self, prediction: Predictions, targets: List[Dict[str, torch.Tensor]], name: Optional[str] = None
    ) -> Indices:
        """
        Args:
            prediction: one output of the model (B images).
            targets: per image "labels" (M,), "boxes" (M, 4) normalised cxcywh and, for
                outputs with masks, "masks" (M, H, W); optionally "has_box" (M,) bool: targets
                without a box (stuff, see `SetCriterion.with_box_flags`) get no box costs;
                optionally "mask_frame" (2,) (x, y) size of the image as a fraction of its
                padded masks (a padding mask): the mask points are then drawn in the image.
            name: names the output in error messages (e.g. "decoder layer 3").

        Returns:
            per image (prediction indices, target indices), int64 on the host, of equal
            length min(N, M).
        """
        return self.match_all([(prediction, name)], targets)[0]

    @torch.no_grad()
    def match_all(
        self, predictions: Sequence[Tuple[Predictions, Optional[str]]], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Indices]:
        """`forward` for several outputs (with their names) at once: every cost matrix of every
        output and image is computed on the device, then all come to the host in one copy
        (one synchronisation on a GPU, instead of one per output and image) for the
        assignment."""
        costs = []
        device_type = predictions[0][0].logits.device.type if predictions else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            for prediction, _ in predictions:
                for image, target in enumerate(targets):
                    if target["labels"].numel():
                        costs.append(self.cost_matrix(prediction, image, target))
        host = torch.cat([c.flatten().double() for c in costs]).cpu().split([c.numel() for c in costs]) if costs else []
        shapes = iter([(c.shape, h) for c, h in zip(costs, host)])
        results = []
        for _, name in predictions:
            indices = []
            for image, target in enumerate(targets):
                if target["labels"].numel() == 0:
                    empty = torch.zeros(0, dtype=torch.int64)
                    indices.append((empty, empty))
                    continue
                shape, values = next(shapes)
                cost = values.view(shape).numpy()
                if not np.isfinite(cost).all():
                    raise FloatingPointError(
                        f"HungarianMatcher: the matching cost of {name or 'an output'} is not finite for image {image} "
                        f"({int((~np.isfinite(cost)).sum())} of {cost.size} entries); the predictions or targets "
                        "hold NaN/inf or degenerate boxes"
                    )
                rows, cols = linear_sum_assignment(cost)
                indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            results.append(indices)
        return results
