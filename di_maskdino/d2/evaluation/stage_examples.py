"""Ground truth of dataset records for the stage explorer, and the images of a dataset where
the first decoder layer's imbalance is largest (the examples of
`tools/analyze_imbalance.py --html`)."""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from detectron2.data.detection_utils import annotations_to_instances

from ...stages import GroundTruth, Stage, match_ground_truth

__all__ = ["ground_truth_of", "imbalance_of", "largest_imbalance"]


def ground_truth_of(record: Dict, size: Tuple[int, int]) -> Optional[GroundTruth]:
    """The non-crowd objects of a detectron2 dataset record (its "annotations", with the
    dataset's contiguous class ids) at the image size (H, W); masks where every object has a
    segmentation. None when the record has no annotations (e.g. panoptic records)."""
    if "annotations" not in record:
        return None
    objects = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
    with_masks = bool(objects) and all("segmentation" in a for a in objects)
    instances = annotations_to_instances(objects, size, mask_format="bitmask" if with_masks else "polygon")
    masks = instances.gt_masks.tensor.bool() if with_masks else None
    return GroundTruth(instances.gt_boxes.tensor.float(), instances.gt_classes, masks)


def imbalance_of(stage: Stage, truth: GroundTruth, threshold: float) -> Optional[float]:
    """Mean over the stage's detections scoring at least `threshold` that match an object of
    (mask IoU - box IoU) with that object: positive where masks are better than boxes (the
    imbalance the paper describes at the first decoder layer). None without matches or masks."""
    if not stage.has_masks or truth.masks is None:
        return None
    kept = stage.detections.filtered(threshold)
    match = match_ground_truth(kept, truth.boxes, truth.classes, truth.masks)
    matched = match.index >= 0
    if not bool(matched.any()):
        return None
    return float((match.mask_iou[matched] - match.box_iou[matched]).mean())


def largest_imbalance(
    predict: Callable[[str], List[Stage]],
    records: Sequence[Dict],
    count: int,
    stage: str = "layer 1",
    threshold: float = 0.3,
) -> List[Tuple[Dict, List[Stage], float]]:
    """The `count` records whose `stage` has the largest `imbalance_of`, largest first, as
    (record, stages, imbalance). predict: an image file -> its stages."""
    scored = []
    for record in records:
        stages = predict(record["file_name"])
        found = next((s for s in stages if s.name == stage), None)
        truth = ground_truth_of(record, (record["height"], record["width"]))
        if found is None or truth is None:
            continue
        value = imbalance_of(found, truth, threshold)
        if value is not None:
            scored.append((record, stages, value))
    scored.sort(key=lambda item: -item[2])
    return scored[:count]
