"""COCO evaluation of the detector's masks and the box-conditioned mask head's masks in one
pass (MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS "both").

The meta-architecture then returns, per image, "instances" (the refined masks) and
"detector_instances" (the same detections with the detector's own masks, scored by them).
Two COCOEvaluators read them: the metrics of the refined masks keep detectron2's keys
("bbox", "segm"); those of the detector's masks get the suffix "_detector" ("bbox_detector",
"segm_detector"; their predictions go to `<output_dir>/detector_masks/`).
"""

import os
from collections import OrderedDict

from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

__all__ = ["DetectorMasksEvaluator", "build_instance_evaluator"]


class DetectorMasksEvaluator(COCOEvaluator):
    """COCOEvaluator of each output's "detector_instances", its metrics keyed "<task>_detector"."""

    def process(self, inputs, outputs):
        missing = [i for i, output in enumerate(outputs) if "detector_instances" not in output]
        if missing:
            raise ValueError(
                "DetectorMasksEvaluator: the model gave no 'detector_instances'; they come with "
                "MODEL.DI_MASKDINO.BOX_MASK_HEAD.ENABLED True and TEST_MASKS 'both'"
            )
        super().process(inputs, [{"instances": output["detector_instances"]} for output in outputs])

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        if not results:
            return results
        return OrderedDict((f"{task}_detector", metrics) for task, metrics in results.items())


def build_instance_evaluator(cfg, dataset_name: str, output_folder: str):
    """COCO box and mask AP of the model's "instances"; with a box mask head and TEST_MASKS
    "both", also of its "detector_instances"."""
    primary = COCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder)
    head = cfg.MODEL.DI_MASKDINO.BOX_MASK_HEAD
    if not (head.ENABLED and head.TEST_MASKS == "both"):
        return primary
    detector = DetectorMasksEvaluator(
        dataset_name, tasks=("bbox", "segm"), output_dir=os.path.join(output_folder, "detector_masks")
    )
    return DatasetEvaluators([primary, detector])
