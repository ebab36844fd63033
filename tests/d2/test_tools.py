"""tools/train_net.py and tools/demo.py, run as a user runs them, on a synthetic set."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from .conftest import QUICK, run_tool  # noqa: E402

pytestmark = pytest.mark.slow  # every test runs a tool in a subprocess


def iterations_logged(output):
    with open(output / "metrics.json") as handle:
        return [json.loads(line)["iteration"] for line in handle if '"total_loss"' in line]


def test_training_then_evaluation_gives_finite_ap(trained):
    assert (trained / "model_final.pth").exists()
    with open(trained / "metrics_synthetic_val.json") as handle:
        metrics = json.load(handle)
    for task in ("bbox", "segm"):
        for key in ("AP", "AP50", "AP75", "APs", "APm"):
            assert math.isfinite(metrics[task][key]), (task, key)
    assert iterations_logged(trained)[-1] == 19


def test_resume_continues_from_the_saved_iteration(trained, data_root):
    before = len(iterations_logged(trained))
    result = run_tool(
        "train_net.py",
        [
            "--config-file",
            QUICK,
            "--resume",
            "SOLVER.MAX_ITER",
            "30",
            "OUTPUT_DIR",
            str(trained),
            "DATASETS.TEST",
            "()",
        ],
        data_root,
    )
    assert "model_final.pth" in result.stdout + result.stderr  # the checkpoint it resumed from
    resumed = iterations_logged(trained)[before:]
    assert resumed and min(resumed) >= 20 and resumed[-1] == 29


def test_release_checkpoints_must_be_converted(data_root, tmp_path):
    release = tmp_path / "release.pth"
    torch.save({"model": {"sem_seg_head.predictor.class_embed.weight": torch.zeros(3, 64)}}, release)
    result = run_tool(
        "train_net.py",
        ["--config-file", QUICK, "--eval-only", "MODEL.WEIGHTS", str(release), "OUTPUT_DIR", str(tmp_path)],
        data_root,
        check=False,
    )
    assert result.returncode != 0
    assert "convert it first" in result.stderr and "convert_official_checkpoint.py" in result.stderr


def test_two_cpu_processes(data_root, tmp_path):
    run_tool(
        "train_net.py",
        [
            "--config-file",
            QUICK,
            "--num-gpus",
            "2",
            "SOLVER.MAX_ITER",
            "4",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
        data_root,
    )
    assert (tmp_path / "log.txt.rank1").exists() and iterations_logged(tmp_path)[-1] == 3


def test_demo_writes_images_and_json(trained, data_root, tmp_path):
    corrupt = tmp_path / "inputs" / "corrupt.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    result = run_tool(
        "demo.py",
        [
            "--config-file",
            QUICK,
            "--input",
            str(data_root / "synthetic" / "val"),
            str(corrupt),
            "--output",
            str(out),
            "--json",
            str(out / "instances.json"),
            "--confidence-threshold",
            "0.0",
            "MODEL.WEIGHTS",
            str(trained / "model_final.pth"),
        ],
        data_root,
        check=False,
    )
    assert result.returncode == 1 and "corrupt.png" in result.stderr  # named, the others still processed
    assert sorted(os.listdir(out)) == ["000001.jpg", "000002.jpg", "000003.jpg", "000004.jpg", "instances.json"]
    with open(out / "instances.json") as handle:
        records = json.load(handle)
    assert records and {"file_name", "score", "category_id", "bbox_xyxy", "segmentation"} <= set(records[0])
