"""tools/train_net.py and tools/demo.py, run as a user runs them, on a synthetic set."""

import json
import math
import os

import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from tests.tooling import QUICK, run_tool  # noqa: E402

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


def demo(args, data_root, weights=None):
    extra = ["MODEL.WEIGHTS", str(weights)] if weights else []
    return run_tool("demo.py", ["--config-file", QUICK] + args + extra, data_root, check=False)


def test_demo_writes_images_and_json_in_the_datasets_terms(trained, data_root, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "corrupt.png").write_bytes(b"\x89PNG broken")
    val = data_root / "synthetic" / "val"
    # the same name twice (a.png, a.jpg) and the dataset's own images
    Image.open(val / "000001.png").save(inputs / "000001.jpg")
    out = tmp_path / "out"
    result = demo(
        ["--input", str(val), str(inputs), "--output", str(out), "--json", str(out / "instances.json")]
        + ["--confidence-threshold", "0.0"],
        data_root,
        trained / "model_final.pth",
    )
    assert result.returncode == 1 and "corrupt.png" in result.stderr  # named, the others still processed
    assert sorted(os.listdir(out)) == [
        "000001.jpg",
        "000001_jpg.jpg",
        "000002.jpg",
        "000003.jpg",
        "000004.jpg",
        "instances.json",
    ]
    assert "6 image(s) given, 5 drawn into" in result.stdout
    with open(out / "instances.json") as handle:
        records = json.load(handle)
    gt = COCO(str(data_root / "synthetic" / "val.json"))
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    assert {r["category_id"] for r in records} <= set(names)  # the dataset's ids (1-based), not 0-based indices
    assert all(r["category_name"] == names[r["category_id"]] for r in records)
    by_name = {os.path.basename(i["file_name"]): i["id"] for i in gt.dataset["images"]}
    ours = [r for r in records if os.path.dirname(r["file_name"]) == str(val)]
    assert {r["image_id"] for r in ours} == set(by_name.values())
    evaluation = COCOeval(gt, gt.loadRes(ours), "segm")  # pycocotools reads and scores them
    evaluation.evaluate()
    evaluation.accumulate()


def test_demo_refusals_and_messages(trained, data_root, tmp_path):
    val = str(data_root / "synthetic" / "val")
    result = demo(["--input", val, "--output", str(tmp_path / "a")], data_root)
    assert result.returncode != 0 and "MODEL.WEIGHTS is not set" in result.stderr + result.stdout
    assert "--allow-random-weights" in result.stderr + result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = demo(["--input", str(empty), "--output", str(tmp_path / "b")], data_root, trained / "model_final.pth")
    assert result.returncode != 0 and f"--input {empty}: the folder holds no image" in result.stderr
    result = demo(["--input", val, "--output", str(tmp_path / "c")], data_root, tmp_path / "model.pth")
    assert result.returncode != 0 and "model.pth: no such file. Set MODEL.WEIGHTS" in result.stderr
    result = demo(
        ["--input", val, "--output", str(tmp_path / "d"), "--confidence-threshold", "1.01", "--device", "cuda"],
        data_root,
        trained / "model_final.pth",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if not torch.cuda.is_available():
        assert "CUDA is not available: running on the CPU" in result.stdout
    assert "No instance reached --confidence-threshold 1.01" in result.stdout
    assert "lower it, e.g. --confidence-threshold" in result.stdout
    assert len(os.listdir(tmp_path / "d")) == 4  # the images are drawn all the same


def test_demo_on_an_exported_model_draws_what_the_weights_give(trained, data_root, tmp_path):
    """tools/demo.py --exported (the torch.export program of the trained quick-start weights)
    writes the records the demo on the weights writes, within the export tolerances; with
    no config it still runs, in the model's own terms (0-based class indices)."""
    from pycocotools import mask as mask_util

    weights = trained / "model_final.pth"
    export_args = ["--config-file", QUICK, "--formats", "export", "--output", str(tmp_path / "export")]
    run_tool("export_model.py", export_args + ["MODEL.WEIGHTS", str(weights)], data_root)
    program = tmp_path / "export" / "model.pt2"
    val = str(data_root / "synthetic" / "val")
    common = ["--input", val, "--confidence-threshold", "0.0"]
    runs = {
        "weights": demo(
            common + ["--output", str(tmp_path / "w"), "--json", str(tmp_path / "w.json")], data_root, weights
        ),
        "exported": demo(
            common + ["--exported", str(program), "--output", str(tmp_path / "e"), "--json", str(tmp_path / "e.json")],
            data_root,
        ),
    }
    for name, result in runs.items():
        assert result.returncode == 0, (name, result.stderr[-2000:])
    with open(tmp_path / "w.json") as handle:
        expected = json.load(handle)
    with open(tmp_path / "e.json") as handle:
        found = json.load(handle)
    assert len(found) == len(expected) > 0
    for a, b in zip(found, expected):
        assert (a["image_id"], a["category_id"], a["category_name"]) == (
            b["image_id"],
            b["category_id"],
            b["category_name"],
        )
        assert abs(a["score"] - b["score"]) <= 1e-4
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) <= 1e-2
        masks = [mask_util.decode(r["segmentation"]) for r in (a, b)]
        assert (masks[0] == masks[1]).mean() >= 0.999
    assert sorted(os.listdir(tmp_path / "e")) == sorted(os.listdir(tmp_path / "w"))

    alone = run_tool(
        "demo.py",
        [
            "--exported",
            str(program),
            "--input",
            val,
            "--output",
            str(tmp_path / "a"),
            "--json",
            str(tmp_path / "a.json"),
        ]
        + ["--confidence-threshold", "0.0"],
        data_root,
    )
    assert "category_id is the model's 0-based class index" in alone.stdout
    with open(tmp_path / "a.json") as handle:
        records = json.load(handle)
    assert [r["category_id"] + 1 for r in records] == [r["category_id"] for r in expected]  # synthetic ids are 1-based


def test_demo_help_shows_the_defaults(data_root):
    result = run_tool("demo.py", ["--help"], data_root)
    assert "(default: 0.5)" in result.stdout and "(default: None)" in result.stdout


def test_evaluation_names_missing_weights(data_root, tmp_path):
    result = run_tool(
        "train_net.py", ["--config-file", QUICK, "--eval-only", "OUTPUT_DIR", str(tmp_path)], data_root, check=False
    )
    assert result.returncode != 0 and "MODEL.WEIGHTS is not set: --eval-only" in result.stderr
    assert "FutureWarning" not in result.stderr
    result = run_tool(
        "train_net.py",
        ["--config-file", QUICK, "--eval-only", "MODEL.WEIGHTS", "model.pth", "OUTPUT_DIR", str(tmp_path)],
        data_root,
        check=False,
    )
    assert result.returncode != 0 and "MODEL.WEIGHTS model.pth: no such file. Set MODEL.WEIGHTS" in result.stderr
    assert "AssertionError" not in result.stderr
