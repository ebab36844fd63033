"""The set criterion against hand-computed losses, and on the whole model."""

import math

import pytest
import torch

from di_maskdino.modeling import DenoisingOutput, DIMaskDINOOutput, Predictions
from di_maskdino.modeling.criterion import SetCriterion
from di_maskdino.modeling.matcher import HungarianMatcher
from di_maskdino.modeling.point_sampling import point_sample, uncertain_point_coords

from ..layers.test_activation_checkpointing import saved_bytes
from .tiny import perturb, tiny_images, tiny_mask_targets, tiny_model


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


def release_giou_float64(box, target, eps=1e-6):
    """GIoU as the release computes it (IoU = inter / (union + eps), hull term over hull + eps),
    by hand in float64 for one pair of normalised xyxy boxes."""
    (a0, a1, a2, a3), (b0, b1, b2, b3) = box, target
    inter = max(0.0, min(a2, b2) - max(a0, b0)) * max(0.0, min(a3, b3) - max(a1, b1))
    union = (a2 - a0) * (a3 - a1) + (b2 - b0) * (b3 - b1) - inter
    hull = (max(a2, b2) - min(a0, b0)) * (max(a3, b3) - min(a1, b1))
    return inter / (union + eps) - (hull - union) / (hull + eps)


def test_giou_loss_uses_the_release_epsilon_on_small_boxes():
    """A 6 x 7 px prediction in a 1024 px image, 1 px off, and an exact 8 x 8 px prediction,
    which in the release keeps a loss of about eps / area (torchvision's loss would be 0)."""
    px = 1 / 1024
    target_boxes = torch.tensor([[0.5, 0.5, 6 * px, 7 * px], [0.3, 0.3, 8 * px, 8 * px]], dtype=torch.float64)
    predicted = torch.tensor([[0.5 + px, 0.5, 6 * px, 7 * px], [0.3, 0.3, 8 * px, 8 * px]], dtype=torch.float64)
    criterion = SetCriterion(HungarianMatcher(num_points=16), num_points=16)
    prediction = Predictions(torch.zeros(1, 2, 2, dtype=torch.float64), predicted[None], None)
    target = dict(labels=torch.tensor([0, 1]), boxes=target_boxes)
    indices = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    # .float() inside the criterion: compare with the float64 reference at float32 precision
    loss = criterion.losses(prediction, [target], indices, num_objects=1.0)["loss_giou"].item()

    def xyxy(b):
        return (b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2)

    release = [1 - release_giou_float64(xyxy(p.tolist()), xyxy(t.tolist())) for p, t in zip(predicted, target_boxes)]
    torchvision_like = [
        1 - release_giou_float64(xyxy(p.tolist()), xyxy(t.tolist()), eps=0.0) for p, t in zip(predicted, target_boxes)
    ]
    assert release[1] == pytest.approx(1e-6 / (64 * px * px + 1e-6), rel=1e-9)  # the perfect box's residual loss
    assert loss == pytest.approx(sum(release), rel=2e-5)
    assert abs(sum(release) - sum(torchvision_like)) > 1e2 * 2e-5 * sum(release)  # the test tells them apart


def test_matching_cost_uses_the_release_giou():
    from di_maskdino.modeling.matcher import generalized_box_iou

    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(5, 2, generator=generator, dtype=torch.float64) * 0.5
    boxes1 = torch.cat([corner, corner + torch.rand(5, 2, generator=generator, dtype=torch.float64) * 0.01], 1)
    boxes2 = boxes1[:3] + 0.002
    pairwise = generalized_box_iou(boxes1, boxes2)
    for i in range(5):
        for j in range(3):
            expected = release_giou_float64(boxes1[i].tolist(), boxes2[j].tolist())
            assert pairwise[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    matcher = HungarianMatcher(class_weight=0.0, box_weight=0.0, giou_weight=1.0)
    prediction = Predictions(torch.zeros(1, 5, 2), box_convert_cxcywh(boxes1).float()[None], None)
    target = dict(labels=torch.zeros(3, dtype=torch.int64), boxes=box_convert_cxcywh(boxes2).float())
    cost = matcher.cost_matrix(prediction, 0, target)
    assert torch.allclose(cost.double(), -pairwise, rtol=1e-4, atol=1e-4)
    # torchvision's GIoU (no epsilon) differs by more than that on these 1-5 px boxes
    from torchvision.ops import generalized_box_iou as torchvision_giou

    assert not torch.allclose(torchvision_giou(boxes1, boxes2), pairwise, rtol=1e-4, atol=1e-4)


def box_convert_cxcywh(xyxy):
    from torchvision.ops import box_convert

    return box_convert(xyxy, "xyxy", "cxcywh")


class ReferenceCriterion(SetCriterion):
    """The mask losses written out plainly (the formulation before the memory work): every
    query's (h, w) mask logits, indexed by the matches, the target masks copied per match,
    both point-sampled, no checkpointing. Tests compare the criterion with it."""

    def mask_losses(self, prediction, targets, indices, batch, source, num_objects):
        predicted = prediction.masks[batch, source][:, None]
        wanted = torch.cat([t["masks"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(predicted)[:, None]
        points = uncertain_point_coords(predicted, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
        labels = point_sample(wanted, points)
        logits = point_sample(predicted, points)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * labels).sum(1) + 1) / (prob.sum(1) + labels.sum(1) + 1)
        return {"loss_mask": bce.sum() / num_objects, "loss_dice": dice.sum() / num_objects}


def dense(output):
    """The output with every factored mask prediction turned into (B, N, h, w) logits."""

    def convert(p):
        return Predictions(p.logits, p.boxes, p.masks) if p.has_masks else p

    denoising = output.denoising
    if denoising is not None:
        denoising = DenoisingOutput(denoising.queries, [convert(p) for p in denoising.layers])
    return DIMaskDINOOutput(
        [convert(p) for p in output.layers], convert(output.encoder), output.token_interaction, denoising
    )


def test_factored_mask_losses_equal_the_plain_formulation_and_keep_less():
    """float64, training mode with denoising: the same losses and gradients as the plain
    formulation on (B, N, h, w) logits, and less kept for backward."""
    targets = tiny_mask_targets(torch.float64)
    results = []
    for criterion_class, convert in ((SetCriterion, lambda o: o), (ReferenceCriterion, dense)):
        model = perturb(tiny_model()).double().train()
        batch, _ = model.preprocess(tiny_images())
        torch.manual_seed(0)
        output = model(batch.double(), targets=targets)
        assert output.final.mask_embed is not None  # the model gives factored masks in training
        criterion = criterion_class(HungarianMatcher(num_points=64), num_points=64)
        saved, losses = saved_bytes(lambda c=criterion, f=convert, o=output: c(f(o), targets))
        sum(losses.values()).backward()
        results.append((saved, losses, {n: p.grad for n, p in model.named_parameters()}))
    (saved, losses, grads), (ref_saved, ref_losses, ref_grads) = results
    assert set(losses) == set(ref_losses)
    for key in losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-10, atol=1e-12, msg=key)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    assert saved < ref_saved / 2


def test_point_labels_sample_each_target_for_all_its_matches():
    generator = torch.Generator().manual_seed(0)
    targets = [
        dict(masks=torch.rand(3, 10, 12, generator=generator)),
        dict(masks=torch.rand(2, 10, 12, generator=generator)),
    ]
    indices = [(torch.tensor([4, 1, 7, 0]), torch.tensor([2, 0, 2, 1])), (torch.tensor([3]), torch.tensor([1]))]
    points = torch.rand(5, 7, 2, generator=generator)
    labels = SetCriterion.point_labels(targets, indices, points)
    copies = torch.cat([t["masks"][tgt] for t, (_, tgt) in zip(targets, indices)])[:, None]
    torch.testing.assert_close(labels, point_sample(copies, points), rtol=0, atol=0)


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
    # GIoU losses with the release's epsilon (the docstring's figures, exact without it)
    thing = 1 - release_giou_float64((0.4, 0.4, 0.6, 0.6), (0.4, 0.3, 0.6, 0.7))
    stuff = 1 - release_giou_float64((0.2, 0.2, 0.4, 0.4), (0.2, 0.2, 0.8, 0.8))
    assert thing == pytest.approx(0.5, rel=1e-4) and stuff == pytest.approx(8 / 9, rel=1e-4)
    l1, giou = (0.2 + 1.2, thing + stuff) if stuff_box_loss else (0.2, thing)
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
