"""The detectron2 meta-architecture "DIMaskDINOArch": batched detectron2 inputs in, losses
(training) or `Instances` (inference) out. It is the core network
(`di_maskdino.modeling.DIMaskDINO`, whose parameter names it keeps) plus the objective
(`SetCriterion`) and the translation from and to detectron2's structures.
"""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, Instances
from torchvision.ops import box_convert

from ..modeling import DIMaskDINO, Predictions, build_encoder, build_head
from ..modeling.criterion import SetCriterion
from ..modeling.matcher import HungarianMatcher
from ..modeling.panoptic import SegmentationInference
from .config import architecture_from_config
from .panoptic import build_segmentation_inference, segmentation_results

__all__ = ["DIMaskDINOArch", "build_criterion"]


def build_criterion(cfg) -> SetCriterion:
    """The training objective MODEL.DI_MASKDINO.{LOSS, MATCHER, TOLERANCE} describe."""
    m = cfg.MODEL.DI_MASKDINO
    matcher = HungarianMatcher(
        class_weight=m.MATCHER.CLASS_WEIGHT,
        box_weight=m.MATCHER.BOX_WEIGHT,
        giou_weight=m.MATCHER.GIOU_WEIGHT,
        mask_weight=m.MATCHER.MASK_WEIGHT,
        dice_weight=m.MATCHER.DICE_WEIGHT,
        num_points=m.LOSS.TRAIN_NUM_POINTS,
        focal_alpha=m.LOSS.FOCAL_ALPHA,
        focal_gamma=m.LOSS.FOCAL_GAMMA,
    )
    return SetCriterion(
        matcher,
        class_weight=m.LOSS.CLASS_WEIGHT,
        box_weight=m.LOSS.BOX_WEIGHT,
        giou_weight=m.LOSS.GIOU_WEIGHT,
        mask_weight=m.LOSS.MASK_WEIGHT,
        dice_weight=m.LOSS.DICE_WEIGHT,
        detection_loss_factor=m.TOLERANCE.DETECTION_LOSS_FACTOR,
        num_points=m.LOSS.TRAIN_NUM_POINTS,
        oversample_ratio=m.LOSS.OVERSAMPLE_RATIO,
        importance_sample_ratio=m.LOSS.IMPORTANCE_SAMPLE_RATIO,
        focal_alpha=m.LOSS.FOCAL_ALPHA,
        focal_gamma=m.LOSS.FOCAL_GAMMA,
        stuff_box_loss=m.LOSS.STUFF_BOX_LOSS,
    )


@META_ARCH_REGISTRY.register()
class DIMaskDINOArch(DIMaskDINO):
    @configurable
    def __init__(
        self,
        *,
        backbone,
        encoder,
        head,
        criterion: SetCriterion,
        pixel_mean,
        pixel_std,
        size_divisibility,
        test_topk,
        segmentation: Optional[SegmentationInference] = None,
    ):
        super().__init__(
            backbone,
            encoder,
            head,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            size_divisibility=size_divisibility,
            test_topk=test_topk,
        )
        self.criterion = criterion
        # panoptic / semantic inference (MODEL.DI_MASKDINO.TEST); None: instances only
        self.segmentation = segmentation

    @classmethod
    def from_config(cls, cfg):
        architecture = architecture_from_config(cfg)
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "encoder": build_encoder(architecture, backbone.output_shape()),
            "head": build_head(architecture),
            "criterion": build_criterion(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.MODEL.DI_MASKDINO.SIZE_DIVISIBILITY,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
            "segmentation": build_segmentation_inference(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def targets(self, batched_inputs: List[Dict], padded_size) -> List[Dict[str, torch.Tensor]]:
        """detectron2 Instances -> targets with boxes normalised by the padded input size
        (the frame the network predicts in) and masks padded to it."""
        height, width = padded_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=self.device)
        targets = []
        for item in batched_inputs:
            instances = item["instances"].to(self.device)
            masks = instances.gt_masks.tensor if hasattr(instances, "gt_masks") else None
            if masks is None:
                raise ValueError(
                    "DIMaskDINO trains on instance masks: the dataset mapper must keep them (use_instance_mask)"
                )
            padded = masks.new_zeros((masks.shape[0], height, width))
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            boxes = box_convert(instances.gt_boxes.tensor, "xyxy", "cxcywh") / scale
            target = {"labels": instances.gt_classes, "boxes": boxes, "masks": padded.float()}
            if instances.has("gt_is_thing"):  # panoptic / semantic targets: things and stuff
                target["is_thing"] = instances.gt_is_thing
            targets.append(target)
        return targets

    def forward(self, batched_inputs: List[Dict]):
        batch, sizes = self.preprocess([x["image"] for x in batched_inputs])
        if self.training:
            targets = self.targets(batched_inputs, batch.shape[-2:])
            return self.criterion(self.run(batch, targets=targets), targets)
        prediction = self.run(batch).final
        if self.segmentation is not None:  # panoptic and / or semantic outputs
            return segmentation_results(
                self, self.segmentation, prediction, batched_inputs, sizes, tuple(batch.shape[-2:])
            )
        return self.detectron2_results(prediction, batched_inputs, sizes, tuple(batch.shape[-2:]))

    def detectron2_results(self, prediction: Predictions, batched_inputs: List[Dict], sizes, padded_size) -> List[Dict]:
        """[{"instances": detectron2 Instances}] of one output, at each input's "height" x
        "width" (the original image size) when given."""
        output_sizes = [(x.get("height", s[0]), x.get("width", s[1])) for x, s in zip(batched_inputs, sizes)]
        results = []
        for found, size in zip(self.instances(prediction, sizes, padded_size, output_sizes), output_sizes):
            instances = Instances(size)
            instances.scores = found.scores
            instances.pred_classes = found.labels
            instances.pred_boxes = Boxes(found.boxes)
            if found.masks is not None:
                instances.pred_masks = found.masks
            results.append({"instances": instances})
        return results
