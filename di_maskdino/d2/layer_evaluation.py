"""COCO evaluation of every supervised output in one pass (paper Fig. 1c/1d, appendix A):
box and mask AP of the initial prediction (layer 0) and of each decoder layer, and box AP of
the token-interaction outputs of the DI module. Their gap, layer by layer, is the
detection/segmentation imbalance the paper studies.
"""

from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
from detectron2.evaluation import COCOEvaluator

from ..modeling.outputs import DIMaskDINOOutput, Predictions

__all__ = ["evaluate_every_layer", "named_outputs"]


def named_outputs(output: DIMaskDINOOutput) -> List[Tuple[str, Predictions]]:
    """("layer 0", initial prediction), ("layer 1", ...), ..., ("TI s.i", token interaction)."""
    named = [(f"layer {i}", p) for i, p in enumerate(output.layers)]
    for s, stage in enumerate(output.token_interaction):
        named += [(f"TI {s}.{i}", p) for i, p in enumerate(stage)]
    return named


@torch.no_grad()
def evaluate_every_layer(model, data_loader, dataset_name: str) -> "OrderedDict[str, Dict[str, float]]":
    """{output name: {"bbox": AP, "segm": AP (absent for box-only outputs)}} with COCO AP in
    percent, as detectron2's COCOEvaluator reports it. `model` is a DIMaskDINOArch."""
    evaluators: Dict[str, COCOEvaluator] = OrderedDict()
    was_training = model.training
    model.eval()
    try:
        for inputs in data_loader:
            batch, sizes = model.preprocess([x["image"] for x in inputs])
            output = model.run(batch, all_layer_masks=True)
            padded = tuple(batch.shape[-2:])
            for name, prediction in named_outputs(output):
                if name not in evaluators:
                    tasks = ("bbox", "segm") if prediction.masks is not None else ("bbox",)
                    evaluators[name] = COCOEvaluator(dataset_name, tasks=tasks, output_dir=None)
                    evaluators[name].reset()
                evaluators[name].process(inputs, model.detectron2_results(prediction, inputs, sizes, padded))
    finally:
        model.train(was_training)
    table = OrderedDict()
    for name, evaluator in evaluators.items():
        metrics = evaluator.evaluate() or {}
        table[name] = {task: float(values["AP"]) for task, values in metrics.items()}
    return table
