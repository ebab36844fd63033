"""The detectron2 meta-architecture "DIMaskDINOArch": batched detectron2 inputs in, losses
(training) or `Instances` (inference) out. It is the core network
(`di_maskdino.modeling.DIMaskDINO`, whose parameter names it keeps) plus the objective
(`SetCriterion`) and the translation from and to detectron2's structures.
"""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torchvision.ops import box_convert

from ..modeling import DIMaskDINO, Predictions, build_encoder, build_head
from ..modeling.criterion import SetCriterion
from ..modeling.matcher import HungarianMatcher
from ..modeling.postprocess import detections_from_raw
from .backbone import checkpoint_backbone
from .config import architecture_from_config
from .structures import detections_to_instances

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
    )


@META_ARCH_REGISTRY.register()
class DIMaskDINOArch(DIMaskDINO):
    @configurable
    def __init__(
        self, *, backbone, encoder, head, criterion: SetCriterion, pixel_mean, pixel_std, size_divisibility, test_topk
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

    @classmethod
    def from_config(cls, cfg):
        architecture = architecture_from_config(cfg)
        backbone = build_backbone(cfg)
        if architecture.checkpointing.backbone:
            checkpoint_backbone(backbone)
        return {
            "backbone": backbone,
            "encoder": build_encoder(architecture, backbone.output_shape()),
            "head": build_head(architecture),
            "criterion": build_criterion(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.MODEL.DI_MASKDINO.SIZE_DIVISIBILITY,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def targets(self, batched_inputs: List[Dict], padded_size) -> List[Dict[str, torch.Tensor]]:
        """detectron2 Instances -> targets with boxes normalised by the padded input size
        (the frame the network predicts in) and, unless the model is detection-only, masks
        padded to it."""
        # NOTE: the release normalises the boxes by each image's unpadded size, while its
        # predictions (and the masks) live in the padded frame; the two agree when every image of
        # the batch has the padded size (LSJ's fixed crops) and differ by 0.5-2% otherwise
        # (resize mappers). Normalising by the padded size keeps targets and predictions in one
        # frame; we keep it on purpose (README, "Released checkpoints").
        height, width = padded_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=self.device)
        targets = []
        for item in batched_inputs:
            instances = item["instances"].to(self.device)
            boxes = box_convert(instances.gt_boxes.tensor, "xyxy", "cxcywh") / scale
            target = {"labels": instances.gt_classes, "boxes": boxes}
            if self.predicts_masks:
                masks = instances.gt_masks.tensor if hasattr(instances, "gt_masks") else None
                if masks is None:
                    raise ValueError(
                        "DIMaskDINO trains on instance masks: the dataset mapper must keep them (MODEL.MASK_ON True), "
                        "or train a detection-only model (MODEL.MASK_ON False)"
                    )
                padded = masks.new_zeros((masks.shape[0], height, width))
                padded[:, : masks.shape[1], : masks.shape[2]] = masks
                target["masks"] = padded.float()
            targets.append(target)
        return targets

    def forward(self, batched_inputs: List[Dict]):
        batch, sizes = self.preprocess([x["image"] for x in batched_inputs])
        if self.training:
            targets = self.targets(batched_inputs, batch.shape[-2:])
            return self.criterion(self.run(batch, targets=targets), targets)
        output_sizes = self.output_sizes(batched_inputs, sizes)
        found = detections_from_raw(self.detect(batch), sizes, tuple(batch.shape[-2:]), output_sizes)
        return [{"instances": detections_to_instances(f, s)} for f, s in zip(found, output_sizes)]

    @staticmethod
    def output_sizes(batched_inputs: List[Dict], sizes) -> List:
        """Each input's "height" x "width" (the original image size) when given."""
        return [(x.get("height", s[0]), x.get("width", s[1])) for x, s in zip(batched_inputs, sizes)]

    def detectron2_results(self, prediction: Predictions, batched_inputs: List[Dict], sizes, padded_size) -> List[Dict]:
        """[{"instances": detectron2 Instances}] of one output (any layer), at each input's
        original size."""
        output_sizes = self.output_sizes(batched_inputs, sizes)
        found = self.instances(prediction, sizes, padded_size, output_sizes)
        return [{"instances": detections_to_instances(f, s)} for f, s in zip(found, output_sizes)]
