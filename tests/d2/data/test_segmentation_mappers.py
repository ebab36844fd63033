"""Panoptic and semantic dataset mapping, the synthetic panoptic dataset and its registration."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from PIL import Image  # noqa: E402

from di_maskdino.d2 import add_di_maskdino_config, build_mapper  # noqa: E402
from di_maskdino.d2.data import DIMaskDINODatasetMapper, PanopticDatasetMapper, SemanticDatasetMapper  # noqa: E402
from di_maskdino.d2.data.datasets import register_coco_panoptic_checked  # noqa: E402
from di_maskdino.panoptic_format import id_to_rgb, rgb_to_id  # noqa: E402
from di_maskdino.synthetic import PANOPTIC_CATEGORIES, render_panoptic_scene  # noqa: E402
from tests.tooling import ROOT  # noqa: E402


def panoptic_record(tmp_path, seed=0):
    """A synthetic panoptic scene (sky, ground, things; the first thing a crowd region) as a
    detectron2 panoptic record (contiguous classes, isthing)."""
    rng = np.random.default_rng(seed)
    image, ids, segments = render_panoptic_scene(rng, 96, 128, num_objects=4, crowd_probability=0.0)
    first_thing = next(s for s in segments if PANOPTIC_CATEGORIES[s["category"]]["isthing"])
    first_thing["iscrowd"] = 1
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(id_to_rgb(ids)).save(tmp_path / "panoptic.png")
    record = {
        "file_name": str(tmp_path / "image.png"),
        "height": 96,
        "width": 128,
        "image_id": 1,
        "pan_seg_file_name": str(tmp_path / "panoptic.png"),
        "segments_info": [
            {
                "id": s["id"],
                "category_id": s["category"],
                "iscrowd": s["iscrowd"],
                "isthing": bool(PANOPTIC_CATEGORIES[s["category"]]["isthing"]),
            }
            for s in segments
        ],
    }
    return record, image, ids, segments


def config(**input_keys):
    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    cfg.MODEL.DI_MASKDINO.NUM_CLASSES = 5
    for key, value in input_keys.items():
        cfg.INPUT[key] = value
    return cfg


def test_id_colour_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536 + 7, 256**3 - 1]])
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    assert id_to_rgb(np.array([[256 + 2]]))[0, 0].tolist() == [2, 1, 0]


def test_panoptic_mapper_segments_classes_and_crowd(tmp_path):
    record, image, ids, segments = panoptic_record(tmp_path)
    mapper = PanopticDatasetMapper(True, augmentations=[], image_format="RGB", num_classes=5)
    out = mapper(record)
    assert torch.equal(out["image"], torch.from_numpy(image).permute(2, 0, 1))
    instances = out["instances"]
    kept = [s for s in segments if not s["iscrowd"]]
    assert len(kept) == len(segments) - 1  # the crowd thing is no target
    assert instances.gt_classes.tolist() == [s["category"] for s in kept]
    assert instances.gt_is_thing.tolist() == [bool(PANOPTIC_CATEGORIES[s["category"]]["isthing"]) for s in kept]
    assert {PANOPTIC_CATEGORIES[c]["name"] for c in instances.gt_classes.tolist()} >= {"sky", "ground"}
    for mask, box, segment in zip(instances.gt_masks.tensor, instances.gt_boxes.tensor, kept):
        expected = ids == segment["id"]
        assert np.array_equal(mask.numpy(), expected)
        ys, xs = np.nonzero(expected)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_lsj_keeps_segments_and_pixels_together(tmp_path, seed):
    record, _, ids, segments = panoptic_record(tmp_path, seed)
    # paint every segment in its own flat colour, so that resized pixels keep it away from borders
    palette = np.array([[0, 0, 0]] + [[40 * s["id"], 255 - 30 * s["id"], 100] for s in segments], dtype=np.uint8)
    Image.fromarray(palette[ids]).save(record["file_name"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    out = PanopticDatasetMapper(config(IMAGE_SIZE=64, MIN_SCALE=0.3, MAX_SCALE=1.5), True)(record)
    assert tuple(out["image"].shape) == (3, 64, 64)
    image = out["image"].permute(1, 2, 0).numpy()
    instances = out["instances"]
    assert len(instances) > 0
    for mask, label, is_thing in zip(
        instances.gt_masks.tensor.numpy(), instances.gt_classes.tolist(), instances.gt_is_thing.tolist()
    ):
        interior = mask & ~binary_dilation(~mask, iterations=2)
        if not interior.any():
            continue
        # the interior shows one segment's colour (bar pixels blended by downscaling)
        colours, counts = np.unique(image[interior], axis=0, return_counts=True)
        assert counts.max() >= 0.8 * counts.sum(), (colours, counts)
        segment = segments[palette.tolist().index(colours[counts.argmax()].tolist()) - 1]
        assert segment["category"] == label and not segment["iscrowd"]
        assert bool(PANOPTIC_CATEGORIES[label]["isthing"]) == is_thing


def test_semantic_mapper_one_target_per_class(tmp_path):
    semantic = np.full((40, 60), 255, dtype=np.uint8)
    semantic[:20] = 3
    semantic[20:, :30] = 0
    semantic[30:, 40:] = 1
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(semantic).save(tmp_path / "semantic.png")
    record = {"file_name": str(tmp_path / "image.png"), "sem_seg_file_name": str(tmp_path / "semantic.png")}
    mapper = SemanticDatasetMapper(True, augmentations=[], num_classes=5, thing_classes=[1])
    out = mapper(record)
    instances = out["instances"]
    assert instances.gt_classes.tolist() == [0, 1, 3]  # void (255) is no target
    assert instances.gt_is_thing.tolist() == [False, True, False]
    for mask, label in zip(instances.gt_masks.tensor, instances.gt_classes.tolist()):
        assert np.array_equal(mask.numpy(), semantic == label)
    assert torch.equal(out["sem_seg"], torch.from_numpy(semantic.astype(np.int64)))
    with pytest.raises(ValueError, match="class 3 is outside the model's 3 classes"):
        SemanticDatasetMapper(True, augmentations=[], num_classes=3)(record)


def test_semantic_recipe_crops_with_the_category_constraint(tmp_path):
    semantic = np.zeros((64, 96), dtype=np.uint8)
    semantic[:, 48:] = 2
    Image.fromarray(np.zeros((64, 96, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(semantic).save(tmp_path / "semantic.png")
    record = {"file_name": str(tmp_path / "image.png"), "sem_seg_file_name": str(tmp_path / "semantic.png")}
    cfg = config(MIN_SIZE_TRAIN=(64,), MAX_SIZE_TRAIN=1000, COLOR_AUG_SSD=True)
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (32, 32)
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.75  # no class may fill more than 3/4 of the crop
    np.random.seed(0)
    for _ in range(5):
        out = SemanticDatasetMapper(cfg, True)(record)
        assert tuple(out["sem_seg"].shape) == (32, 32)
        counts = np.bincount(out["sem_seg"].numpy().reshape(-1), minlength=3)
        assert counts.max() <= 0.75 * 32 * 32
        assert out["instances"].gt_classes.tolist() == [0, 2]


def test_build_mapper_dispatch():
    assert isinstance(build_mapper(config(DATASET_MAPPER_NAME="panoptic_lsj"), True), PanopticDatasetMapper)
    assert isinstance(build_mapper(config(DATASET_MAPPER_NAME="semantic"), True), SemanticDatasetMapper)
    test_mapper = build_mapper(config(DATASET_MAPPER_NAME="semantic"), False)
    assert isinstance(test_mapper, DIMaskDINODatasetMapper) and not test_mapper.is_train
    assert isinstance(build_mapper(config(DATASET_MAPPER_NAME="lsj"), True), DIMaskDINODatasetMapper)
    with pytest.raises(ValueError, match="panoptic_lsj"):
        build_mapper(config(DATASET_MAPPER_NAME="panoptic"), True)


def test_panoptic_mapper_names_a_non_panoptic_record(tmp_path):
    record, *_ = panoptic_record(tmp_path)
    del record["pan_seg_file_name"]
    with pytest.raises(ValueError, match="panoptic dataset"):
        PanopticDatasetMapper(True, augmentations=[], num_classes=5)(record)


def test_synthetic_panoptic_dataset_registers_and_maps(tmp_path):
    out = tmp_path / "synthetic_panoptic"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "datasets", "make_synthetic_panoptic.py"), "--output", str(out)]
        + ["--num-train", "3", "--num-val", "1", "--crowd-probability", "0.5"],
        check=True,
        capture_output=True,
    )
    register_coco_panoptic_checked(
        "test_synthetic_panoptic",
        image_root=str(out / "train"),
        panoptic_root=str(out / "panoptic_train"),
        panoptic_json=str(out / "panoptic_train.json"),
        sem_seg_root=str(out / "panoptic_semseg_train"),
        instances_json=str(out / "instances_train.json"),
        categories=PANOPTIC_CATEGORIES,
    )
    records = DatasetCatalog.get("test_synthetic_panoptic")
    metadata = MetadataCatalog.get("test_synthetic_panoptic")
    assert metadata.thing_classes == ["rectangle", "ellipse", "triangle"]
    assert metadata.stuff_classes == ["rectangle", "ellipse", "triangle", "sky", "ground"]
    assert len(records) == 3
    instances = json.loads((out / "instances_train.json").read_text())
    things = sum(s["isthing"] for r in records for s in r["segments_info"])
    assert things == len(instances["annotations"]) and any(a["iscrowd"] for a in instances["annotations"])
    for record in records:
        ids = rgb_to_id(np.asarray(Image.open(record["pan_seg_file_name"])))
        semantic = np.asarray(Image.open(record["sem_seg_file_name"]))
        for segment in record["segments_info"]:
            assert (semantic[ids == segment["id"]] == segment["category_id"]).all()
        assert (semantic[ids == 0] == 255).all() and (ids == 0).any()  # the void band
        out_record = PanopticDatasetMapper(True, augmentations=[], num_classes=5)(record)
        crowd = sum(s["iscrowd"] for s in record["segments_info"])
        assert len(out_record["instances"]) == len(record["segments_info"]) - crowd
