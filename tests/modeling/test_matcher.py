"""The Hungarian matcher against brute force and hand-computed costs."""

import itertools
import math

import pytest
import torch

from di_maskdino.modeling import Predictions
from di_maskdino.modeling.matcher import HungarianMatcher, dice_cost, focal_class_cost, sigmoid_bce_cost
from di_maskdino.modeling.point_sampling import point_sample


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


@pytest.mark.parametrize(
    "num_predictions,num_targets,with_masks", [(4, 3, False), (5, 5, True), (6, 2, True), (3, 3, False)]
)
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
        sum(
            -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))
            for x, t in zip([1.0, -2.0, 0.0], row)
        )
        / 3
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


def plain_mask_cost(matcher, prediction, image, target_masks):
    """The mask costs written out plainly: every prediction's (h, w) logits point-sampled."""
    points = torch.rand(1, matcher.num_points, 2).to(prediction.logits.dtype)
    masks = prediction.masks[image][:, None]
    predicted = point_sample(masks, points.expand(masks.shape[0], -1, -1))
    wanted = point_sample(target_masks[:, None].to(masks.dtype), points.expand(target_masks.shape[0], -1, -1))
    return matcher.mask_weight * sigmoid_bce_cost(predicted, wanted) + matcher.dice_weight * dice_cost(
        predicted, wanted
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_factored_masks_give_the_plain_cost(chunk_size):
    """float64: embeddings . features sampled at the points equals sampling the logits,
    points in the border half-pixel (zero padding) included, in chunks of any size."""
    generator = torch.Generator().manual_seed(0)
    embed = torch.randn(2, 7, 5, generator=generator, dtype=torch.float64)
    features = torch.randn(2, 5, 6, 8, generator=generator, dtype=torch.float64)
    logits = torch.randn(2, 7, 3, generator=generator, dtype=torch.float64)
    boxes = torch.rand(2, 7, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.25
    factored = Predictions(logits, boxes, mask_embed=embed, mask_features=features)
    target = dict(
        labels=torch.tensor([0, 2, 1]),
        boxes=torch.rand(3, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.25,
        masks=(torch.rand(3, 24, 32, generator=generator) > 0.5).double(),
    )
    matcher = HungarianMatcher(num_points=500, chunk_size=chunk_size)
    torch.manual_seed(0)
    cost = matcher.mask_cost(factored, 1, target["masks"])
    torch.manual_seed(0)
    expected = plain_mask_cost(matcher, Predictions(logits, boxes, factored.masks), 1, target["masks"])
    torch.testing.assert_close(cost, expected, rtol=1e-12, atol=1e-12)
    torch.manual_seed(1)
    rows, cols = matcher(factored, [target, target])[1]
    torch.manual_seed(1)
    assert (rows.tolist(), cols.tolist()) == tuple(
        x.tolist() for x in matcher(Predictions(logits, boxes, factored.masks), [target, target])[1]
    )


def test_stuff_targets_are_matched_without_box_costs():
    """Two predictions, one target. By class alone prediction 1 is cheaper; by box, prediction
    0 (whose box equals the target's) wins. A stuff target ("has_box" False) ignores the box."""
    prediction = Predictions(
        logits=torch.tensor([[[-0.5, -3.0], [0.5, -3.0]]]),
        boxes=torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.1, 0.1]]]),
    )
    target = dict(labels=torch.tensor([0]), boxes=torch.tensor([[0.5, 0.5, 0.4, 0.4]]))
    matcher = HungarianMatcher()
    assert matcher(prediction, [target])[0][0].tolist() == [0]
    assert matcher(prediction, [{**target, "has_box": torch.tensor([True])}])[0][0].tolist() == [0]
    assert matcher(prediction, [{**target, "has_box": torch.tensor([False])}])[0][0].tolist() == [1]
    cost = matcher.cost_matrix(prediction, 0, {**target, "has_box": torch.tensor([False])})
    torch.testing.assert_close(cost, 4.0 * focal_class_cost(prediction.logits[0], target["labels"]))
