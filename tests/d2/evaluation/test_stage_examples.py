"""The stage explorer's dataset side: ground truth of dataset records against pycocotools on
the COCO file itself, the imbalance of a stage by hand, and the choice of examples."""

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from di_maskdino.d2 import register_coco_instances_checked  # noqa: E402
from di_maskdino.d2.evaluation import ground_truth_of, imbalance_of, largest_imbalance  # noqa: E402
from di_maskdino.modeling.postprocess import Detections  # noqa: E402
from di_maskdino.stages import GroundTruth, Stage  # noqa: E402


def test_ground_truth_of_records_equals_the_coco_file(data_root):
    json_file = str(data_root / "synthetic" / "val.json")
    name = "stage_examples_synthetic_val"
    if name not in DatasetCatalog.list():
        register_coco_instances_checked(name, json_file, str(data_root / "synthetic" / "val"))
    records = DatasetCatalog.get(name)
    to_contiguous = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    coco = COCO(json_file)
    assert records
    for record in records:
        truth = ground_truth_of(record, (record["height"], record["width"]))
        annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=record["image_id"])) if not a["iscrowd"]]
        assert truth.boxes.shape == (len(annotations), 4)
        for i, annotation in enumerate(annotations):
            x, y, w, h = annotation["bbox"]
            torch.testing.assert_close(truth.boxes[i], torch.tensor([x, y, x + w, y + h], dtype=torch.float32))
            assert int(truth.classes[i]) == to_contiguous[annotation["category_id"]]
            assert np.array_equal(truth.masks[i].numpy(), coco.annToMask(annotation).astype(bool))


def test_records_without_annotations_have_no_ground_truth():
    assert ground_truth_of({"file_name": "x.png", "height": 4, "width": 4}, (4, 4)) is None


def square(x0, y0, x1, y1, size=20):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def stage_with(box, mask, score=0.9, label=0, name="layer 1"):
    detections = Detections(torch.tensor([score]), torch.tensor([label]), torch.tensor([box]), mask[None])
    return Stage(name, detections, None)


TRUTH = GroundTruth(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0]), square(0, 0, 10, 10)[None])


def test_imbalance_is_mask_iou_minus_box_iou():
    # box (0, 0, 10, 5): IoU 0.5 with the object; mask 10 x 8 inside it: IoU 0.8
    stage = stage_with([0.0, 0.0, 10.0, 5.0], square(0, 0, 10, 8))
    assert imbalance_of(stage, TRUTH, 0.3) == pytest.approx(0.8 - 0.5)
    assert imbalance_of(stage_with([0.0, 0.0, 10.0, 5.0], square(0, 0, 10, 8), score=0.2), TRUTH, 0.3) is None
    assert imbalance_of(stage_with([0.0, 0.0, 10.0, 5.0], square(0, 0, 10, 8), label=1), TRUTH, 0.3) is None


def test_examples_are_the_largest_imbalances_first():
    # per image: the box's height (IoU = height / 10) and the mask's (IoU = height / 10)
    shapes = {"a.png": (5, 8), "b.png": (9, 9), "c.png": (2, 10), "d.png": (6, 6)}
    records = [{"file_name": f, "height": 20, "width": 20, "annotations": []} for f in shapes]

    def predict(path):
        box, mask = shapes[path]
        return [stage_with([0.0, 0.0, 10.0, float(box)], square(0, 0, 10, mask))]

    def with_truth(record):
        annotation = {
            "bbox": [0, 0, 10, 10],
            "bbox_mode": 0,  # XYXY_ABS
            "category_id": 0,
            "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]],
            "iscrowd": 0,
        }
        return dict(record, annotations=[annotation])

    chosen = largest_imbalance(predict, [with_truth(r) for r in records], 2)
    assert [c[0]["file_name"] for c in chosen] == ["c.png", "a.png"]
    assert [round(c[2], 6) for c in chosen] == [pytest.approx(0.8), pytest.approx(0.3)]
