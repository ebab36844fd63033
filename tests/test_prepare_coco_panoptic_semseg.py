"""datasets/prepare_coco_panoptic_semseg.py against hand-made panoptic annotations (and the
synthetic panoptic writer, which makes its semantic maps its own way)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from di_maskdino.panoptic_format import id_to_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "datasets", "prepare_coco_panoptic_semseg.py")


def test_semantic_maps_from_hand_made_annotations(tmp_path):
    # categories listed out of id order: contiguous classes follow the ids (7 -> 0, 40 -> 1, 92 -> 2)
    categories = [{"id": 92, "name": "sky", "isthing": 0}, {"id": 7, "name": "car", "isthing": 1}]
    categories.append({"id": 40, "name": "dog", "isthing": 1})
    ids = np.zeros((4, 5), dtype=np.int64)
    ids[:2] = 300  # sky, id >= 256 uses two colour channels
    ids[2:, :2] = 5  # car
    ids[2:, 2:4] = 6  # dog, crowd
    ids[3, 4] = 9  # a segment not listed: void
    (tmp_path / "annotations").mkdir()
    (tmp_path / "panoptic_val2017").mkdir()
    Image.fromarray(id_to_rgb(ids)).save(tmp_path / "panoptic_val2017" / "1.png")
    segments = [
        {"id": 300, "category_id": 92, "iscrowd": 0},
        {"id": 5, "category_id": 7, "iscrowd": 0},
        {"id": 6, "category_id": 40, "iscrowd": 1},
    ]
    content = {"annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": segments}]}
    content["categories"] = categories
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps(content))
    subprocess.run(
        [sys.executable, SCRIPT, "--root", str(tmp_path), "--splits", "val2017", "--workers", "1"],
        check=True,
        capture_output=True,
    )
    semantic = np.asarray(Image.open(tmp_path / "panoptic_semseg_val2017" / "1.png"))
    expected = np.array(
        [[2, 2, 2, 2, 2], [2, 2, 2, 2, 2], [0, 0, 1, 1, 255], [0, 0, 1, 1, 255]],
        dtype=np.uint8,
    )
    assert np.array_equal(semantic, expected)


def test_agrees_with_the_synthetic_panoptic_writer(tmp_path):
    out = tmp_path / "synthetic"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "datasets", "make_synthetic_panoptic.py"), "--output", str(out)]
        + ["--num-train", "1", "--num-val", "3", "--crowd-probability", "0.5"],
        check=True,
        capture_output=True,
    )
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    shutil.copy(out / "panoptic_val.json", coco / "annotations" / "panoptic_val.json")
    shutil.copytree(out / "panoptic_val", coco / "panoptic_val")
    subprocess.run(
        [sys.executable, SCRIPT, "--root", str(coco), "--splits", "val", "--workers", "2"],
        check=True,
        capture_output=True,
    )
    for name in sorted(os.listdir(out / "panoptic_semseg_val")):
        mine = np.asarray(Image.open(coco / "panoptic_semseg_val" / name))
        theirs = np.asarray(Image.open(out / "panoptic_semseg_val" / name))
        assert np.array_equal(mine, theirs), name
