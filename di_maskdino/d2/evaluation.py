"""COCO evaluation of the instance outputs.

`InstanceEvaluator` is detectron2's COCOEvaluator, except that an evaluation without any
prediction scores AP 0 (as pycocotools would) instead of NaN.

With a box-conditioned mask head and MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS "both", the
meta-architecture returns, per image, "instances" (the refined masks) and
"detector_instances" (the same detections with the detector's own masks, scored by them),
and both are evaluated in one pass: the metrics of the refined masks keep detectron2's keys
("bbox", "segm"); those of the detector's masks get the suffix "_detector" ("bbox_detector",
"segm_detector"; their predictions go to `<output_dir>/detector_masks/`).
"""

import os
from collections import OrderedDict

from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

__all__ = ["InstanceEvaluator", "DetectorMasksEvaluator", "build_instance_evaluator"]


class InstanceEvaluator(COCOEvaluator):
    """COCOEvaluator that scores an evaluation without any prediction as pycocotools would:
    AP 0 where the dataset has objects (detectron2 reports NaN), NaN where it has none."""

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if coco_eval is None and getattr(self, "_do_evaluation", False):
            coco_eval = _empty_coco_eval(self._coco_api, iou_type, self._max_dets_per_image)
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)


def _empty_coco_eval(coco_gt, iou_type: str, max_dets=None):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detections = COCO()
    detections.dataset = {"images": list(coco_gt.dataset["images"]), "categories": coco_gt.dataset["categories"]}
    detections.dataset["annotations"] = []
    detections.createIndex()
    evaluation = COCOeval(coco_gt, detections, iou_type)
    if max_dets is not None:
        evaluation.params.maxDets = list(max_dets)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation


class DetectorMasksEvaluator(InstanceEvaluator):
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
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    primary = InstanceEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)
    head = cfg.MODEL.DI_MASKDINO.BOX_MASK_HEAD
    if not (head.ENABLED and head.TEST_MASKS == "both"):
        return primary
    detector = DetectorMasksEvaluator(
        dataset_name, tasks=("bbox", "segm"), output_dir=os.path.join(output_folder, "detector_masks")
    )
    return DatasetEvaluators([primary, detector])
