"""`build_predictor` (di_maskdino/d2/engine/defaults.py) on the quick-start config against
the detectron2 model's own inference (its resizing, channel order and instances), and the
CPU speed-ups of TEST.CPU_SPEEDUPS."""

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.data import transforms as T  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from di_maskdino.cpu_inference import CPUInference  # noqa: E402
from di_maskdino.cpu_inference.winograd import WINOGRAD_OP, winograd_available  # noqa: E402
from di_maskdino.d2 import MissingWeightsError, build_predictor, load_config  # noqa: E402
from tests.modeling.tiny import perturb  # noqa: E402
from tests.tooling import QUICK, ROOT, SMALL_BOX_MASK_HEAD  # noqa: E402

PANOPTIC = f"{ROOT}/configs/quick_start_panoptic.yaml"


def test_refuses_to_run_without_weights():
    with pytest.raises(MissingWeightsError, match="MODEL.WEIGHTS is not set: the predictor .*allow_random_weights"):
        build_predictor(load_config(QUICK))
    quick = load_config(QUICK)
    assert build_predictor(quick, allow_random_weights=True).max_detections == quick.TEST.DETECTIONS_PER_IMAGE


@pytest.mark.parametrize(
    "config, opts",
    [
        (QUICK, []),
        (QUICK, SMALL_BOX_MASK_HEAD + ["MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS", "refined"]),
        (QUICK, SMALL_BOX_MASK_HEAD + ["MODEL.DI_MASKDINO.BOX_MASK_HEAD.TEST_MASKS", "detector"]),
        (PANOPTIC, ["TEST.DETECTIONS_PER_IMAGE", "60"]),  # of 100 pairs (20 queries, 5 classes)
    ],
    ids=["instance", "refined_masks", "detector_masks", "panoptic_things"],
)
def test_predictor_gives_the_detectron2_models_instances(tmp_path, config, opts):
    """Same weights, same image: the predictor's instances are those of the detectron2
    model's own inference (its resizing and channel order; a box mask head's refined masks;
    the things of a panoptic model)."""
    cfg = load_config(config, opts)
    torch.manual_seed(0)
    model = perturb(build_model(cfg)).eval()
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    predictor = build_predictor(cfg, str(weights), input_format="BGR")
    assert predictor.max_detections == cfg.TEST.DETECTIONS_PER_IMAGE

    generator = np.random.default_rng(0)
    bgr = generator.integers(0, 256, (150, 100, 3), dtype=np.uint8)
    found = predictor([bgr])[0]

    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    resized = resize.get_transform(bgr).apply_image(bgr)
    network = resized if cfg.INPUT.FORMAT == "BGR" else resized[:, :, ::-1]
    image = torch.as_tensor(np.ascontiguousarray(network.transpose(2, 0, 1)))
    with torch.no_grad():
        expected = model([{"image": image, "height": 150, "width": 100}])[0]["instances"]
    assert found.image_size == expected.image_size == (150, 100)
    assert len(expected) > 0
    assert found.pred_classes.tolist() == expected.pred_classes.tolist()
    torch.testing.assert_close(found.scores, expected.scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(found.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=1e-4)
    assert torch.equal(found.pred_masks, expected.pred_masks)
    if config == PANOPTIC:  # things only, named by every class of the dataset
        things = set(model.segmentation.is_thing.nonzero()[:, 0].tolist())
        assert len(expected) < cfg.TEST.DETECTIONS_PER_IMAGE and set(found.pred_classes.tolist()) <= things
        assert len(predictor.class_names) == cfg.MODEL.DI_MASKDINO.NUM_CLASSES


@pytest.mark.parametrize(
    "speedups, size", [(True, (256, 288)), (False, (256, 288)), (True, (96, 128))], ids=["on", "off", "small_input"]
)
def test_cpu_speedups_follow_the_config(speedups, size):
    """TEST.CPU_SPEEDUPS decides whether the detectron2 model's inference runs its 3x3
    convolutions by NNPACK's Winograd transform (di_maskdino/cpu_inference/winograd.py): at
    256 x 288 the quick-start model's 64-channel maps at 1/4 qualify, at 96 x 128 none does.
    The library's default is off; the predictor follows the config too."""
    assert load_config(QUICK).TEST.CPU_SPEEDUPS is False
    cfg = load_config(QUICK, ["TEST.CPU_SPEEDUPS", str(speedups)])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.cpu_inference == (CPUInference() if speedups else None)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    predictor = build_predictor(cfg.clone(), allow_random_weights=True, min_size=0)
    expected = speedups and size[0] >= 256 and winograd_available()
    for run in (lambda: model([{"image": image}]), lambda: predictor([image])):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        assert (WINOGRAD_OP in {event.key for event in prof.key_averages()}) == expected
