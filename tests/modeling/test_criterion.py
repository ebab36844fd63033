"""The set criterion against hand-computed losses, and on the whole model."""

import math

import pytest
import torch

from di_maskdino.modeling import Predictions
from di_maskdino.modeling.criterion import SetCriterion
from di_maskdino.modeling.matcher import HungarianMatcher
from di_maskdino.modeling.point_sampling import uncertain_point_coords

from .tiny import tiny_images, tiny_model


def hand_case():
    """One image, two queries, one target matched to query 1: constant mask logits make the
    point-sampled mask losses exact."""
    logits = torch.tensor([[[0.5, -1.0], [-0.2, 1.5]]])
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.55, 0.5, 0.4, 0.3]]])
    masks = torch.full((1, 2, 4, 4), 0.7)
    target = dict(labels=torch.tensor([1]), boxes=torch.tensor([[0.5, 0.5, 0.4, 0.4]]), masks=torch.ones(1, 16, 16))
    return Predictions(logits, boxes, masks), target


def test_losses_against_hand_computations(monkeypatch):
    prediction, target = hand_case()
    # sample the masks at interior points, away from grid_sample's zero padding
    monkeypatch.setattr(
        "di_maskdino.modeling.criterion.uncertain_point_coords",
        lambda logits, n, *_: torch.full((logits.shape[0], n, 2), 0.5),
    )
    criterion = SetCriterion(HungarianMatcher(num_points=16), num_points=16)
    losses = criterion.losses(prediction, [target], [(torch.tensor([1]), torch.tensor([0]))], num_objects=1.0)

    def focal(x, t, alpha=0.25, gamma=2.0):
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma

    expected_ce = focal(0.5, 0) + focal(-1.0, 0) + focal(-0.2, 0) + focal(1.5, 1)
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.05 + 0.0 + 0.0 + 0.1, rel=1e-5)
    # boxes (0.35, 0.35, 0.75, 0.65) and (0.3, 0.3, 0.7, 0.7): intersection 0.35 * 0.3,
    # union 0.12 + 0.16 - 0.105, enclosing 0.45 * 0.4
    inter, union, hull = 0.35 * 0.3, 0.12 + 0.16 - 0.105, 0.45 * 0.4
    assert losses["loss_giou"].item() == pytest.approx(1 - (inter / union - (hull - union) / hull), rel=1e-5)
    p = 1 / (1 + math.exp(-0.7))
    assert losses["loss_mask"].item() == pytest.approx(-math.log(p), rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(1 - (2 * 16 * p + 1) / (16 * p + 16 + 1), rel=1e-5)


def test_importance_sampling_prefers_uncertain_points():
    torch.manual_seed(0)
    logits = torch.full((1, 1, 20, 20), 8.0)
    logits[..., :, :5] = 0.0  # the left quarter is uncertain
    points = uncertain_point_coords(logits, num_points=100, oversample_ratio=3.0, importance_ratio=0.75)
    assert points.shape == (1, 100, 2)
    # the 75 importance-sampled points all lie in (or at the border of) the uncertain quarter
    assert (points[0, :75, 0] <= 5.5 / 20).all()
    # the 25 others are uniform: most of them elsewhere
    assert (points[0, 75:, 0] > 0.3).float().mean() > 0.4


def test_weights_and_tolerance_factor():
    prediction, target = hand_case()
    plain = SetCriterion(HungarianMatcher(num_points=16), num_points=16)
    constrained = SetCriterion(HungarianMatcher(num_points=16), num_points=16, detection_loss_factor=0.1)
    assert plain.weights == {"loss_ce": 4.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    assert constrained.weights == pytest.approx(
        {"loss_ce": 0.4, "loss_bbox": 0.5, "loss_giou": 0.2, "loss_mask": 5.0, "loss_dice": 5.0}
    )


def model_losses(targets, **criterion_args):
    model = tiny_model()
    model.train()
    batch, _ = model.preprocess(tiny_images())
    output = model(batch, targets=targets)
    criterion = SetCriterion(HungarianMatcher(num_points=64), num_points=64, **criterion_args).train()
    return model, criterion(output, targets)


def tiny_mask_targets():
    masks = torch.zeros(2, 64, 96)
    masks[0, 10:30, 20:50] = 1
    masks[1, 30:50, 10:30] = 1
    return [
        dict(
            labels=torch.tensor([0, 2]),
            boxes=torch.tensor([[35 / 96, 20 / 64, 30 / 96, 20 / 64], [20 / 96, 40 / 64, 20 / 96, 20 / 64]]),
            masks=masks,
        ),
        dict(labels=torch.tensor([1]), boxes=torch.tensor([[0.5, 0.5, 0.3, 0.3]]), masks=torch.ones(1, 64, 96)),
    ]


def test_every_supervised_output_is_charged():
    model, losses = model_losses(tiny_mask_targets())
    layers = len(model.head.decoder.layers)  # + the initial prediction
    expected = set()
    for suffix in [""] + [f"_{i}" for i in range(layers)] + ["_interm", "_dn"] + [f"_dn_{i}" for i in range(layers)]:
        expected |= {term + suffix for term in ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")}
    for i in range(2):
        expected |= {term + f"_ti0_{i}" for term in ("loss_ce", "loss_bbox", "loss_giou")}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_images_without_objects():
    empty = [dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4), masks=torch.zeros(0, 64, 96))] * 2
    model, losses = model_losses(empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_dice"] == 0 and losses["loss_ce"] > 0
    _, with_objects = model_losses(tiny_mask_targets())
    assert set(losses) == set(with_objects)  # same names on every worker
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# --- panoptic / semantic targets: box losses for things only (issue 15) ---


def thing_and_stuff_case():
    """Query 0 matched to a thing, query 1 to a stuff region. Thing pair: L1 0.2, GIoU loss
    0.5 (boxes (.4,.4,.6,.6) vs (.4,.3,.6,.7): inter .04 = union, hull .08). Stuff pair: L1
    1.2, GIoU loss 1 - 1/9 ((.2,.2,.4,.4) inside (.2,.2,.8,.8): inter .04, union = hull .36)."""
    prediction = Predictions(
        torch.zeros(1, 3, 2),
        torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.1, 0.1]]]),
        torch.zeros(1, 3, 4, 4),
    )
    target = dict(
        labels=torch.tensor([0, 1]),
        boxes=torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.6, 0.6]]),
        masks=torch.ones(2, 16, 16),
        is_thing=torch.tensor([True, False]),
    )
    return prediction, target, [(torch.tensor([0, 1]), torch.tensor([0, 1]))]


@pytest.mark.parametrize("stuff_box_loss", [False, True])
def test_box_losses_for_things_only(stuff_box_loss):
    prediction, target, indices = thing_and_stuff_case()
    criterion = SetCriterion(HungarianMatcher(num_points=16), num_points=16, stuff_box_loss=stuff_box_loss)
    targets = criterion.with_box_flags([target])
    losses = criterion.losses(prediction, targets, indices, num_objects=2.0)
    l1, giou = (0.2 + 1.2, 0.5 + 8 / 9) if stuff_box_loss else (0.2, 0.5)
    assert losses["loss_bbox"].item() == pytest.approx(l1 / 2, rel=1e-5)  # normalised by all targets
    assert losses["loss_giou"].item() == pytest.approx(giou / 2, rel=1e-5)
    # the class and mask losses still cover the stuff target
    without_flags = SetCriterion(HungarianMatcher(num_points=16), num_points=16, stuff_box_loss=True)
    plain = {k: v for k, v in target.items() if k != "is_thing"}
    torch.manual_seed(0)
    reference = without_flags.losses(prediction, [plain], indices, num_objects=2.0)
    assert losses["loss_ce"].item() == pytest.approx(reference["loss_ce"].item())
    torch.manual_seed(0)
    again = criterion.losses(prediction, targets, indices, num_objects=2.0)
    assert again["loss_mask"].item() == pytest.approx(reference["loss_mask"].item())


def test_is_thing_everywhere_equals_no_flags():
    """Instance targets (no "is_thing") and all-thing targets give the same losses; with only
    stuff, the box losses are zero but the box head stays in the graph."""
    targets = tiny_mask_targets()
    torch.manual_seed(0)
    _, plain = model_losses(targets)
    flagged = [{**t, "is_thing": torch.ones(len(t["labels"]), dtype=torch.bool)} for t in targets]
    torch.manual_seed(0)
    _, with_flags = model_losses(flagged)
    assert plain.keys() == with_flags.keys()
    for key in plain:
        assert torch.equal(plain[key], with_flags[key]), key
    stuff = [{**t, "is_thing": torch.zeros(len(t["labels"]), dtype=torch.bool)} for t in targets]
    model, losses = model_losses(stuff)
    box_terms = [k for k in losses if k.startswith(("loss_bbox", "loss_giou"))]
    assert all(losses[k] == 0 for k in box_terms) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
