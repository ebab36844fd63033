"""datasets/prepare_bdd100k.py on a small BDD100K-format sample, against hand-checked annotations."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (category index, G attribute byte, instance id, rows, cols) in a 20 x 30 image
INSTANCES = [
    (3, 0, 1, (2, 6), (3, 10)),  # car
    (1, 4, 2, (10, 16), (20, 25)),  # pedestrian, occluded (not crowd)
    (5, 2, 300, (16, 20), (0, 6)),  # bus, crowd; id >= 256 uses both B and A
]
EXPECTED = [  # category_id, bbox (x, y, w, h), area, iscrowd
    (3, [3.0, 2.0, 7.0, 4.0], 28.0, 0),
    (1, [20.0, 10.0, 5.0, 6.0], 30.0, 0),
    (5, [0.0, 16.0, 6.0, 4.0], 24.0, 1),
]
NAMES = {1: "pedestrian", 3: "car", 5: "bus"}


def make_sample(root):
    for split in ("val",):
        os.makedirs(root / "images" / "10k" / split)
        os.makedirs(root / "labels" / "ins_seg" / "bitmasks" / split)
        os.makedirs(root / "labels" / "ins_seg" / "rles")
        bitmask = np.zeros((20, 30, 4), dtype=np.uint8)
        labels = []
        for category, attributes, instance, (r0, r1), (c0, c1) in INSTANCES:
            bitmask[r0:r1, c0:c1] = (category, attributes, instance >> 8, instance & 255)
            mask = np.zeros((20, 30), dtype=np.uint8)
            mask[r0:r1, c0:c1] = 1
            rle = mask_util.encode(np.asfortranarray(mask))
            labels.append(
                {
                    "id": str(instance),
                    "category": NAMES[category],
                    "attributes": {"crowd": bool(attributes & 2), "occluded": bool(attributes & 4)},
                    "rle": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
        labels.append({"id": "9", "category": "traffic light", "rle": labels[0]["rle"]})
        Image.fromarray(bitmask, "RGBA").save(root / "labels" / "ins_seg" / "bitmasks" / split / "a.png")
        Image.fromarray(np.zeros((20, 30, 4), dtype=np.uint8), "RGBA").save(
            root / "labels" / "ins_seg" / "bitmasks" / split / "b.png"
        )
        for name in ("a.jpg", "b.jpg"):
            Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(root / "images" / "10k" / split / name)
        frames = [{"name": "a.jpg", "labels": labels}, {"name": "b.jpg", "labels": []}]
        (root / "labels" / "ins_seg" / "rles" / f"ins_seg_{split}.json").write_text(json.dumps(frames))


@pytest.mark.parametrize("source", ["bitmasks", "rles"])
def test_conversion_matches_hand_checked_annotations(tmp_path, source):
    make_sample(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "datasets", "prepare_bdd100k.py"),
            "--root",
            str(tmp_path),
            "--source",
            source,
            "--splits",
            "val",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    coco = json.loads((tmp_path / "coco_annotations" / "ins_seg_val.json").read_text())
    assert [c["name"] for c in coco["categories"]] == [
        "pedestrian",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    ]
    assert [(i["file_name"], i["height"], i["width"]) for i in coco["images"]] == [("a.jpg", 20, 30), ("b.jpg", 20, 30)]
    found = sorted((a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in coco["annotations"])
    assert found == sorted(EXPECTED)
    assert all(a["image_id"] == 1 for a in coco["annotations"])
    for annotation in coco["annotations"]:
        segmentation = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
        assert mask_util.decode(segmentation).sum() == annotation["area"]
    if source == "rles":
        assert "skipped labels of other categories: {'traffic light': 1}" in result.stdout


def test_missing_labels_are_reported(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "datasets", "prepare_bdd100k.py"),
            "--root",
            str(tmp_path),
            "--splits",
            "val",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "bitmasks/val does not exist" in result.stderr
