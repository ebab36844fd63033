"""Data mapping and image reading."""

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
from detectron2.data import DatasetCatalog  # noqa: E402
from PIL import Image  # noqa: E402

from di_maskdino.d2 import DatasetError, add_di_maskdino_config, register_coco_instances_checked  # noqa: E402
from di_maskdino.d2.data import DIMaskDINODatasetMapper  # noqa: E402
from di_maskdino.images import ImageReadError, read_image_rgb  # noqa: E402
from tests.tooling import ROOT  # noqa: E402


def lsj_cfg(size=128):
    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    cfg.INPUT.IMAGE_SIZE = size
    return cfg


def two_rectangles(tmp_path):
    """A 100 x 160 image with a red and a green rectangle (polygon and RLE annotations)."""
    from pycocotools import mask as mask_util

    image = np.zeros((100, 160, 3), dtype=np.uint8)
    image[10:40, 20:70] = (255, 0, 0)
    image[50:90, 100:150] = (0, 255, 0)
    path = tmp_path / "rectangles.png"
    Image.fromarray(image).save(path)
    green = np.zeros((100, 160), dtype=np.uint8)
    green[50:90, 100:150] = 1
    rle = mask_util.encode(np.asfortranarray(green))
    annotations = [
        {
            "bbox": [20, 10, 50, 30],
            "bbox_mode": 1,
            "category_id": 0,
            "segmentation": [[20, 10, 70, 10, 70, 40, 20, 40]],
            "iscrowd": 0,
        },
        {
            "bbox": [100, 50, 50, 40],
            "bbox_mode": 1,
            "category_id": 1,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
            "iscrowd": 0,
        },
    ]
    return {"file_name": str(path), "height": 100, "width": 160, "image_id": 1, "annotations": annotations}


@pytest.mark.parametrize("seed", range(6))
def test_lsj_keeps_masks_boxes_and_pixels_together(tmp_path, seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    mapper = DIMaskDINODatasetMapper(lsj_cfg(), True)
    out = mapper(two_rectangles(tmp_path))
    image = out["image"].permute(1, 2, 0).numpy()
    assert image.shape == (128, 128, 3)  # fixed-size crop, padded
    instances = out["instances"]
    colours = {0: (255, 0, 0), 1: (0, 255, 0)}
    for label, mask, box in zip(
        instances.gt_classes.tolist(), instances.gt_masks.tensor.numpy(), instances.gt_boxes.tensor.numpy()
    ):
        colour = np.array(colours[label])
        pixels = np.abs(image.astype(int) - colour).sum(-1) < 60  # the object's own colour
        # every pixel of the object's colour lies in its mask (give or take the one-pixel
        # rasterisation convention of polygon edges) ...
        assert (pixels & ~binary_dilation(mask)).sum() <= 0.02 * pixels.sum() + 1, label
        # ... the two agree up to the border pixels blended by resizing ...
        ys, xs = np.nonzero(mask)
        py, px = np.nonzero(pixels)
        assert np.allclose([xs.min(), ys.min(), xs.max(), ys.max()], [px.min(), py.min(), px.max(), py.max()], atol=1.5)
        if mask.sum() > 200:
            assert (pixels & mask).sum() / (pixels | mask).sum() > 0.8, label
        # ... and the box is the mask's
        assert np.allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.0)


def test_crowd_and_cropped_out_instances_are_dropped(tmp_path):
    record = two_rectangles(tmp_path)
    record["annotations"][0]["iscrowd"] = 1
    cfg = lsj_cfg()
    cfg.INPUT.DATASET_MAPPER_NAME = "resize"
    cfg.INPUT.MIN_SIZE_TRAIN = (100,)
    out = DIMaskDINODatasetMapper(cfg, True)(record)
    assert out["instances"].gt_classes.tolist() == [1]
    record["annotations"] = []
    assert len(DIMaskDINODatasetMapper(cfg, True)(record)["instances"]) == 0


def test_unknown_mapper_name_is_reported():
    cfg = lsj_cfg()
    cfg.INPUT.DATASET_MAPPER_NAME = "mosaic"
    with pytest.raises(ValueError, match="DATASET_MAPPER_NAME"):
        DIMaskDINODatasetMapper(cfg, True)


def test_odd_images_are_read_as_rgb(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((20, 30), 100, dtype=np.uint8), "L").save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.full((20, 30, 4), 200, dtype=np.uint8), "RGBA").save(rgba)
    deep = tmp_path / "deep.png"
    values = np.linspace(1000, 60000, 20 * 30).reshape(20, 30).astype(np.uint16)
    Image.fromarray(values).save(deep)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(rotated, exif=exif)
    assert read_image_rgb(str(gray)).shape == (20, 30, 3) and read_image_rgb(str(gray))[0, 0].tolist() == [100] * 3
    assert read_image_rgb(str(rgba)).shape == (20, 30, 3)
    deep_rgb = read_image_rgb(str(deep))
    assert deep_rgb.dtype == np.uint8 and deep_rgb.min() == 0 and deep_rgb.max() == 255
    assert read_image_rgb(str(rotated)).shape == (30, 20, 3)


def test_unreadable_images_name_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        read_image_rgb(str(broken))
    with pytest.raises(ImageReadError, match="missing.png"):
        read_image_rgb(str(tmp_path / "missing.png"))


def test_tiny_image_goes_through_mapper_and_model(tmp_path):
    from detectron2.modeling import build_model

    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((12, 20, 3), 128, dtype=np.uint8)).save(tiny)
    cfg = get_cfg()
    add_di_maskdino_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "quick_start.yaml"))
    out = DIMaskDINODatasetMapper(cfg, False)({"file_name": str(tiny), "height": 12, "width": 20, "image_id": 1})
    model = build_model(cfg).eval()
    with torch.no_grad():
        result = model([out])[0]["instances"]
    assert result.image_size == (12, 20) and torch.isfinite(result.scores).all()


def test_custom_coco_dataset_errors_name_the_problem(tmp_path):
    register_coco_instances_checked(
        "test_missing_json", str(tmp_path / "none.json"), str(tmp_path), how_to_create="make it"
    )
    with pytest.raises(DatasetError, match="none.json does not exist. make it"):
        DatasetCatalog.get("test_missing_json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    register_coco_instances_checked("test_bad_json", str(bad), str(tmp_path))
    with pytest.raises(DatasetError, match="not valid JSON"):
        DatasetCatalog.get("test_bad_json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"images": []}))
    register_coco_instances_checked("test_wrong_json", str(wrong), str(tmp_path))
    with pytest.raises(DatasetError, match="no annotations, categories"):
        DatasetCatalog.get("test_wrong_json")
    with pytest.raises(DatasetError, match="already registered"):
        register_coco_instances_checked("test_wrong_json", str(wrong), str(tmp_path))


def test_synthetic_dataset_loads_and_maps(tmp_path):
    """make_synthetic.py writes both polygon and RLE masks; every record maps."""
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "datasets", "make_synthetic.py"),
            "--output",
            str(tmp_path),
            "--num-train",
            "6",
            "--num-val",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    register_coco_instances_checked("test_synthetic", str(tmp_path / "train.json"), str(tmp_path / "train"))
    records = DatasetCatalog.get("test_synthetic")
    kinds = {type(a["segmentation"]).__name__ for r in records for a in r["annotations"]}
    assert kinds == {"list", "dict"} and len(records) == 6
    mapper = DIMaskDINODatasetMapper(lsj_cfg(), True)
    for record in records:
        out = mapper(record)
        assert out["instances"].gt_masks.tensor.shape[-2:] == (128, 128)


def test_lsj_with_the_padding_mask_leaves_the_padding_to_the_model(tmp_path):
    """With MODEL.DI_MASKDINO.PADDING_MASK the fixed-size crop is not padded (the model pads
    the batch and masks it): an image scaled below the crop size keeps its own size."""
    cfg = lsj_cfg(size=512)
    cfg.INPUT.MIN_SCALE = cfg.INPUT.MAX_SCALE = 0.5  # the 100 x 160 image fits 256 x 256: 160 x 256
    cfg.MODEL.DI_MASKDINO.PADDING_MASK = True
    torch.manual_seed(0)
    np.random.seed(0)
    out = DIMaskDINODatasetMapper(cfg, True)(two_rectangles(tmp_path))
    assert out["image"].shape[-2:] == (160, 256)  # not padded to the 512 x 512 crop
    cfg.MODEL.DI_MASKDINO.PADDING_MASK = False
    out = DIMaskDINODatasetMapper(cfg, True)(two_rectangles(tmp_path))
    assert out["image"].shape[-2:] == (512, 512)
