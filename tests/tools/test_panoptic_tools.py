"""The panoptic quick start (training, then box / mask AP, PQ and mIoU in one evaluation) and
the per-layer imbalance analysis of a panoptic model."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from tests.tooling import ROOT, run_tool  # noqa: E402

pytestmark = pytest.mark.slow  # every test runs a tool in a subprocess

QUICK_PANOPTIC = os.path.join(ROOT, "configs", "quick_start_panoptic.yaml")
DECODER_LAYERS = 3  # configs/quick_start.yaml


def pq_available():
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("panopticapi", "hotcoco"))


@pytest.fixture(scope="module")
def panoptic_root(tmp_path_factory):
    if not pq_available():
        pytest.skip(
            "PQ needs panopticapi (install it from its repository, see README) or hotcoco (pip install hotcoco)"
        )
    root = tmp_path_factory.mktemp("panoptic_datasets")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "datasets", "make_synthetic_panoptic.py"), "--output"]
        + [str(root / "synthetic_panoptic"), "--num-train", "8", "--num-val", "4"],
        check=True,
        capture_output=True,
    )
    return root


@pytest.fixture(scope="module")
def trained_panoptic(panoptic_root, tmp_path_factory):
    """20 iterations of the panoptic quick start, then its evaluation."""
    output = tmp_path_factory.mktemp("train_panoptic")
    run_tool(
        "train_net.py",
        ["--config-file", QUICK_PANOPTIC, "SOLVER.MAX_ITER", "20", "OUTPUT_DIR", str(output)],
        panoptic_root,
    )
    return output


def test_panoptic_quick_start_trains_and_evaluates_ap_pq_and_miou(trained_panoptic):
    metrics = json.loads((trained_panoptic / "metrics_synthetic_panoptic_val.json").read_text())
    assert set(metrics) == {"bbox", "segm", "panoptic_seg", "sem_seg"}
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert math.isfinite(metrics["panoptic_seg"][key]) and 0 <= metrics["panoptic_seg"][key] <= 100
    assert math.isfinite(metrics["sem_seg"]["mIoU"]) and math.isfinite(metrics["bbox"]["AP"])
    # the instance evaluation knows the three thing classes only
    assert {k for k in metrics["bbox"] if k.startswith("AP-")} == {"AP-rectangle", "AP-ellipse", "AP-triangle"}
    assert (trained_panoptic / "model_final.pth").is_file()


def test_every_layer_of_a_panoptic_model_in_one_pass(trained_panoptic, panoptic_root, tmp_path):
    run_tool(
        "analyze_imbalance.py",
        ["--config-file", QUICK_PANOPTIC, "--output", str(tmp_path)]
        + ["MODEL.WEIGHTS", str(trained_panoptic / "model_final.pth")],
        panoptic_root,
    )
    table = json.loads((tmp_path / "imbalance.json").read_text())
    layers = [f"layer {i}" for i in range(DECODER_LAYERS + 1)]
    assert list(table) == layers + ["TI 0.0"]
    for name in layers:
        assert set(table[name]) == {"bbox", "segm", "PQ", "PQ_th", "PQ_st", "mIoU"}
    assert set(table["TI 0.0"]) == {"bbox"}
    standard = json.loads((trained_panoptic / "metrics_synthetic_panoptic_val.json").read_text())
    last = table[layers[-1]]
    assert last["bbox"] == pytest.approx(standard["bbox"]["AP"], abs=1e-9)
    assert last["PQ"] == pytest.approx(standard["panoptic_seg"]["PQ"], abs=1e-9)
    assert last["mIoU"] == pytest.approx(standard["sem_seg"]["mIoU"], abs=1e-9)
    assert "| PQ things |" in (tmp_path / "imbalance.md").read_text() and (tmp_path / "imbalance.png").stat().st_size


def test_demo_of_a_panoptic_model_writes_its_things_in_the_datasets_terms(trained_panoptic, panoptic_root, tmp_path):
    """tools/demo.py on the panoptic quick start: things only, with the dataset's category ids
    and names (the model's labels index things and stuff)."""
    root = panoptic_root / "synthetic_panoptic"
    categories = {c["id"]: c for c in json.loads((root / "panoptic_val.json").read_text())["categories"]}
    result = run_tool(
        "demo.py",
        ["--config-file", QUICK_PANOPTIC, "--input", str(root / "val"), "--output", str(tmp_path / "out")]
        + ["--json", str(tmp_path / "instances.json"), "--confidence-threshold", "0.0"]
        + ["MODEL.WEIGHTS", str(trained_panoptic / "model_final.pth")],
        panoptic_root,
    )
    records = json.loads((tmp_path / "instances.json").read_text())
    assert records, result.stdout
    assert {r["category_id"] for r in records} <= {i for i, c in categories.items() if c["isthing"]}
    assert all(r["category_name"] == categories[r["category_id"]]["name"] for r in records)
    assert len(os.listdir(tmp_path / "out")) == 4
