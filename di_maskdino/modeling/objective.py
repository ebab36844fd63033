"""One description of the training objective, and the functions that build it.

`Objective` holds the loss weights, the matching costs and the point sampling of the masks
(MaskDINO's objective, which DI-MaskDINO keeps: appendix B), with an optional part for the
box-conditioned mask head. detectron2's configuration (`di_maskdino.d2.config`) and the
release comparison (`dev/release_training_comparison.py`) describe an objective with it;
`build_criterion` and `build_box_mask_criterion` are the only places that turn a
description into modules.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .architecture import SpecError
from .box_mask_criterion import BoxMaskCriterion
from .criterion import SetCriterion
from .matcher import HungarianMatcher

__all__ = ["Objective", "MatchingCosts", "BoxMaskObjective", "build_criterion", "build_box_mask_criterion"]


@dataclass(frozen=True)
class MatchingCosts:
    """Weights of the Hungarian matcher's costs (MODEL.DI_MASKDINO.MATCHER)."""

    class_weight: float = 4.0
    box_weight: float = 5.0
    giou_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0


@dataclass(frozen=True)
class BoxMaskObjective:
    """The box-conditioned mask head's losses (MODEL.DI_MASKDINO.BOX_MASK_HEAD)."""

    mask_weight: float = 5.0
    dice_weight: float = 5.0
    quality_weight: float = 1.0
    num_points: int = 3136  # points per box for the mask losses


@dataclass(frozen=True)
class Objective:
    """The losses of every supervised output (see `criterion.SetCriterion`); defaults are
    the paper's.

    detection_loss_factor: multiplies the detection weights (class, L1, GIoU); 0.1 is the
        loss-weight constraint of the imbalance tolerance test (Tab. 3).
    stuff_box_loss: also charge box losses for stuff targets (panoptic / semantic).
    num_points, oversample_ratio, importance_sample_ratio: point sampling of the mask
        losses (and of the matcher's mask costs), as in PointRend / Mask2Former.
    box_mask_head: the head's losses, or None for a model without the head.
    """

    class_weight: float = 4.0
    box_weight: float = 5.0
    giou_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    detection_loss_factor: float = 1.0
    stuff_box_loss: bool = False
    matching: MatchingCosts = field(default_factory=MatchingCosts)
    box_mask_head: Optional[BoxMaskObjective] = None

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise SpecError("DI-MaskDINO objective", problems)

    def problems(self) -> List[Tuple[str, str]]:
        """(field, what its value must be) for every field whose value cannot work."""
        rules = [
            ("num_points", self.num_points >= 1, "at least 1"),
            ("oversample_ratio", self.oversample_ratio >= 1, "at least 1"),
            ("importance_sample_ratio", 0 <= self.importance_sample_ratio <= 1, "in [0, 1]"),
            ("detection_loss_factor", self.detection_loss_factor >= 0, "at least 0"),
        ]
        if self.box_mask_head is not None:
            rules.append(("box_mask_head.num_points", self.box_mask_head.num_points >= 1, "at least 1"))
        return [(name, requirement) for name, ok, requirement in rules if not ok]


def build_matcher(objective: Objective) -> HungarianMatcher:
    costs = objective.matching
    return HungarianMatcher(
        class_weight=costs.class_weight,
        box_weight=costs.box_weight,
        giou_weight=costs.giou_weight,
        mask_weight=costs.mask_weight,
        dice_weight=costs.dice_weight,
        num_points=objective.num_points,
        focal_alpha=objective.focal_alpha,
        focal_gamma=objective.focal_gamma,
    )


def build_criterion(objective: Objective) -> SetCriterion:
    """The detector's criterion (with its own Hungarian matcher)."""
    return SetCriterion(
        build_matcher(objective),
        class_weight=objective.class_weight,
        box_weight=objective.box_weight,
        giou_weight=objective.giou_weight,
        mask_weight=objective.mask_weight,
        dice_weight=objective.dice_weight,
        detection_loss_factor=objective.detection_loss_factor,
        num_points=objective.num_points,
        oversample_ratio=objective.oversample_ratio,
        importance_sample_ratio=objective.importance_sample_ratio,
        focal_alpha=objective.focal_alpha,
        focal_gamma=objective.focal_gamma,
        stuff_box_loss=objective.stuff_box_loss,
    )


def build_box_mask_criterion(objective: Objective, matcher: HungarianMatcher) -> Optional[BoxMaskCriterion]:
    """The box mask head's criterion, matching with the detector's `matcher`; None without
    the head."""
    head = objective.box_mask_head
    if head is None:
        return None
    return BoxMaskCriterion(
        matcher,
        mask_weight=head.mask_weight,
        dice_weight=head.dice_weight,
        quality_weight=head.quality_weight,
        num_points=head.num_points,
        oversample_ratio=objective.oversample_ratio,
        importance_sample_ratio=objective.importance_sample_ratio,
    )
