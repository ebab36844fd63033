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

import contextlib
import io
import math
import os
from collections import OrderedDict
from typing import Dict

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["InstanceEvaluator", "DetectorMasksEvaluator", "build_instance_evaluator"]


STANDARD_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class InstanceEvaluator(COCOEvaluator):
    """COCOEvaluator that scores an evaluation without any prediction as pycocotools would:
    AP 0 where the dataset has objects (detectron2 reports NaN), NaN where it has none."""

    def __init__(self, dataset_name: str, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        self.dataset_name = dataset_name

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        if not results:
            return results
        json_file = MetadataCatalog.get(self.dataset_name).get("json_file", None)
        for task, metrics in results.items():
            # detectron2 reports every metric as NaN when the model predicted nothing at all
            if task in ("bbox", "segm") and json_file and all(math.isnan(v) for v in metrics.values()):
                results[task] = scores_without_predictions(json_file, task, img_ids)
        return results


def scores_without_predictions(json_file: str, iou_type: str, img_ids=None) -> Dict[str, float]:
    """COCO's standard metrics (in percent, NaN where undefined) of an empty set of
    predictions on the ground truth of `json_file`, computed by pycocotools."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth = COCO(json_file)
        detections = COCO()
        detections.dataset = {
            "images": list(ground_truth.dataset["images"]),
            "categories": ground_truth.dataset["categories"],
            "annotations": [],
        }
        detections.createIndex()
        evaluation = COCOeval(ground_truth, detections, iou_type)
        if img_ids is not None:
            evaluation.params.imgIds = list(img_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(v * 100) if v >= 0 else float("nan") for name, v in zip(STANDARD_METRICS, evaluation.stats)}


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
