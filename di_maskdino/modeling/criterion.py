"""The training objective (MaskDINO's losses, kept by DI-MaskDINO, appendix B).

For every supervised output - the final layer, every earlier decoder layer and the initial
prediction, the encoder (two-stage) output, the token-interaction outputs of the DI module,
and the denoising queries - predictions are matched to the ground truth (Hungarian, or by
construction for denoising) and charged

    loss_ce    sigmoid focal loss over all queries and classes
    loss_bbox  L1 of matched boxes (cxcywh)
    loss_giou  1 - GIoU of matched boxes (the release's epsilon, see matcher.GIOU_EPS)
    loss_mask  sigmoid BCE of matched masks on importance-sampled points
    loss_dice  dice loss on the same points

each summed and divided by the number of target objects (averaged over workers, at least
1), then multiplied by its weight. Panoptic and semantic targets may mark each target as a
thing or not ("is_thing"); unless `stuff_box_loss`, the box terms (L1, GIoU, and the box
costs of the matcher) then cover things only (MaskDINO), normalised as before.
NOTE: the token-interaction outputs of the DI module predict no masks, so there a stuff target
is matched on its class alone; their class loss still covers stuff, which the second
selection (Eq. 3, by class score) needs in order to keep stuff tokens. Denoising queries are
made from stuff targets too, as in MaskDINO's release.

Memory: the mask losses need the mask logits of the matched queries only, at the sampled
points. Outputs whose masks are factored (mask embeddings and mask features, as the model
gives them in training) have the logits of their matched queries computed per image; the
point losses run under activation checkpointing, so that backward keeps only the points and
their labels, not the (n, h, w) logits; the labels are sampled from each target mask in
place, without copying it per match.

Loss names: "loss_ce" (final layer), "loss_ce_{i}"
(layer i, 0 being the initial prediction), "loss_ce_interm" (encoder),
"loss_ce_ti{s}_{i}" (DI stage s, token-interaction layer i), "loss_ce_dn" / "loss_ce_dn_{i}"
(denoising).
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert, sigmoid_focal_loss

from ..layers import at_least_float32, checkpointed
from .matcher import HungarianMatcher, Indices, generalized_box_iou
from .outputs import DIMaskDINOOutput, Predictions
from .point_sampling import point_sample, uncertain_point_coords

__all__ = ["SetCriterion", "LOSS_TERMS", "DETECTION_TERMS"]

LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")
DETECTION_TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def _num_objects(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> float:
    """The target objects of the batch, averaged over the processes (at least 1); one
    process counts them on the host."""
    count = float(sum(t["labels"].numel() for t in targets))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return max(count, 1.0)
    total = torch.tensor([count], device=device)
    torch.distributed.all_reduce(total)
    return max(total.item() / torch.distributed.get_world_size(), 1.0)


class SetCriterion(nn.Module):
    """
    Args:
        matcher: the Hungarian matcher.
        class_weight, box_weight, giou_weight, mask_weight, dice_weight: loss weights.
        detection_loss_factor: multiplies the detection weights (class, L1, GIoU); 0.1 is
            the paper's loss-weight constraint of the imbalance tolerance test (Tab. 3).
        stuff_box_loss: also charge box losses for targets marked `is_thing = False` (stuff
            regions); by default only things get them. Targets without "is_thing" are things.
        num_points, oversample_ratio, importance_sample_ratio: mask point sampling.
        focal_alpha, focal_gamma: of the class loss.

    The denoising losses are charged whenever the output carries a `denoising` entry; a
    batch without objects (no denoising queries) gets them as zeros, so that all workers
    log the same keys.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        *,
        class_weight: float = 4.0,
        box_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        detection_loss_factor: float = 1.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        stuff_box_loss: bool = False,
    ):
        super().__init__()
        self.matcher = matcher
        self.stuff_box_loss = stuff_box_loss
        self.weights = {
            "loss_ce": class_weight * detection_loss_factor,
            "loss_bbox": box_weight * detection_loss_factor,
            "loss_giou": giou_weight * detection_loss_factor,
            "loss_mask": mask_weight,
            "loss_dice": dice_weight,
        }
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def losses(self, prediction: Predictions, targets, indices: Indices, num_objects: float) -> Dict[str, torch.Tensor]:
        """Unweighted losses of one output for given matches."""
        batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(prediction.logits.device)
        source = torch.cat([src for src, _ in indices]).to(prediction.logits.device)
        logits = at_least_float32(prediction.logits)
        onehot = torch.zeros_like(logits)
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(logits.device)
        onehot[batch, source, labels] = 1.0
        losses = {
            "loss_ce": sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
            / num_objects
        }
        boxes = at_least_float32(prediction.boxes[batch, source])
        target_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(boxes)
        has_box = self._matched_has_box(targets, indices, boxes.device)
        if has_box is not None:  # panoptic / semantic targets: no box loss for stuff
            boxes, target_boxes = boxes[has_box], target_boxes[has_box]
        losses["loss_bbox"] = F.l1_loss(boxes, target_boxes, reduction="sum") / num_objects
        giou = generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"), pairwise=False
        )
        losses["loss_giou"] = (1 - giou).sum() / num_objects
        if prediction.has_masks:
            losses.update(self.mask_losses(prediction, targets, indices, batch, source, num_objects))
        if boxes.shape[0] == 0:  # keep the box and mask heads in the graph
            for key in ("loss_bbox", "loss_giou"):
                losses[key] = losses[key] + 0.0 * prediction.boxes.sum()
        return losses

    @staticmethod
    def matched_mask_logits(prediction: Predictions, batch: torch.Tensor, source: torch.Tensor, counts: List[int]):
        """(n, h, w) mask logits of the matched queries (ordered by image, `counts` per image);
        from factored masks only those n are computed."""
        if prediction.mask_embed is None:
            return prediction.masks[batch, source]
        embed = prediction.mask_embed[batch, source]
        return torch.cat(
            [
                torch.einsum("nd,dhw->nhw", rows, prediction.mask_features[image])
                for image, rows in enumerate(embed.split(counts))
            ]
        )

    @staticmethod
    def point_labels(targets, indices: Indices, points: torch.Tensor) -> torch.Tensor:
        """(n, P) target masks of the matches sampled at their (n, P, 2) points; each target
        mask is sampled once for all its matches (the denoising groups repeat every target).
        The matches are grouped on the host, where the indices are (no synchronisation)."""
        labels = points.new_empty(points.shape[:2])
        offset = 0
        for target, (_, tgt) in zip(targets, indices):
            masks = target["masks"]
            rows_of: Dict[int, List[int]] = {}
            for row, index in enumerate(tgt.tolist(), start=offset):
                rows_of.setdefault(index, []).append(row)
            for index in sorted(rows_of):
                chosen = torch.tensor(rows_of[index], device=points.device)
                mask = masks[index][None, None].to(device=points.device, dtype=points.dtype)
                labels[chosen] = point_sample(mask, points[chosen].reshape(1, -1, 2)).view(len(chosen), -1)
            offset += len(tgt)
        return labels

    @staticmethod
    def matched_frames(targets, counts: List[int], like: torch.Tensor) -> Optional[torch.Tensor]:
        """(n, 2) "mask_frame" of the image of every match (a padding mask), or None."""
        if not any("mask_frame" in t for t in targets):
            return None
        if not all("mask_frame" in t for t in targets):
            raise ValueError('SetCriterion: either every target or none has a "mask_frame"')
        frames = [t["mask_frame"].to(like)[None].expand(count, 2) for t, count in zip(targets, counts)]
        return torch.cat(frames)

    @staticmethod
    def _matched_has_box(targets, indices: Indices, device) -> Optional[torch.Tensor]:
        """(n,) bool over the matched pairs: does the target have a box loss; None when no
        target says (all do)."""
        if not any("has_box" in t for t in targets):
            return None
        flags = [
            t["has_box"][tgt] if "has_box" in t else torch.ones(len(tgt), dtype=torch.bool)
            for t, (_, tgt) in zip(targets, indices)
        ]
        return torch.cat([f.to(device=device, dtype=torch.bool) for f in flags])

    def with_box_flags(self, targets: List[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
        """The targets, each with "has_box" (M,) bool where it marks things ("is_thing") and
        stuff boxes are not supervised; the matcher and the box losses read it."""
        if self.stuff_box_loss:
            return targets
        return [{**t, "has_box": t["is_thing"].bool()} if "is_thing" in t else t for t in targets]

    def mask_losses(self, prediction, targets, indices, batch, source, num_objects) -> Dict[str, torch.Tensor]:
        if source.numel() == 0:
            if prediction.mask_embed is None:
                zero = 0.0 * prediction.masks.sum()
            else:
                zero = 0.0 * (prediction.mask_embed.sum() + prediction.mask_features.sum())
            return {"loss_mask": zero, "loss_dice": zero}
        counts = [len(src) for src, _ in indices]
        with torch.no_grad():
            matched = at_least_float32(self.matched_mask_logits(prediction, batch, source, counts))
            frame = self.matched_frames(targets, counts, matched)
            points = uncertain_point_coords(
                matched[:, None], self.num_points, self.oversample_ratio, self.importance_sample_ratio, frame
            )
            if frame is not None:  # drawn in the images, sampled on the padded maps
                points = points * frame[:, None, :]
            del matched
            point_labels = self.point_labels(targets, indices, points)

        def point_losses():
            predicted = at_least_float32(self.matched_mask_logits(prediction, batch, source, counts))
            point_logits = point_sample(predicted[:, None], points)
            bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1)
            prob = point_logits.sigmoid()
            dice = 1 - (2 * (prob * point_labels).sum(1) + 1) / (prob.sum(1) + point_labels.sum(1) + 1)
            return bce.sum(), dice.sum()

        # backward keeps only the points and their labels; the logits are computed again
        bce, dice = checkpointed(True, point_losses)
        return {"loss_mask": bce / num_objects, "loss_dice": dice / num_objects}

    @staticmethod
    def denoising_indices(num_groups: int, group_size: int, num_targets: List[int]) -> Indices:
        """Query g * group_size + j reconstructs target j of its image."""
        indices = []
        for count in num_targets:
            target = torch.arange(count).repeat(num_groups)
            query = (torch.arange(num_groups)[:, None] * group_size + torch.arange(count)[None, :]).flatten()
            indices.append((query, target))
        return indices

    def forward(
        self,
        output: DIMaskDINOOutput,
        targets: List[Dict[str, torch.Tensor]],
        num_objects: Optional[float] = None,
    ) -> Dict[str, torch.Tensor]:
        """Weighted losses of every supervised output.

        targets: per image "labels" (M,) int64, "boxes" (M, 4) normalised cxcywh of the padded
        input (of the image, for a model with a padding mask: `output.padding`), "masks"
        (M, H, W) at the padded input resolution, and optionally "is_thing" (M,) bool
        (panoptic and semantic targets). With a padding, every target gets its image's
        "mask_frame" (see `HungarianMatcher.forward`): the mask points are drawn in the image.
        num_objects: the normaliser, when it spans more than this batch (gradient
            accumulation: the objects of all micro-batches, averaged per process); default:
            the objects of `targets`, averaged over the processes.
        """
        device = output.final.logits.device
        targets = self.with_box_flags(targets)
        if output.padding is not None:
            frames = output.padding.frame_scale(output.padding.canvas, at_least_float32(output.final.logits).dtype)
            targets = [{**t, "mask_frame": frame} for t, frame in zip(targets, frames)]
        num_objects = _num_objects(targets, device) if num_objects is None else num_objects
        # (loss-name suffix, description for error messages, output)
        named: List[Tuple[str, str, Predictions]] = [("", "the final layer", output.final)]
        named += [(f"_{i}", f"decoder output {i}", p) for i, p in enumerate(output.layers[:-1])]
        if output.encoder is not None:
            named.append(("_interm", "the encoder output", output.encoder))
        for s, stage in enumerate(output.token_interaction):
            named += [(f"_ti{s}_{i}", f"token-interaction layer {i} of DI stage {s}", p) for i, p in enumerate(stage)]

        raw: Dict[str, torch.Tensor] = {}
        # every output matched at once: their costs come to the host in one copy
        matches = self.matcher.match_all([(prediction, description) for _, description, prediction in named], targets)
        for (suffix, _, prediction), indices in zip(named, matches):
            for key, value in self.losses(prediction, targets, indices, num_objects).items():
                raw[key + suffix] = value

        dn_suffixes = ["_dn"] + [f"_dn_{i}" for i in range(len(output.layers) - 1)]
        if output.denoising is not None and output.denoising.queries is not None:
            queries = output.denoising.queries
            indices = self.denoising_indices(queries.num_groups, queries.group_size, queries.num_targets)
            dn_predictions = [output.denoising.layers[-1]] + output.denoising.layers[:-1]
            for suffix, prediction in zip(dn_suffixes, dn_predictions):
                for key, value in self.losses(prediction, targets, indices, num_objects * queries.num_groups).items():
                    raw[key + suffix] = value
        elif output.denoising is not None:
            zero = output.final.logits.new_zeros(())
            raw.update({key + suffix: zero for suffix in dn_suffixes for key in LOSS_TERMS})
        return {key: value * self.weights[self._term(key)] for key, value in raw.items()}

    @staticmethod
    def _term(key: str) -> str:
        return next(term for term in LOSS_TERMS if key == term or key.startswith(term + "_"))
