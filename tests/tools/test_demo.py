"""tools/demo.py's dataset terms and records, in process (the demo runs end to end in the slow
tests of test_tools.py and test_panoptic_tools.py): labels become the dataset's category ids
and names for instance models and for panoptic models under both metadata conventions."""

import types

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from di_maskdino.d2 import load_config  # noqa: E402
from tests.tooling import QUICK, load_script  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    return load_script("demo.py", "di_maskdino_demo")


def config(dataset, panoptic):
    cfg = load_config(QUICK, ["DATASETS.TEST", f"('{dataset}',)", "MODEL.DI_MASKDINO.NUM_CLASSES", "4"])
    cfg.MODEL.DI_MASKDINO.TEST.PANOPTIC_ON = panoptic
    return cfg


NO_PREDICTOR_NAMES = types.SimpleNamespace(class_names=[])


def test_instance_model_uses_the_thing_ids_and_names(demo):
    MetadataCatalog.get("demo_terms_instances").set(
        thing_classes=["cat", "dog"], thing_dataset_id_to_contiguous_id={7: 0, 9: 1}
    )
    terms = demo.DatasetTerms(config("demo_terms_instances", False), NO_PREDICTOR_NAMES)
    assert [terms.category(label) for label in (0, 1)] == [(7, "cat"), (9, "dog")]
    assert terms.metadata.thing_classes == ["cat", "dog"] and not terms.note


@pytest.mark.parametrize(
    "stuff_map",
    [{7: 0, 9: 1, 11: 2, 12: 3}, {11: 2, 12: 3}],
    ids=["stuff_map_of_every_class", "stuff_map_of_stuff_only"],  # ours; detectron2's COCO / Cityscapes
)
def test_panoptic_model_names_every_class_under_both_conventions(demo, stuff_map):
    name = f"demo_terms_panoptic_{len(stuff_map)}"
    MetadataCatalog.get(name).set(
        thing_classes=["cat", "dog"],
        stuff_classes=["cat", "dog", "sky", "road"],
        thing_dataset_id_to_contiguous_id={7: 0, 9: 1},
        stuff_dataset_id_to_contiguous_id=stuff_map,
    )
    terms = demo.DatasetTerms(config(name, True), NO_PREDICTOR_NAMES)
    assert [terms.category(label) for label in range(4)] == [(7, "cat"), (9, "dog"), (11, "sky"), (12, "road")]
    assert terms.metadata.thing_classes == ["cat", "dog", "sky", "road"]  # what the Visualizer names labels by


def test_exported_model_without_a_config_uses_its_stored_names(demo):
    terms = demo.DatasetTerms(None, types.SimpleNamespace(class_names=["a", "b"]))
    assert terms.category(1) == (1, "b") and "0-based" in terms.note


def test_records_of_a_detection_only_model_have_no_segmentation(demo):
    MetadataCatalog.get("demo_terms_boxes").set(thing_classes=["cat"], thing_dataset_id_to_contiguous_id={7: 0})
    terms = demo.DatasetTerms(config("demo_terms_boxes", False), NO_PREDICTOR_NAMES)
    instances = Instances((20, 30))
    instances.scores = torch.tensor([0.9])
    instances.pred_classes = torch.tensor([0])
    instances.pred_boxes = Boxes(torch.tensor([[1.0, 2.0, 11.0, 7.0]]))
    (record,) = demo.coco_results(instances, "a.png", 3, terms)
    assert record == {
        "image_id": 3,
        "category_id": 7,
        "bbox": [1.0, 2.0, 10.0, 5.0],
        "score": pytest.approx(0.9),
        "category_name": "cat",
        "file_name": "a.png",
    }
    instances.pred_masks = torch.zeros(1, 20, 30, dtype=torch.bool)
    instances.pred_masks[0, 2:7, 1:11] = True
    (record,) = demo.coco_results(instances, "a.png", 3, terms)
    assert record["segmentation"]["size"] == [20, 30]
