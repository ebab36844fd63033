"""Evaluation: COCO box / mask AP of the instances (`instance.py`), PQ and mIoU of panoptic
and semantic outputs (`segmentation.py`), and every supervised output at once, the paper's
per-layer view of the imbalance (`per_layer.py`), and the ground truth and the examples of
the stage explorer (`stage_examples.py`)."""

from .instance import DetectorMasksEvaluator, InstanceEvaluator, build_instance_evaluator
from .per_layer import evaluate_every_layer, evaluate_every_layer_segmentation, evaluate_outputs
from .segmentation import PanopticEvaluator, build_segmentation_evaluators, pq_backend
from .stage_examples import ground_truth_of, imbalance_of, largest_imbalance

__all__ = [
    "InstanceEvaluator",
    "DetectorMasksEvaluator",
    "build_instance_evaluator",
    "PanopticEvaluator",
    "build_segmentation_evaluators",
    "pq_backend",
    "evaluate_outputs",
    "evaluate_every_layer",
    "evaluate_every_layer_segmentation",
    "ground_truth_of",
    "imbalance_of",
    "largest_imbalance",
]
