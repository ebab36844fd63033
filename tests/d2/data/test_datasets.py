"""Datasets are checked before training: annotations detectron2 would drop or pycocotools
cannot evaluate, images listed but missing, categories against NUM_CLASSES."""

import copy
import json
import uuid

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.data import DatasetCatalog  # noqa: E402

from di_maskdino.d2 import DatasetError, Trainer, load_config  # noqa: E402
from di_maskdino.d2.data.datasets import check_dataset_classes, register_coco_instances_checked  # noqa: E402
from tests.tooling import QUICK  # noqa: E402


def coco(tmp_path, num_categories=3):
    """Two 32 x 32 images with one square each (1-based category ids)."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    content = {"images": [], "annotations": [], "categories": []}
    content["categories"] = [{"id": i + 1, "name": f"class{i}"} for i in range(num_categories)]
    for image_id in (1, 2):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / f"{image_id}.png")
        content["images"].append({"id": image_id, "file_name": f"{image_id}.png", "height": 32, "width": 32})
        content["annotations"].append(
            {
                "id": 10 + image_id,
                "image_id": image_id,
                "category_id": image_id,
                "bbox": [4, 4, 10, 10],
                "area": 100,
                "iscrowd": 0,
                "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]],
            }
        )
    return content


def register(tmp_path, content):
    name = f"test_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(content))
    register_coco_instances_checked(name, str(path), str(tmp_path / "images"))
    return name, path


def test_a_two_point_polygon_is_named_with_its_annotation_and_file(tmp_path):
    content = coco(tmp_path)
    content["annotations"][1]["segmentation"] = [[4, 4, 14, 14]]
    name, path = register(tmp_path, content)
    with pytest.raises(DatasetError) as error:
        DatasetCatalog.get(name)
    message = str(error.value)
    assert str(path) in message and "annotation id 12 (image 2)" in message
    assert "a polygon of 4 coordinates" in message and f"Fix or remove them in {path}" in message


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda a: a.update(category_id=9), "category_id 9 is not in 'categories'"),
        (lambda a: a.update(image_id=7), "image_id 7 is not in 'images'"),
        (lambda a: a.pop("bbox"), "'bbox' must be [x, y, width, height]"),
        (lambda a: a.update(segmentation={"counts": "abc"}), "an RLE 'segmentation' needs 'counts' and 'size'"),
    ],
)
def test_other_unusable_annotations(tmp_path, edit, expected):
    content = coco(tmp_path)
    edit(content["annotations"][0])
    name, _ = register(tmp_path, content)
    with pytest.raises(DatasetError, match="annotation id 11") as error:
        DatasetCatalog.get(name)
    assert expected in str(error.value)


def test_missing_images_are_found_before_they_are_sampled(tmp_path):
    content = coco(tmp_path)
    name, _ = register(tmp_path, content)
    (tmp_path / "images" / "2.png").unlink()
    with pytest.raises(DatasetError) as error:
        DatasetCatalog.get(name)
    assert "1 of 2 listed images do not exist" in str(error.value)
    assert str(tmp_path / "images" / "2.png") in str(error.value)


def test_categories_against_num_classes(tmp_path):
    name, _ = register(tmp_path, coco(tmp_path, num_categories=3))
    with pytest.raises(DatasetError, match="has 3 categories .*NUM_CLASSES is 2. Set MODEL.DI_MASKDINO.NUM_CLASSES 3"):
        check_dataset_classes(name, 2, training=True)
    check_dataset_classes(name, 3, training=True)
    check_dataset_classes(name, 5, training=True)  # more classes than the data: trains (with a warning)
    with pytest.raises(DatasetError, match=r"\(evaluation\) has 3 categories"):
        check_dataset_classes(name, 5, training=False)


def test_training_refuses_a_dataset_with_more_categories_before_the_first_step(tmp_path):
    content = coco(tmp_path, num_categories=4)
    content["annotations"].append(copy.deepcopy(content["annotations"][0]))
    content["annotations"][-1].update(id=99, category_id=4)
    name, _ = register(tmp_path, content)
    cfg = load_config(QUICK, ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"])
    with pytest.raises(DatasetError, match="has 4 categories"):
        Trainer.build_train_loader(cfg)


def test_a_name_maskdino_registered_first_is_kept():
    """MaskDINO's and Mask2Former's code register "coco_2017_*_panoptic_with_sem_seg" for the
    same files; importing di_maskdino.d2 after them keeps theirs instead of failing."""
    import subprocess
    import sys

    program = (
        "from detectron2.data import DatasetCatalog\n"
        "DatasetCatalog.register('coco_2017_train_panoptic_with_sem_seg', lambda: ['theirs'])\n"
        "import di_maskdino.d2\n"
        "print(DatasetCatalog.get('coco_2017_train_panoptic_with_sem_seg'), "
        "'coco_2017_val_panoptic_with_sem_seg' in DatasetCatalog.list())\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["['theirs']", "True"]
