"""Evaluation of every supervised output in one pass (paper Fig. 1c/1d, appendix A): box
and mask AP of the initial prediction (layer 0) and of each decoder layer, and box AP of the
token-interaction outputs of the DI module. Their gap, layer by layer, is the
detection/segmentation imbalance the paper studies. For panoptic / semantic models the same
question is asked of PQ and mIoU (`evaluate_every_layer_segmentation`).
"""

from collections import OrderedDict
from typing import Dict, List

import torch
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator

from ..modeling.results import segmentation_results
from .segmentation import PanopticEvaluator

__all__ = ["evaluate_every_layer", "evaluate_every_layer_segmentation", "evaluate_outputs"]


@torch.no_grad()
def evaluate_outputs(model, data_loader, make_evaluators, results) -> "OrderedDict[str, List[Dict]]":
    """Runs every supervised output of `model` (a DIMaskDINOArch) over `data_loader` through
    its own evaluators: `make_evaluators(prediction)` gives the list for an output (made at
    its first batch), `results(prediction, inputs, sizes, padded_size)` what they process.
    Returns {output name: [each evaluator's metrics]}."""
    evaluators: Dict[str, List] = OrderedDict()
    was_training = model.training
    model.eval()
    try:
        for inputs in data_loader:
            batch, sizes = model.preprocess([x["image"] for x in inputs])
            with model.inference_context(batch.shape):
                output = model.run(batch, all_layer_masks=True, image_sizes=sizes)
            padded = tuple(batch.shape[-2:])
            for name, prediction in output.named():
                if name not in evaluators:
                    evaluators[name] = make_evaluators(prediction)
                    for evaluator in evaluators[name]:
                        evaluator.reset()
                found = results(prediction, inputs, sizes, padded)
                for evaluator in evaluators[name]:
                    evaluator.process(inputs, found)
    finally:
        model.train(was_training)
    return OrderedDict((name, [e.evaluate() or {} for e in parts]) for name, parts in evaluators.items())


def evaluate_every_layer(model, data_loader, dataset_name: str) -> "OrderedDict[str, Dict[str, float]]":
    """{output name: {"bbox": AP, "segm": AP (absent for box-only outputs)}} with COCO AP in
    percent, as detectron2's COCOEvaluator reports it. `model` is a DIMaskDINOArch."""

    def make_evaluators(prediction):
        tasks = ("bbox", "segm") if prediction.masks is not None else ("bbox",)
        return [COCOEvaluator(dataset_name, tasks=tasks, output_dir=None)]

    metrics = evaluate_outputs(model, data_loader, make_evaluators, model.detectron2_results)
    return OrderedDict(
        (name, {task: float(values["AP"]) for task, values in parts[0].items()}) for name, parts in metrics.items()
    )


@torch.no_grad()
def evaluate_every_layer_segmentation(model, data_loader, dataset_name: str) -> "OrderedDict[str, Dict[str, float]]":
    """The imbalance question asked of panoptic / semantic segmentation: per supervised
    output ("layer 0" the initial prediction, ..., "TI s.i" the token-interaction outputs)
    box AP of things ("bbox"), mask AP ("segm"), PQ / PQ_th / PQ_st and mIoU where their
    tasks are on (outputs without masks: box AP only). `model` is a DIMaskDINOArch with
    panoptic or semantic inference."""
    inference = model.segmentation
    if inference is None:
        raise ValueError("evaluate_every_layer_segmentation needs MODEL.DI_MASKDINO.TEST.PANOPTIC_ON or SEMANTIC_ON")

    def make_evaluators(prediction):
        parts, with_masks = [], prediction.masks is not None
        if inference.instance:
            tasks = ("bbox", "segm") if with_masks else ("bbox",)
            parts.append(COCOEvaluator(dataset_name, tasks=tasks, output_dir=None))
        if with_masks and inference.panoptic:
            parts.append(PanopticEvaluator(dataset_name))
        if with_masks and inference.semantic:
            parts.append(SemSegEvaluator(dataset_name, distributed=True))
        return parts

    def results(prediction, inputs, sizes, padded):
        return segmentation_results(model, inference, prediction, inputs, sizes, padded)

    table = OrderedDict()
    for name, parts in evaluate_outputs(model, data_loader, make_evaluators, results).items():
        row = {}
        for metrics in parts:
            for task in ("bbox", "segm"):
                if task in metrics:
                    row[task] = float(metrics[task]["AP"])
            if "panoptic_seg" in metrics:
                row.update({k: float(metrics["panoptic_seg"][k]) for k in ("PQ", "PQ_th", "PQ_st")})
            if "sem_seg" in metrics:
                row["mIoU"] = float(metrics["sem_seg"]["mIoU"])
        table[name] = row
    return table
