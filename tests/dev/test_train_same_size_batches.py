"""dev/train_same_size_batches.py: every batch of its loader holds images of one size, the
sizes change between batches, and each image is what the recipe's mapper makes at that size
for the same place in the stream."""

import json
import uuid

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.data import DatasetCatalog  # noqa: E402

from di_maskdino.d2 import load_config  # noqa: E402
from di_maskdino.d2.data import build_mapper  # noqa: E402
from di_maskdino.d2.data.datasets import register_coco_instances_checked  # noqa: E402
from di_maskdino.d2.data.samplers import SeededMapDataset  # noqa: E402
from tests.tooling import QUICK, load_script, run_tool  # noqa: E402

SIZES = "(32, 48, 64)"


def register_dataset(tmp_path):
    """Six 64 x 64 images (different contents), a square each."""
    images = tmp_path / "images"
    images.mkdir()
    content = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "square"}]}
    rng = np.random.default_rng(0)
    for image_id in range(1, 7):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{image_id}.png")
        content["images"].append({"id": image_id, "file_name": f"{image_id}.png", "height": 64, "width": 64})
        content["annotations"].append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [8, 8, 20, 20],
                "area": 400,
                "iscrowd": 0,
                "segmentation": [[8, 8, 28, 8, 28, 28, 8, 28]],
            }
        )
    name = f"same_size_{uuid.uuid4().hex[:8]}"
    (tmp_path / "train.json").write_text(json.dumps(content))
    register_coco_instances_checked(name, str(tmp_path / "train.json"), str(images))
    return name


def config(name, *extra):
    return load_config(
        QUICK,
        ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TRAIN", SIZES]
        + ["INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "2", "MODEL.DI_MASKDINO.NUM_CLASSES", "1"]
        + list(extra),
    )


def test_a_batch_holds_one_size_and_each_image_is_the_mappers_at_that_size(tmp_path):
    script = load_script("dev/train_same_size_batches.py", "train_same_size_batches")
    cfg = config(register_dataset(tmp_path))
    loader = script.SameSizeBatchTrainer.build_train_loader(cfg)
    shapes = []
    for _, batch in zip(range(16), loader):
        assert len(batch) == 2
        assert batch[0]["image"].shape == batch[1]["image"].shape
        shapes.append(tuple(batch[0]["image"].shape[-2:]))
    assert set(shapes) == {(32, 32), (48, 48), (64, 64)}

    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    dataset = script.SameSizeBatchTrainer.build_train_dataset(cfg, dicts, 2)
    for position in range(12):
        key = (7, position, position % len(dicts))
        mapped = dataset[key]
        size = mapped["image"].shape[-1]
        assert size == dataset.short_edge(7, position) == dataset.short_edge(7, position ^ 1)  # its batch's
        single = cfg.clone()
        single.defrost()
        single.INPUT.MIN_SIZE_TRAIN = (size,)
        expected = SeededMapDataset(dicts, build_mapper(single, True))[key]
        assert np.array_equal(mapped["image"].numpy(), expected["image"].numpy())
        boxes = mapped["instances"].gt_boxes.tensor
        assert np.array_equal(boxes.numpy(), expected["instances"].gt_boxes.tensor.numpy())


def test_range_sampling_is_refused(tmp_path):
    script = load_script("dev/train_same_size_batches.py", "train_same_size_batches")
    cfg = config(register_dataset(tmp_path), "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range")
    with pytest.raises(SystemExit, match="MIN_SIZE_TRAIN_SAMPLING is 'range'.*use 'choice'"):
        script.SameSizeBatchTrainer.build_train_dataset(cfg, DatasetCatalog.get(cfg.DATASETS.TRAIN[0]), 2)


def test_the_script_trains(data_root, tmp_path):
    args = ["--config-file", QUICK, "SOLVER.MAX_ITER", "2", "INPUT.MIN_SIZE_TRAIN", "(96, 128)"]
    args += ["DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)]
    run_tool("dev/train_same_size_batches.py", args, data_root)
    assert (tmp_path / "model_final.pth").is_file()
