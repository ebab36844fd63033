"""The core's `Detections` as detectron2 `Instances`."""

from typing import Tuple

from detectron2.structures import Boxes, Instances

from ..modeling.postprocess import Detections

__all__ = ["detections_to_instances"]


def detections_to_instances(found: Detections, image_size: Tuple[int, int]) -> Instances:
    """Instances of an image of `image_size` (H, W): scores, pred_classes, pred_boxes and,
    unless the model is detection-only, pred_masks."""
    instances = Instances(tuple(image_size))
    instances.scores = found.scores
    instances.pred_classes = found.labels
    instances.pred_boxes = Boxes(found.boxes)
    if found.masks is not None:
        instances.pred_masks = found.masks
    return instances
