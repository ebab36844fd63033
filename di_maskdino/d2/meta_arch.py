"""The detectron2 meta-architecture "DIMaskDINOArch": batched detectron2 inputs in, losses
(training) or `Instances` (inference) out. It is the core network
(`di_maskdino.modeling.DIMaskDINO`, whose parameter names it keeps) plus the objective
(`SetCriterion`) and the translation from and to detectron2's structures.

With a box-conditioned mask head (MODEL.DI_MASKDINO.BOX_MASK_HEAD) the objective has two
parts, each charged only when its parameters train (MODEL.FREEZE): the detector's
`SetCriterion` and the head's `BoxMaskCriterion`. A frozen detector therefore costs one
inference pass per iteration (see `DIMaskDINO.run`) and no loss of its own.
"""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torchvision.ops import box_convert

from ..modeling import DIMaskDINO, Predictions, build_box_mask_head, build_encoder, build_head
from ..modeling.box_mask_criterion import BoxMaskCriterion
from ..modeling.criterion import SetCriterion
from ..modeling.matcher import HungarianMatcher
from ..modeling.panoptic import SegmentationInference
from ..modeling.postprocess import detections_from_raw
from .backbone import checkpoint_backbone
from .config import TEST_MASKS, architecture_from_config
from .panoptic import build_segmentation_inference, segmentation_results
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
        box_mask_head=None,
        fine_feature=None,
        box_mask_criterion: Optional[BoxMaskCriterion] = None,
        test_masks: str = "refined",
        segmentation: Optional[SegmentationInference] = None,
        winograd_convolutions: bool = True,
    ):
        super().__init__(
            backbone,
            encoder,
            head,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            size_divisibility=size_divisibility,
            test_topk=test_topk,
            box_mask_head=box_mask_head,
            fine_feature=fine_feature,
        )
        self.criterion = criterion
        self.box_mask_criterion = box_mask_criterion
        self.test_masks = test_masks
        # panoptic / semantic inference (MODEL.DI_MASKDINO.TEST); None: instances only
        self.segmentation = segmentation
        self.winograd_convolutions = winograd_convolutions  # CPU inference (TEST.WINOGRAD_CONVOLUTIONS)

    @classmethod
    def from_config(cls, cfg):
        architecture = architecture_from_config(cfg)
        backbone = build_backbone(cfg)
        if architecture.checkpointing.backbone:
            checkpoint_backbone(backbone)
        criterion = build_criterion(cfg)
        return {
            "backbone": backbone,
            "encoder": build_encoder(architecture, backbone.output_shape()),
            "head": build_head(architecture),
            "criterion": criterion,
            **box_mask_head_arguments(cfg, architecture, backbone, criterion),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.MODEL.DI_MASKDINO.SIZE_DIVISIBILITY,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
            "segmentation": build_segmentation_inference(cfg),
            "winograd_convolutions": cfg.TEST.WINOGRAD_CONVOLUTIONS,
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
            if instances.has("gt_is_thing"):  # panoptic / semantic targets: things and stuff
                target["is_thing"] = instances.gt_is_thing
            targets.append(target)
        return targets

    def forward(self, batched_inputs: List[Dict]):
        batch, sizes = self.preprocess([x["image"] for x in batched_inputs])
        if self.training:
            targets = self.targets(batched_inputs, batch.shape[-2:])
            return self.losses(self.run(batch, targets=targets), targets)
        with self.inference_convolutions(batch.shape):
            return self.inference(batched_inputs, batch, sizes)

    def inference(self, batched_inputs: List[Dict], batch: torch.Tensor, sizes: List[Tuple[int, int]]) -> List[Dict]:
        """detectron2's results of a preprocessed batch (see `forward`)."""
        output_sizes = self.output_sizes(batched_inputs, sizes)
        padded_size = tuple(batch.shape[-2:])
        if self.segmentation is not None:  # panoptic and / or semantic outputs
            prediction = self.run(batch).final
            return segmentation_results(self, self.segmentation, prediction, batched_inputs, sizes, padded_size)
        if self.box_mask_head is None or self.test_masks == "detector":
            found = detections_from_raw(self.detect(batch), sizes, padded_size, output_sizes)
            return [{"instances": detections_to_instances(f, s)} for f, s in zip(found, output_sizes)]
        output = self.run(batch)
        results = self.detectron2_results(output.final, batched_inputs, sizes, padded_size)
        refined = self.refined_instances(output, sizes, padded_size, output_sizes)
        for result, found, size in zip(results, refined, output_sizes):
            if self.test_masks == "both":
                result["detector_instances"] = result["instances"]
            result["instances"] = detections_to_instances(found, size)
        return results

    def losses(self, output, targets) -> Dict[str, torch.Tensor]:
        """The detector's losses if any of its parameters trains, the box mask head's if any
        of its parameters trains."""
        losses = self.criterion(output, targets) if self.detector_trains else {}
        head = self.box_mask_head
        if head is not None and self.box_mask_criterion is not None and any(p.requires_grad for p in head.parameters()):
            matches = self.box_mask_criterion.match(output.final, targets)
            masks = self.box_masks(output, matches.image, matches.query)
            losses.update(self.box_mask_criterion(masks, targets, matches))
        if not losses:
            raise ValueError("no parameter trains: MODEL.FREEZE freezes the whole model")
        return losses

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


def box_mask_head_arguments(cfg, architecture, backbone, criterion: SetCriterion) -> Dict:
    """DIMaskDINOArch's box-mask-head arguments (MODEL.DI_MASKDINO.BOX_MASK_HEAD): the head,
    the backbone map it fuses, its criterion (sharing the detector's matcher), test masks."""
    b = cfg.MODEL.DI_MASKDINO.BOX_MASK_HEAD
    if b.TEST_MASKS not in TEST_MASKS:
        raise ValueError(
            f"MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS must be one of {list(TEST_MASKS)}, got {b.TEST_MASKS!r}"
        )
    box_mask_criterion = BoxMaskCriterion(
        criterion.matcher,
        mask_weight=b.MASK_WEIGHT,
        dice_weight=b.DICE_WEIGHT,
        quality_weight=b.QUALITY_WEIGHT,
        num_points=b.NUM_POINTS,
        oversample_ratio=cfg.MODEL.DI_MASKDINO.LOSS.OVERSAMPLE_RATIO,
        importance_sample_ratio=cfg.MODEL.DI_MASKDINO.LOSS.IMPORTANCE_SAMPLE_RATIO,
    )
    head = build_box_mask_head(architecture, backbone.output_shape())
    return {
        "box_mask_head": head,
        "fine_feature": architecture.box_mask_head.fine_feature if head is not None else None,
        "box_mask_criterion": box_mask_criterion if head is not None else None,
        "test_masks": b.TEST_MASKS,
    }
