"""The trainer's checks: non-finite losses stop the run clearly; evaluation metrics are
strict JSON and an evaluation without predictions scores as pycocotools does."""

import itertools
import json
import math
import os

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.evaluation import COCOEvaluator  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from di_maskdino.d2 import NonFiniteLossError  # noqa: E402
from di_maskdino.d2.engine.train_step import TrainStep  # noqa: E402
from di_maskdino.d2.engine.trainer import Trainer, finite_or_null  # noqa: E402
from di_maskdino.d2.evaluation import InstanceEvaluator  # noqa: E402
from tests.d2.data.test_datasets import coco, register  # noqa: E402


class LossModel(torch.nn.Module):
    def __init__(self, losses):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.losses = losses

    def forward(self, data):
        if isinstance(self.losses, Exception):
            raise self.losses
        return {k: self.weight.sum() * v for k, v in self.losses.items()}


def step(model, iteration=7):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
    trainer = TrainStep(model, itertools.repeat([{}]), optimizer)
    trainer.iter = iteration
    with EventStorage(iteration):
        trainer.run_step()


def test_a_non_finite_loss_stops_with_iteration_terms_and_causes():
    model = LossModel({"loss_ce": 1.0, "loss_giou_3": float("nan"), "loss_bbox_dn": float("inf")})
    with pytest.raises(NonFiniteLossError) as error:
        step(model)
    message = str(error.value)
    assert "iteration 7" in message and "2 of 3 terms - loss_bbox_dn, loss_giou_3" in message
    assert "SOLVER.BASE_LR" in message and "0.25" in message and "degenerate" in message and "--resume" in message
    assert torch.equal(model.weight, torch.ones(3))  # the step was not taken


def test_the_matchers_error_gains_the_iteration():
    model = LossModel(FloatingPointError("HungarianMatcher: the matching cost of decoder output 2 is not finite"))
    with pytest.raises(FloatingPointError, match="^iteration 12: HungarianMatcher: the matching cost"):
        step(model, iteration=12)


def test_finite_losses_step_normally():
    model = LossModel({"loss_ce": 1.0})
    step(model)
    assert torch.allclose(model.weight, torch.full((3,), 0.75))


def evaluate_without_predictions(evaluator_class, tmp_path):
    name, _ = register(tmp_path, coco(tmp_path))
    evaluator = evaluator_class(name, tasks=("bbox", "segm"), output_dir=None)
    evaluator.reset()
    for image_id in (1, 2):
        empty = Instances((32, 32))
        empty.pred_boxes = Boxes(torch.zeros(0, 4))
        empty.scores = torch.zeros(0)
        empty.pred_classes = torch.zeros(0, dtype=torch.int64)
        empty.pred_masks = torch.zeros(0, 32, 32, dtype=torch.bool)
        evaluator.process([{"image_id": image_id, "height": 32, "width": 32}], [{"instances": empty}])
    return evaluator.evaluate()


def test_an_evaluation_without_predictions_scores_zero_where_the_data_has_objects(tmp_path):
    """Both objects are small (10 x 10 px): pycocotools gives AP 0 overall and for small
    objects, and -1 (no objects) for medium and large, which detectron2 writes as NaN."""
    metrics = evaluate_without_predictions(InstanceEvaluator, tmp_path)
    for task in ("bbox", "segm"):
        assert metrics[task]["AP"] == 0.0 and metrics[task]["AP50"] == 0.0 and metrics[task]["APs"] == 0.0
        assert math.isnan(metrics[task]["APm"]) and math.isnan(metrics[task]["APl"])
    plain_folder = tmp_path / "plain"
    plain_folder.mkdir()
    plain = evaluate_without_predictions(COCOEvaluator, plain_folder)
    assert math.isnan(plain["bbox"]["AP"])  # detectron2's own evaluator: NaN (the test can fail)
    # written as strict JSON: null, not NaN
    text = json.dumps(finite_or_null(metrics), allow_nan=False)
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert parsed["bbox"]["APl"] is None and parsed["bbox"]["AP"] == 0.0


@pytest.mark.parametrize("dtype", ["", "bfloat16"])
def test_evaluation_runs_under_test_autocast_dtype(tmp_path, dtype):
    """TEST.AUTOCAST_DTYPE: the model's forward in evaluation runs under autocast to that dtype
    (the backbone's output is bfloat16), or in float32 when empty; the metrics are written."""
    from detectron2.modeling import build_model

    from di_maskdino.d2 import load_config
    from tests.tooling import QUICK

    name, _ = register(tmp_path, coco(tmp_path))
    cfg = load_config(QUICK, ["DATASETS.TEST", f"('{name}',)", "TEST.AUTOCAST_DTYPE", dtype])
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    os.makedirs(cfg.OUTPUT_DIR)
    model = build_model(cfg).eval()
    seen = set()
    model.backbone.register_forward_hook(lambda module, args, out: seen.update(v.dtype for v in out.values()))
    Trainer.test(cfg, model)
    assert seen == {torch.bfloat16 if dtype else torch.float32}
    assert (tmp_path / "out" / f"metrics_{name}.json").is_file()
