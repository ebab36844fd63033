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

from ...cpu_inference import CPUInference, speedups_context
from ...modeling import (
    DIMaskDINO,
    Predictions,
    build_box_mask_criterion,
    build_criterion,
    build_parts,
)
from ...modeling.box_mask_criterion import BoxMaskCriterion
from ...modeling.criterion import SetCriterion
from ...modeling.postprocess import detections_from_raw
from ...modeling.segmentation_inference import SegmentationInference
from ..config import architecture_from_config, objective_from_config
from .backbone_builders import checkpoint_backbone
from .inference_settings import build_segmentation_inference
from .results import detections_to_instances, segmentation_results

__all__ = ["DIMaskDINOArch"]


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
        cpu_inference: Optional[CPUInference] = None,
        padding_mask: bool = False,
    ):
        """`DIMaskDINO`'s arguments, and: criterion, box_mask_criterion: the objective's
        parts; cpu_inference: the CPU speed-ups evaluation runs with (TEST.CPU_SPEEDUPS), or
        None."""
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
            test_masks=test_masks,
            segmentation=segmentation,
            padding_mask=padding_mask,
        )
        self.criterion = criterion
        self.box_mask_criterion = box_mask_criterion
        self.cpu_inference = cpu_inference

    @classmethod
    def from_config(cls, cfg):
        architecture = architecture_from_config(cfg)
        objective = objective_from_config(cfg)
        backbone = build_backbone(cfg)
        if architecture.checkpointing.backbone:
            checkpoint_backbone(backbone)
        criterion = build_criterion(objective)
        return {
            "backbone": backbone,
            **build_parts(architecture, backbone.output_shape()),
            "criterion": criterion,
            "box_mask_criterion": build_box_mask_criterion(objective, criterion.matcher),
            "test_masks": cfg.MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.MODEL.DI_MASKDINO.SIZE_DIVISIBILITY,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
            "segmentation": build_segmentation_inference(cfg),
            "cpu_inference": CPUInference() if cfg.TEST.CPU_SPEEDUPS else None,
        }

    def inference_context(self, batch_shape):
        """The context an evaluation forward pass on a batch of shape (B, 3, H, W) runs in:
        that of `cpu_inference` (Winograd convolutions on the CPU for large inputs), or none."""
        return speedups_context(self.cpu_inference, batch_shape, self.device)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def targets(self, batched_inputs: List[Dict], padded_size) -> List[Dict[str, torch.Tensor]]:
        """detectron2 Instances -> targets with boxes normalised by the padded input size
        (the frame the network predicts in) and, unless the model is detection-only, masks
        padded to it. With a padding mask, the boxes are normalised by each image (the frame
        that model predicts in)."""
        # NOTE: the release normalises the boxes by each image's unpadded size, while its
        # predictions (and the masks) live in the padded frame; the two agree when every image of
        # the batch has the padded size (LSJ's fixed crops) and differ by 0.5-2% otherwise
        # (resize mappers). Normalising by the padded size keeps targets and predictions in one
        # frame, on purpose (docs/design.md, "Departures from the paper").
        height, width = padded_size
        dtype = self.pixel_mean.dtype  # float32, or the model's (float64) dtype
        targets = []
        for item in batched_inputs:
            instances = item["instances"].to(self.device)
            image_height, image_width = item["image"].shape[-2:]
            frame = (image_width, image_height) if self.padding_mask else (width, height)
            scale = torch.tensor(frame * 2, dtype=dtype, device=self.device)
            boxes = box_convert(instances.gt_boxes.tensor.to(dtype), "xyxy", "cxcywh") / scale
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
                target["masks"] = padded.to(dtype)
            if instances.has("gt_is_thing"):  # panoptic / semantic targets: things and stuff
                target["is_thing"] = instances.gt_is_thing
            targets.append(target)
        return targets

    def forward(self, batched_inputs: List[Dict], num_objects: Optional[float] = None):
        """Training: the losses (`num_objects`: the criterion's normaliser when it spans more
        than this batch, see `SetCriterion.forward`); inference: detectron2's results."""
        batch, sizes = self.preprocess([x["image"] for x in batched_inputs])
        if self.training:
            targets = self.targets(batched_inputs, batch.shape[-2:])
            return self.losses(self.run(batch, targets=targets, image_sizes=sizes), targets, num_objects)
        with self.inference_context(batch.shape):
            return self.inference(batched_inputs, batch, sizes)

    def inference(self, batched_inputs: List[Dict], batch: torch.Tensor, sizes: List[Tuple[int, int]]) -> List[Dict]:
        """detectron2's results of a preprocessed batch (see `forward`)."""
        output_sizes = self.output_sizes(batched_inputs, sizes)
        padded_size = tuple(batch.shape[-2:])
        if self.segmentation is not None:  # panoptic and / or semantic outputs
            prediction = self.run(batch, image_sizes=sizes).final
            return segmentation_results(self, self.segmentation, prediction, batched_inputs, sizes, padded_size)
        if self.box_mask_head is None or self.test_masks == "detector":
            image_sizes = torch.tensor(sizes, dtype=torch.long) if self.padding_mask else None
            found = detections_from_raw(self.detect(batch, image_sizes), sizes, padded_size, output_sizes)
            return [{"instances": detections_to_instances(f, s)} for f, s in zip(found, output_sizes)]
        output = self.run(batch)
        results = self.detectron2_results(output.final, batched_inputs, sizes, padded_size)
        refined = self.refined_instances(output, sizes, padded_size, output_sizes)
        for result, found, size in zip(results, refined, output_sizes):
            if self.test_masks == "both":
                result["detector_instances"] = result["instances"]
            result["instances"] = detections_to_instances(found, size)
        return results

    def losses(self, output, targets, num_objects: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """The detector's losses if any of its parameters trains, the box mask head's if any
        of its parameters trains."""
        losses = self.criterion(output, targets, num_objects) if self.detector_trains else {}
        head = self.box_mask_head
        if head is not None and self.box_mask_criterion is not None and any(p.requires_grad for p in head.parameters()):
            matches = self.box_mask_criterion.match(output.final, targets)
            masks = self.box_masks(output, matches.image, matches.query)
            losses.update(self.box_mask_criterion(masks, targets, matches, num_objects))
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
