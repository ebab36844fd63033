"""Matcher and criterion against brute force and hand-computed values."""
import itertools
import math

import pytest
import torch

from di_maskdino.modeling import Predictions
from di_maskdino.modeling.criterion import SetCriterion
from di_maskdino.modeling.matcher import HungarianMatcher, dice_cost, focal_class_cost, sigmoid_bce_cost
from di_maskdino.modeling.point_sampling import uncertain_point_coords

from .tiny import tiny_images, tiny_model


def random_problem(num_predictions, num_targets, with_masks, seed, size=8):
    generator = torch.Generator().manual_seed(seed)
    prediction = Predictions(
        logits=torch.randn(1, num_predictions, 3, generator=generator),
        boxes=torch.rand(1, num_predictions, 4, generator=generator) * 0.5 + 0.25,
        masks=torch.randn(1, num_predictions, size, size, generator=generator) if with_masks else None,
    )
    target = dict(
        labels=torch.randint(0, 3, (num_targets,), generator=generator),
        boxes=torch.rand(num_targets, 4, generator=generator) * 0.5 + 0.25,
        masks=(torch.rand(num_targets, size * 4, size * 4, generator=generator) > 0.5).float(),
    )
    return prediction, target


@pytest.mark.parametrize("num_predictions,num_targets,with_masks", [(4, 3, False), (5, 5, True), (6, 2, True), (3, 3, False)])
def test_matching_is_the_cheapest_assignment(num_predictions, num_targets, with_masks):
    """Brute force over every injective assignment of targets to predictions."""
    for seed in range(3):
        prediction, target = random_problem(num_predictions, num_targets, with_masks, seed)
        matcher = HungarianMatcher(num_points=64)
        torch.manual_seed(seed)
        cost = matcher.cost_matrix(prediction, 0, target).double()
        torch.manual_seed(seed)  # the same sampled points inside the matcher
        rows, cols = matcher(prediction, [target])[0]
        assert len(rows) == num_targets and sorted(cols.tolist()) == list(range(num_targets))
        chosen = cost[rows, cols].sum().item()
        best = min(
            sum(cost[p, t].item() for t, p in enumerate(assignment))
            for assignment in itertools.permutations(range(num_predictions), num_targets)
        )
        assert chosen == pytest.approx(best, abs=1e-9)


def test_cost_terms_against_hand_computations():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    labels = torch.tensor([1, 0])
    alpha, gamma = 0.25, 2.0
    expected = torch.zeros(2, 2)
    for i in range(2):
        for j in range(2):
            p = 1 / (1 + math.exp(-logits[i, labels[j]].item()))
            expected[i, j] = alpha * (1 - p) ** gamma * -math.log(p) - (1 - alpha) * p**gamma * -math.log(1 - p)
    torch.testing.assert_close(focal_class_cost(logits, labels), expected)

    point_logits = torch.tensor([[1.0, -2.0, 0.0]])
    point_targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    bce = [
        sum(-(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x)))) for x, t in zip([1.0, -2.0, 0.0], row)) / 3
        for row in point_targets.tolist()
    ]
    torch.testing.assert_close(sigmoid_bce_cost(point_logits, point_targets), torch.tensor([bce]))
    prob = point_logits.sigmoid()[0]
    dice = [1 - (2 * (prob * t).sum() + 1) / (prob.sum() + t.sum() + 1) for t in point_targets]
    torch.testing.assert_close(dice_cost(point_logits, point_targets), torch.stack(dice)[None])


def test_matcher_half_precision_and_empty_targets():
    prediction, target = random_problem(5, 3, True, 0)
    half = Predictions(prediction.logits.half(), prediction.boxes.half(), prediction.masks.half())
    empty = dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4), masks=torch.zeros(0, 32, 32))
    matches = HungarianMatcher(num_points=64)(half, [target])
    assert len(matches[0][0]) == 3
    rows, cols = HungarianMatcher()(Predictions(prediction.logits, prediction.boxes), [empty])[0]
    assert rows.numel() == cols.numel() == 0


def test_non_finite_cost_names_the_output():
    prediction, target = random_problem(4, 2, False, 0)
    prediction.logits[0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="decoder layer 3.*image 0"):
        HungarianMatcher()(prediction, [target], name="decoder layer 3")


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
        "di_maskdino.modeling.criterion.uncertain_point_coords", lambda logits, n, *_: torch.full((logits.shape[0], n, 2), 0.5)
    )
    criterion = SetCriterion(HungarianMatcher(num_points=16), num_points=16, denoising=False)
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
    plain = SetCriterion(HungarianMatcher(num_points=16), num_points=16, denoising=False)
    constrained = SetCriterion(HungarianMatcher(num_points=16), num_points=16, denoising=False, detection_loss_factor=0.1)
    assert plain.weights == {"loss_ce": 4.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    assert constrained.weights == pytest.approx({"loss_ce": 0.4, "loss_bbox": 0.5, "loss_giou": 0.2, "loss_mask": 5.0, "loss_dice": 5.0})


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
        dict(labels=torch.tensor([0, 2]), boxes=torch.tensor([[35 / 96, 20 / 64, 30 / 96, 20 / 64], [20 / 96, 40 / 64, 20 / 96, 20 / 64]]), masks=masks),
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
