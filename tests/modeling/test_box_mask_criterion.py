"""The box mask head's objective against hand-made box-frame masks, and training the head on
a frozen detector: the detector runs without autograd and stays unchanged, the head learns,
and (slow) a short run improves mask AP over the detector's own masks."""

import pytest
import torch

from di_maskdino.modeling import BoxMaskCriterion, BoxMaskHeadSpec, BoxMasks, build_model
from di_maskdino.modeling.box_mask_criterion import BoxMatches, box_frame_to_image
from di_maskdino.modeling.criterion import SetCriterion
from di_maskdino.modeling.matcher import HungarianMatcher

from .test_overfit import coco_ap, overfit_model, scenes_and_targets
from .tiny import TinyBackbone, tiny_architecture, tiny_images, tiny_targets

SIZE = 64


def rectangle_target():
    """One object: the rectangle x 24..40, y 16..32 of a 64 x 64 image."""
    masks = torch.zeros(1, SIZE, SIZE)
    masks[0, 16:32, 24:40] = 1.0
    box = torch.tensor([[32 / SIZE, 24 / SIZE, 16 / SIZE, 16 / SIZE]])
    return [{"labels": torch.tensor([0]), "boxes": box, "masks": masks}]


# The predicted box x 16..48, y 8..40 (4 px per cell of an 8 x 8 box frame): the rectangle
# is cells 2..5 in x and y.
BOX = torch.tensor([[32 / SIZE, 24 / SIZE, 32 / SIZE, 32 / SIZE]])
MATCH = BoxMatches(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))


def box_frame(rows, cols, inside=20.0):
    logits = torch.full((1, 8, 8), -inside)
    logits[0, rows, cols] = inside
    return logits


def test_box_frame_points_map_into_the_box():
    points = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.5, 0.25]]])
    mapped = box_frame_to_image(points, BOX) * SIZE
    torch.testing.assert_close(mapped, torch.tensor([[[16.0, 8.0], [48.0, 40.0], [32.0, 16.0]]]))


def test_losses_are_lowest_for_the_mask_in_its_box():
    """The box-frame mask that is the object (cells 2..5) is charged far less than the same
    mask one cell off, or the object's mask in image cells (the wrong frame)."""
    torch.manual_seed(0)
    criterion = BoxMaskCriterion(HungarianMatcher(), num_points=4096, importance_sample_ratio=0.0)
    targets = rectangle_target()

    def loss(logits):
        losses = criterion(BoxMasks(logits, BOX), targets, MATCH)
        return float(losses["loss_box_mask"] + losses["loss_box_dice"])

    right = loss(box_frame(slice(2, 6), slice(2, 6)))
    shifted = loss(box_frame(slice(2, 6), slice(3, 7)))
    image_frame = loss(box_frame(slice(4, 8), slice(6, 8)))
    assert right < 0.3 * shifted and right < 0.2 * image_frame, (right, shifted, image_frame)


def test_quality_target_is_the_mask_iou_in_the_box():
    targets = rectangle_target()
    wanted = targets[0]["masks"][None]
    full = BoxMaskCriterion.mask_iou(box_frame(slice(2, 6), slice(2, 6))[:, None], BOX, wanted)
    half = BoxMaskCriterion.mask_iou(box_frame(slice(2, 4), slice(2, 6))[:, None], BOX, wanted)
    double = BoxMaskCriterion.mask_iou(box_frame(slice(2, 6), slice(2, 8))[:, None], BOX, wanted)
    torch.testing.assert_close(torch.cat([full, half, double]), torch.tensor([1.0, 0.5, 16 / 24]))
    criterion = BoxMaskCriterion(HungarianMatcher(), quality_weight=2.0)
    quality = torch.tensor([0.0], requires_grad=True)  # predicts IoU 0.5
    losses = criterion(BoxMasks(box_frame(slice(2, 4), slice(2, 6)), BOX, quality), targets, MATCH)
    assert losses["loss_box_quality"].item() == pytest.approx(0.0, abs=1e-7)
    losses = criterion(BoxMasks(box_frame(slice(2, 6), slice(2, 6)), BOX, quality), targets, MATCH)
    assert losses["loss_box_quality"].item() == pytest.approx(2.0 * 0.25)


def head_model(seed=0):
    torch.manual_seed(seed)
    spec = BoxMaskHeadSpec(hidden_dim=16, roi_size=7, mask_size=14, fine_feature="image")
    return build_model(tiny_architecture(box_mask_head=spec), TinyBackbone())


def frozen(model):
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("box_mask_head."))
    return model


def targets_with_masks(batch):
    targets = tiny_targets()
    for target in targets:
        target["masks"] = torch.zeros(len(target["labels"]), *batch.shape[-2:])
        target["masks"][:, 8:30, 10:40] = 1.0
    return targets


def test_frozen_detector_runs_as_at_inference_without_autograd():
    model = frozen(head_model()).train()
    batch, _ = model.preprocess(tiny_images())
    output = model(batch, targets_with_masks(batch))
    assert not model.detector_trains
    assert model.head.training and model.backbone.training  # modes restored
    assert output.denoising is None  # no denoising queries
    assert all(layer.masks is None for layer in output.layers[:-1]) and output.final.masks is not None
    assert not output.final.embeddings.requires_grad and not output.final.masks.requires_grad
    assert output.box_features.maps.requires_grad  # the head's own image-feature encoder trains
    model.eval()
    with torch.no_grad():
        expected = model(batch)
    torch.testing.assert_close(output.final.boxes, expected.final.boxes)
    torch.testing.assert_close(output.final.masks, expected.final.masks)


def test_training_the_head_leaves_the_detector_unchanged():
    model = frozen(head_model()).train()
    criterion = BoxMaskCriterion(HungarianMatcher(num_points=256), num_points=196)
    # no weight decay: a parameter changes only through its gradient
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    detector_before = {n: p.detach().clone() for n, p in model.detector_parameters()}
    head_before = {n: p.detach().clone() for n, p in model.box_mask_head.named_parameters()}
    batch, _ = model.preprocess(tiny_images())
    targets = targets_with_masks(batch)
    for _ in range(2):  # the zero-initialised output layer passes gradients on from the second step
        output = model(batch, targets)
        matches = criterion.match(output.final, targets)
        masks = model.box_masks(output, matches.image, matches.query)
        losses = criterion(masks, targets, matches)
        assert set(losses) == {"loss_box_mask", "loss_box_dice", "loss_box_quality"}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    for name, parameter in model.detector_parameters():
        assert parameter.grad is None, name
        assert torch.equal(parameter, detector_before[name]), name
    changed = [n for n, p in model.box_mask_head.named_parameters() if not torch.equal(p, head_before[n])]
    assert len(changed) == len(head_before)


def test_no_object_gives_zero_losses_in_the_graph():
    model = frozen(head_model()).train()
    criterion = BoxMaskCriterion(HungarianMatcher(num_points=256), num_points=196)
    batch, _ = model.preprocess(tiny_images())
    targets = [
        {
            "labels": torch.zeros(0, dtype=torch.int64),
            "boxes": torch.zeros(0, 4),
            "masks": torch.zeros(0, *batch.shape[-2:]),
        }
    ] * 2
    output = model(batch, targets)
    matches = criterion.match(output.final, targets)
    assert len(matches) == 0
    losses = criterion(model.box_masks(output, matches.image, matches.query), targets, matches)
    assert all(value.item() == 0.0 and value.requires_grad for value in losses.values())


@pytest.mark.slow
def test_refined_masks_beat_the_frozen_detector_after_a_short_run():
    """A small detector trained briefly on four synthetic scenes (good boxes, masks from its
    stride-4 dot product), then frozen; 60 iterations of the box mask head (reading the
    image itself as the fine map, RoIs enlarged 1.25x) raise mask AP above the detector's
    own masks, measured by pycocotools on the same scenes."""
    torch.manual_seed(0)
    scenes, targets = scenes_and_targets(4)
    images = [torch.from_numpy(image).permute(2, 0, 1).float() for image, _, _ in scenes]
    spec = BoxMaskHeadSpec(
        hidden_dim=32, roi_size=14, mask_size=28, box_encoder_layers=2, fine_feature="image", box_expansion=1.25
    )
    model = overfit_model(box_mask_head=spec)
    batch, sizes = model.preprocess(images)
    padded = tuple(batch.shape[-2:])

    detector = [p for name, p in model.detector_parameters()]
    for p in model.box_mask_head.parameters():
        p.requires_grad_(False)
    criterion = SetCriterion(HungarianMatcher(num_points=1024), num_points=1024)
    optimizer = torch.optim.AdamW(detector, lr=5e-4, weight_decay=0.0)
    model.train()
    for _ in range(100):
        losses = criterion(model(batch, targets=targets), targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(detector, 0.1)
        optimizer.step()

    def evaluate():
        model.eval()
        with torch.no_grad():
            output = model.run(batch)
            own = coco_ap(scenes, model.instances(output.final, sizes, padded, sizes))
            refined = coco_ap(scenes, model.refined_instances(output, sizes, padded, sizes))
        return own, refined

    own, untrained = evaluate()
    assert own["bbox"] > 0.6, own  # the boxes the head is conditioned on

    frozen(model)
    box_criterion = BoxMaskCriterion(HungarianMatcher(num_points=1024), num_points=784)
    optimizer = torch.optim.AdamW(model.box_mask_head.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(60):
        output = model(batch, targets=targets)
        matches = box_criterion.match(output.final, targets)
        losses = box_criterion(model.box_masks(output, matches.image, matches.query), targets, matches)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    own_after, refined = evaluate()
    assert own_after == own  # the detector did not change
    # the detector's masks are already good here (mask AP about 0.94): the head must close at
    # least a third of what is left to 1.0
    assert refined["segm"] - own["segm"] >= (1.0 - own["segm"]) / 3, (own, untrained, refined)
    assert refined["segm"] >= untrained["segm"] + 0.02, (own, untrained, refined)
