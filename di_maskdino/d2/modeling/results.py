"""The model's outputs as detectron2 results: `Detections` as `Instances`, and the
"instances" / "panoptic_seg" / "sem_seg" results of panoptic and semantic inference."""

from typing import Tuple

from detectron2.structures import Boxes, Instances

from ...modeling.postprocess import Detections
from ...modeling.segmentation_inference import SegmentationInference

__all__ = ["detections_to_instances", "segmentation_results"]


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


def segmentation_results(model, inference: SegmentationInference, prediction, batched_inputs, sizes, padded_size):
    """[{"instances", "panoptic_seg": (ids (H, W) int32, segments_info), "sem_seg": (K, H, W)}]
    of one output of `model` (a DIMaskDINOArch), each present when its task is on, at each
    input's "height" x "width". Instances are the model's own (things only when the classes
    include stuff); outputs without masks give instances only."""
    results = [{} for _ in batched_inputs]
    if inference.instance:
        results = model.detectron2_results(prediction, batched_inputs, sizes, padded_size)
        if inference.has_stuff:
            for result in results:
                instances = result["instances"]
                result["instances"] = instances[
                    inference.is_thing.to(instances.pred_classes.device)[instances.pred_classes]
                ]
    if prediction.masks is None:
        return results
    prediction = model.canvas_frame(prediction, sizes, padded_size)  # a padding mask's frame -> the padded one
    output_sizes = [(x.get("height", s[0]), x.get("width", s[1])) for x, s in zip(batched_inputs, sizes)]
    for index, result in enumerate(results):
        found = inference.segmentation(
            prediction.logits[index],
            prediction.masks[index],
            tuple(sizes[index]),
            tuple(padded_size),
            output_sizes[index],
        )
        if found.panoptic is not None:
            segments = [
                {"id": s.id, "category_id": s.category_id, "isthing": s.isthing} for s in found.panoptic.segments
            ]
            result["panoptic_seg"] = (found.panoptic.ids, segments)
        if found.semantic is not None:
            result["sem_seg"] = found.semantic
    return results
