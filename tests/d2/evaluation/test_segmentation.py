"""Panoptic and semantic evaluation and inference settings in the detectron2 layer: PQ of a
perfect and of a hand-computed partial prediction, with panopticapi and with hotcoco."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.evaluation import DatasetEvaluators  # noqa: E402
from PIL import Image  # noqa: E402

from di_maskdino.d2 import DatasetError, add_di_maskdino_config, register_coco_panoptic_checked  # noqa: E402
from di_maskdino.d2.evaluation import PanopticEvaluator, build_segmentation_evaluators  # noqa: E402
from di_maskdino.d2.modeling import build_segmentation_inference  # noqa: E402
from di_maskdino.panoptic_format import id_to_rgb  # noqa: E402
from tests.tooling import ROOT  # noqa: E402

CATEGORIES = [
    {"id": 1, "name": "a", "isthing": 1},
    {"id": 2, "name": "b", "isthing": 1},
    {"id": 3, "name": "s", "isthing": 0},
]


def ground_truth():
    """10 x 10: stuff s (category 3) on rows 0-4, things a (category 1) on rows 5-9 x cols
    0-4 (id 2) and on rows 5-9 x cols 5-9 (id 3)."""
    ids = np.zeros((10, 10), dtype=np.int64)
    ids[:5] = 1
    ids[5:, :5] = 2
    ids[5:, 5:] = 3
    segments = [
        {"id": 1, "category_id": 3, "iscrowd": 0, "area": 50, "bbox": [0, 0, 10, 5]},
        {"id": 2, "category_id": 1, "iscrowd": 0, "area": 25, "bbox": [0, 5, 5, 5]},
        {"id": 3, "category_id": 1, "iscrowd": 0, "area": 25, "bbox": [5, 5, 5, 5]},
    ]
    return ids, segments


def register(tmp_path, name):
    ids, segments = ground_truth()
    (tmp_path / "images").mkdir()
    (tmp_path / "panoptic").mkdir()
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(tmp_path / "images" / "1.png")
    Image.fromarray(id_to_rgb(ids)).save(tmp_path / "panoptic" / "1.png")
    content = {
        "images": [{"id": 1, "file_name": "1.png", "height": 10, "width": 10}],
        "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": segments}],
        "categories": CATEGORIES,
    }
    (tmp_path / "panoptic.json").write_text(json.dumps(content))
    register_coco_panoptic_checked(
        name,
        image_root=str(tmp_path / "images"),
        panoptic_root=str(tmp_path / "panoptic"),
        panoptic_json=str(tmp_path / "panoptic.json"),
        categories=CATEGORIES,
    )
    return {"file_name": str(tmp_path / "images" / "1.png"), "image_id": 1}


def evaluate(name, item, ids, segments, backend):
    evaluator = PanopticEvaluator(name, backend=backend)
    evaluator.reset()
    evaluator.process([item], [{"panoptic_seg": (torch.as_tensor(ids, dtype=torch.int32), segments)}])
    return evaluator.evaluate()["panoptic_seg"]


def backend_or_skip(backend):
    pytest.importorskip(
        backend,
        reason=f"{backend} is not installed (panopticapi: pip install from its repository, see README; "
        "hotcoco: pip install hotcoco)",
    )
    return backend


@pytest.mark.parametrize("backend", ["panopticapi", "hotcoco"])
def test_pq_of_a_perfect_and_of_a_partial_prediction(tmp_path, backend):
    backend_or_skip(backend)
    name = f"test_panoptic_pq_{backend}"
    item = register(tmp_path, name)
    ids, _ = ground_truth()
    # contiguous classes: a 0, b 1 (things), s 2 (stuff)
    perfect = [
        {"id": 1, "category_id": 2, "isthing": False},
        {"id": 2, "category_id": 0, "isthing": True},
        {"id": 3, "category_id": 0, "isthing": True},
    ]
    metrics = evaluate(name, item, ids, perfect, backend)
    assert metrics["PQ"] == pytest.approx(100) and metrics["PQ_th"] == pytest.approx(100)
    assert metrics["PQ_st"] == pytest.approx(100)

    # partial: s on rows 0-3 (IoU 40/50 = .8), a on rows 5-9 x cols 0-2 (IoU 15/25 = .6),
    # the second a predicted as class b (no match: a false negative for a, a false positive
    # for b), void elsewhere.
    predicted = np.zeros((10, 10), dtype=np.int64)
    predicted[:4] = 1
    predicted[5:, :3] = 2
    predicted[5:, 5:] = 3
    partial = [
        {"id": 1, "category_id": 2, "isthing": False},
        {"id": 2, "category_id": 0, "isthing": True},
        {"id": 3, "category_id": 1, "isthing": True},
    ]
    metrics = evaluate(name, item, predicted, partial, backend)
    # per class PQ = sum of matched IoUs / (TP + FP/2 + FN/2):
    # a: .6 / (1 + .5) = .4; b: 0 / (0 + .5) = 0; s: .8 / 1 = .8
    assert metrics["PQ"] == pytest.approx(100 * (0.4 + 0.0 + 0.8) / 3)
    assert metrics["PQ_th"] == pytest.approx(100 * (0.4 + 0.0) / 2)
    assert metrics["PQ_st"] == pytest.approx(80)
    assert metrics["SQ_st"] == pytest.approx(80) and metrics["RQ_st"] == pytest.approx(100)
    # a: SQ .6, RQ 1 / 1.5; b: SQ 0, RQ 0
    assert metrics["SQ_th"] == pytest.approx(100 * 0.6 / 2) and metrics["RQ_th"] == pytest.approx(100 / 3)


def test_panopticapi_and_hotcoco_agree_on_a_random_case(tmp_path):
    """Both backends on the same prediction (segments of random blocks, classes shuffled)."""
    backend_or_skip("panopticapi")
    backend_or_skip("hotcoco")
    name = "test_panoptic_agree"
    item = register(tmp_path, name)
    rng = np.random.default_rng(0)
    predicted = rng.integers(0, 5, size=(10, 10))
    predicted[:4] = 1  # a large stuff-like segment
    segments = [
        {"id": i, "category_id": int(rng.integers(0, 3)), "isthing": None}
        for i in range(1, 5)
        if (predicted == i).any()
    ]
    for segment in segments:
        segment["isthing"] = segment["category_id"] != 2
    results = {b: evaluate(name, item, predicted, [dict(s) for s in segments], b) for b in ("panopticapi", "hotcoco")}
    for key in results["panopticapi"]:
        assert results["hotcoco"][key] == pytest.approx(results["panopticapi"][key], abs=1e-9), key


def test_the_pq_backend_error_says_how_to_install(monkeypatch):
    import builtins

    from di_maskdino.d2.evaluation import pq_backend

    real_import = builtins.__import__

    def no_pq(name, *args, **kwargs):
        if name in ("panopticapi", "hotcoco"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pq)
    with pytest.raises(ImportError, match="panopticapi.*hotcoco"):
        pq_backend()
    with pytest.raises(ValueError, match="unknown PQ backend"):
        pq_backend("other")


def segmentation_cfg(dataset, num_classes, **test):
    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    cfg.DATASETS.TEST = (dataset,)
    cfg.MODEL.DI_MASKDINO.NUM_CLASSES = num_classes
    for key, value in test.items():
        cfg.MODEL.DI_MASKDINO.TEST[key] = value
    return cfg


def test_inference_settings_from_the_config(tmp_path):
    register(tmp_path, "test_panoptic_settings")
    # instances only: no segmentation inference (the model's instance path as before)
    assert build_segmentation_inference(segmentation_cfg("test_panoptic_settings", 3)) is None
    assert (
        build_segmentation_evaluators(segmentation_cfg("test_panoptic_settings", 3), "test_panoptic_settings") is None
    )
    cfg = segmentation_cfg("test_panoptic_settings", 3, PANOPTIC_ON=True, INSTANCE_ON=False, TEMPERATURE=0.0)
    inference = build_segmentation_inference(cfg)
    assert inference.is_thing.tolist() == [True, True, False]
    assert inference.panoptic and not inference.instance and not inference.semantic
    assert inference.temperature is None and inference.object_mask_threshold == 0.25
    evaluators = build_segmentation_evaluators(cfg, "test_panoptic_settings")
    if importlib.util.find_spec("panopticapi") or importlib.util.find_spec("hotcoco"):
        assert isinstance(evaluators, DatasetEvaluators)
        assert [type(e).__name__ for e in evaluators._evaluators] == ["PanopticEvaluator"]
    # ADE20K's semantic split (registered by detectron2): every class is stuff
    ade = build_segmentation_inference(segmentation_cfg("ade20k_sem_seg_val", 150, SEMANTIC_ON=True))
    assert ade.semantic and not bool(ade.is_thing.any())


@pytest.mark.parametrize(
    "dataset,num_classes,test,message",
    [
        ("test_panoptic_errors", 4, {"PANOPTIC_ON": True}, "has 3 classes but MODEL.DI_MASKDINO.NUM_CLASSES is 4"),
        ("coco_2017_val", 80, {"SEMANTIC_ON": True}, "no 'stuff_classes'"),
    ],
)
def test_inference_settings_errors(tmp_path, dataset, num_classes, test, message):
    if "test_panoptic_errors" not in DatasetCatalog.list():
        register(tmp_path, "test_panoptic_errors")
    with pytest.raises(ValueError, match=message):
        build_segmentation_inference(segmentation_cfg(dataset, num_classes, **test))


def test_evaluators_need_the_annotations_of_their_task(tmp_path):
    register(tmp_path, "test_panoptic_evaluators")
    with pytest.raises(ValueError, match="no instance annotations"):
        build_segmentation_evaluators(
            segmentation_cfg("test_panoptic_evaluators", 3, PANOPTIC_ON=True), "test_panoptic_evaluators"
        )
    with pytest.raises(ValueError, match="no semantic maps"):
        build_segmentation_evaluators(
            segmentation_cfg("test_panoptic_evaluators", 3, SEMANTIC_ON=True, INSTANCE_ON=False),
            "test_panoptic_evaluators",
        )


def test_missing_panoptic_files_are_named(tmp_path):
    register_coco_panoptic_checked(
        "test_panoptic_missing",
        image_root=str(tmp_path),
        panoptic_root=str(tmp_path / "nowhere"),
        panoptic_json=str(tmp_path / "panoptic.json"),
        categories=CATEGORIES,
        how_to_create="Create it with: a command",
    )
    with pytest.raises(DatasetError, match=r"panoptic annotation file .*panoptic.json does not exist. Create it"):
        DatasetCatalog.get("test_panoptic_missing")


def test_the_model_gives_every_output_and_trains_on_things_and_stuff():
    """The panoptic quick-start model (random weights): instances of thing classes only, a
    panoptic id map with its segments and per-pixel class scores at the input's size; its
    training losses charge stuff targets with class and mask losses, things also with boxes."""
    from detectron2.structures import BitMasks, Instances

    from di_maskdino.d2 import DIMaskDINOArch, load_config

    cfg = load_config(os.path.join(ROOT, "configs", "quick_start_panoptic.yaml"), ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = DIMaskDINOArch(cfg).eval()
    assert model.segmentation.is_thing.tolist() == [True, True, True, False, False]
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        (result,) = model([{"image": image, "height": 32, "width": 48}])
    assert set(result) == {"instances", "panoptic_seg", "sem_seg"}
    assert result["instances"].image_size == (32, 48)
    assert set(result["instances"].pred_classes.tolist()) <= {0, 1, 2}
    ids, segments = result["panoptic_seg"]
    assert ids.shape == (32, 48) and ids.dtype == torch.int32
    assert sorted(set(ids.unique().tolist()) - {0}) == [s["id"] for s in segments]
    assert all(s["isthing"] == (s["category_id"] < 3) for s in segments)
    assert result["sem_seg"].shape == (5, 32, 48)

    model.train()
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, :20] = True  # sky (stuff)
    masks[1, 30:50, 10:40] = True  # a rectangle (thing)
    instances = Instances((64, 96))
    instances.gt_classes = torch.tensor([3, 0])
    instances.gt_masks = BitMasks(masks)
    instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
    instances.gt_is_thing = torch.tensor([False, True])
    targets = model.targets([{"image": image, "instances": instances}], (64, 96))
    assert targets[0]["is_thing"].tolist() == [False, True]
    losses = model([{"image": image, "instances": instances}])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_bbox"] > 0
