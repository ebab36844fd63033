"""The box mask head through detectron2: the meta-architecture's test masks ("refined",
"detector", "both"), and (slow) a refinement run of tools/train_net.py from a trained
quick-start model, evaluated for both kinds of masks in one pass."""

import json

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.modeling import build_model  # noqa: E402

from di_maskdino.d2 import load_config  # noqa: E402
from tests.tooling import QUICK, ROOT, SMALL_BOX_MASK_HEAD, run_tool  # noqa: E402

REFINE = f"{ROOT}/configs/refinement/quick_start_box_masks.yaml"


def quick_model(test_masks):
    cfg = load_config(
        QUICK,
        SMALL_BOX_MASK_HEAD
        + [
            "MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS",
            test_masks,
            "MODEL.DI_MASKDINO.ENCODER.NUM_LAYERS",
            "1",
        ],
    )
    torch.manual_seed(0)
    return build_model(cfg).eval()


def inputs():
    image = (torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    return [{"image": image, "height": 128, "width": 160}]


def test_test_masks_choose_what_the_model_returns():
    model = quick_model("both")
    with torch.no_grad():
        both = model(inputs())[0]
    refined, detector = both["instances"], both["detector_instances"]
    assert refined.image_size == detector.image_size == (128, 160)
    assert torch.equal(refined.pred_boxes.tensor, detector.pred_boxes.tensor)  # the same detections
    assert torch.equal(refined.pred_classes, detector.pred_classes)
    assert refined.pred_masks.shape == detector.pred_masks.shape == (len(refined), 128, 160)
    with torch.no_grad():
        only_detector = quick_model("detector")(inputs())[0]
        only_refined = quick_model("refined")(inputs())[0]
    assert set(only_detector) == {"instances"} and set(only_refined) == {"instances"}
    assert torch.equal(only_detector["instances"].pred_masks, detector.pred_masks)
    assert torch.equal(only_refined["instances"].pred_masks, refined.pred_masks)
    with pytest.raises(ValueError, match="TEST_MASKS = .best.: must be one of refined, detector, both"):
        quick_model("best")


@pytest.mark.slow
def test_refinement_run_trains_the_head_only_and_reports_both_masks(trained, data_root, tmp_path):
    checkpoint = trained / "model_final.pth"
    result = run_tool(
        "train_net.py",
        [
            "--config-file",
            REFINE,
            "MODEL.WEIGHTS",
            str(checkpoint),
            "SOLVER.MAX_ITER",
            "4",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
        data_root,
    )
    log = result.stdout + result.stderr
    assert "training " in log and "frozen by MODEL.FREEZE" in log
    with open(tmp_path / "metrics_synthetic_val.json") as handle:
        metrics = json.load(handle)
    assert set(metrics) == {"bbox", "segm", "bbox_detector", "segm_detector"}
    for task in metrics.values():
        assert "AP" in task and "AP75" in task
    before = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    after = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # the detector did not change
    assert any(name.startswith("box_mask_head.") for name in after)
