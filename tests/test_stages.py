"""`di_maskdino.stages` (the explorer's computations): every stage's detections against the
model's raw per-layer outputs post-processed by hand, the box-mask agreement and the
ground-truth matching against brute force, and the drawing against the pixels it must set."""

import itertools

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import box_convert

from di_maskdino.modeling.postprocess import Detections
from di_maskdino.stages import (
    box_mask_iou,
    draw_detections,
    mask_boxes,
    match_ground_truth,
    stage_predictor,
)

from .modeling.tiny import perturb, tiny_model


@pytest.fixture(scope="module")
def model():
    return perturb(tiny_model()).eval()


def image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def by_hand(logits, boxes, masks, size, padded, topk):
    """One output of one image post-processed from its definition: the top-k (query, class)
    pairs by sigmoid score, boxes from normalised cxcywh of the padded input to pixels, mask
    logits upsampled to the padded input, cropped to the image, thresholded at 0, and the
    scores of outputs with masks multiplied by the mean mask probability inside the mask."""
    num_classes = logits.shape[1]
    scores, index = logits.sigmoid().flatten().topk(min(topk, logits.numel()))
    query, labels = index // num_classes, index % num_classes
    scale = torch.tensor([padded[1], padded[0], padded[1], padded[0]], dtype=boxes.dtype)
    xyxy = box_convert(boxes[query], "cxcywh", "xyxy") * scale
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, size[1])
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, size[0])
    found_masks = None
    if masks is not None:
        upsampled = F.interpolate(masks[query][None], size=padded, mode="bilinear", align_corners=False)[0]
        cropped = upsampled[:, : size[0], : size[1]]
        found_masks = cropped > 0
        inside = (cropped.sigmoid() * found_masks).flatten(1).sum(1)
        scores = scores * inside / (found_masks.flatten(1).sum(1) + 1e-6)
    return scores, labels, xyxy, found_masks


def test_every_stage_is_the_models_own_output_post_processed(model):
    rgb = image(0, 70, 100)  # padded to 96 x 128: the crop matters
    stages = stage_predictor(model, max_detections=None)([rgb])[0]
    tensor = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float()
    batch, sizes = model.preprocess([tensor])
    with torch.no_grad():
        output = model.run(batch, all_layer_masks=True)
    layers = len(output.layers)
    interaction = [f"TI {s}.{i}" for s, stage in enumerate(output.token_interaction) for i in range(len(stage))]
    assert [s.name for s in stages] == interaction + [f"layer {i}" for i in range(layers)]
    raw = dict(output.named())
    padded = tuple(batch.shape[-2:])
    for stage in stages:
        prediction = raw[stage.name]
        masks = None if prediction.masks is None else prediction.masks[0]
        scores, labels, boxes, expected_masks = by_hand(
            prediction.logits[0], prediction.boxes[0], masks, sizes[0], padded, model.test_topk
        )
        found = stage.detections
        torch.testing.assert_close(found.scores, scores, rtol=0, atol=1e-4)
        assert found.labels.tolist() == labels.tolist()
        torch.testing.assert_close(found.boxes, boxes, rtol=0, atol=1e-3)
        assert stage.has_masks == (expected_masks is not None) == stage.name.startswith("layer")
        if expected_masks is not None:
            agree = (found.masks == expected_masks).float().mean().item()
            assert agree >= 0.999, f"{stage.name}: {agree:.5f} of the mask pixels agree"
            assert stage.box_mask_iou.shape == (len(found),)
        else:
            assert stage.box_mask_iou is None


def test_threshold_and_count_apply_to_every_stage(model):
    rgb = image(1, 64, 64)
    every = stage_predictor(model, max_detections=None)([rgb])[0]
    kept = stage_predictor(model, score_threshold=0.3, max_detections=5)([rgb])[0]
    for full, part in zip(every, kept):
        expected = full.detections.filtered(0.3, 5)
        assert part.detections.scores.tolist() == expected.scores.tolist()
        assert len(part.detections) <= 5 and bool((part.detections.scores >= 0.3).all())


def test_stage_predictor_refuses_what_does_not_apply(model):
    with pytest.raises(ValueError, match="convert and class_mask"):
        stage_predictor(model, convert=lambda found, size: found)


def test_mask_boxes_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 9, 13, generator=generator) > 0.8
    masks[2] = False  # empty
    masks[3] = False
    masks[3, 4, 7] = True  # one pixel
    for mask, box in zip(masks, mask_boxes(masks).tolist()):
        rows, columns = np.nonzero(mask.numpy())
        expected = [0, 0, 0, 0] if len(rows) == 0 else [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
        assert box == expected


def test_box_mask_iou_by_hand():
    masks = torch.zeros(3, 20, 20, dtype=torch.bool)
    masks[0, 3:8, 2:6] = True  # spans x 2..6, y 3..8
    masks[1, 3:8, 2:6] = True
    masks[2] = False
    boxes = torch.tensor([[2.0, 3.0, 6.0, 8.0], [4.0, 3.0, 8.0, 8.0], [0.0, 0.0, 5.0, 5.0]])
    detections = Detections(torch.ones(3), torch.zeros(3, dtype=torch.int64), boxes, masks)
    # box 1 is shifted by half its width: intersection 2 x 5 = 10, union 4 x 5 + 4 x 5 - 10 = 30
    torch.testing.assert_close(box_mask_iou(detections), torch.tensor([1.0, 1 / 3, 0.0]))
    assert box_mask_iou(Detections(torch.ones(3), torch.zeros(3, dtype=torch.int64), boxes, None)) is None


def test_ground_truth_matching_against_every_assignment():
    generator = torch.Generator().manual_seed(3)
    for trial in range(20):
        n, m = int(torch.randint(1, 5, (1,), generator=generator)), int(torch.randint(1, 5, (1,), generator=generator))
        corner = torch.rand(n + m, 2, generator=generator) * 20
        size = torch.rand(n + m, 2, generator=generator) * 15 + 2
        boxes = torch.cat([corner, corner + size], 1)
        labels = torch.randint(0, 2, (n + m,), generator=generator)
        detections = Detections(torch.ones(n), labels[:n], boxes[:n], None)
        found = match_ground_truth(detections, boxes[n:], labels[n:])
        # brute force: every one-to-one assignment, the one of the largest summed IoU
        from torchvision.ops import box_iou

        ious = (box_iou(boxes[:n], boxes[n:]) * (labels[:n, None] == labels[None, n:])).numpy()
        best = 0.0
        for columns in itertools.permutations(range(max(n, m)), n):
            best = max(best, sum(ious[r, c] for r, c in enumerate(columns) if c < m))
        matched = found.index >= 0
        assert found.box_iou[matched].sum().item() == pytest.approx(best, abs=1e-5), trial
        assert len(set(found.index[matched].tolist())) == int(matched.sum())
        for r in range(n):
            c = int(found.index[r])
            if c >= 0:
                assert labels[r] == labels[n + c] and found.box_iou[r].item() == pytest.approx(ious[r, c])
            else:
                assert torch.isnan(found.box_iou[r])
        assert torch.isnan(found.mask_iou).all()  # no masks given


def test_ground_truth_mask_iou_by_hand():
    masks = torch.zeros(1, 10, 10, dtype=torch.bool)
    masks[0, 0:4, 0:4] = True
    gt_masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    gt_masks[0, 0:4, 2:6] = True  # overlaps 4 x 2 = 8, union 24
    gt_masks[1, 6:9, 6:9] = True
    detections = Detections(torch.ones(1), torch.tensor([1]), torch.tensor([[0.0, 0.0, 4.0, 4.0]]), masks)
    gt_boxes = torch.tensor([[2.0, 0.0, 6.0, 4.0], [6.0, 6.0, 9.0, 9.0]])
    found = match_ground_truth(detections, gt_boxes, torch.tensor([1, 1]), gt_masks)
    assert found.index.tolist() == [0]
    assert found.box_iou.item() == pytest.approx(8 / 24) and found.mask_iou.item() == pytest.approx(8 / 24)
    other_class = match_ground_truth(detections, gt_boxes, torch.tensor([0, 0]), gt_masks)
    assert other_class.index.tolist() == [-1]


def test_drawing_sets_the_pixels_of_boxes_and_masks():
    rgb = np.zeros((40, 50, 3), dtype=np.uint8)
    masks = torch.zeros(1, 40, 50, dtype=torch.bool)
    masks[0, 20:30, 30:40] = True
    detections = Detections(torch.tensor([0.9]), torch.tensor([2]), torch.tensor([[5.0, 5.0, 15.0, 15.0]]), masks)
    both = draw_detections(rgb, detections, class_names=["a", "b", "c"], min_side=0)
    assert both.shape == (40, 50, 3) and both.dtype == np.uint8
    assert both[25, 35].any() and not both[35, 45].any()  # inside the mask / outside everything
    assert both[10, 5].any()  # on the box's left edge
    boxes_only = draw_detections(rgb, detections, masks=False, min_side=0)
    assert not boxes_only[25, 35].any() and boxes_only[10, 5].any()
    masks_only = draw_detections(rgb, detections, boxes=False, min_side=0)
    assert masks_only[25, 35].any() and not masks_only[10, 5].any()
    enlarged = draw_detections(rgb, detections, boxes=False, min_side=120)  # x3
    assert enlarged.shape == (120, 150, 3) and enlarged[3 * 25, 3 * 35].any() and not enlarged[3 * 35, 3 * 45].any()
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(rgb.astype(np.float32), detections)


def test_stages_are_post_processed_once_on_first_use(model):
    from concurrent.futures import ThreadPoolExecutor

    stages = stage_predictor(model)([image(2, 64, 64)])[0]
    assert all("deferred" in repr(s) for s in stages)
    last = stages[-1]
    with ThreadPoolExecutor(4) as pool:  # several threads asking at once get one computation
        found = list(pool.map(lambda _: last.detections, range(8)))
    assert all(f is found[0] for f in found) and "computed" in repr(last)
    assert all("deferred" in repr(s) for s in stages[:-1])
    with pytest.raises(ValueError, match="has_masks"):
        type(last)("layer 1", lambda: found[0])


def test_masks_of_one_class_are_drawn_as_their_union():
    """torchvision's drawing of every instance, except where masks of a class overlap: there
    the class color (torchvision blackens overlaps)."""
    from torchvision.utils import draw_segmentation_masks

    from di_maskdino.stages import _class_color

    generator = torch.Generator().manual_seed(5)
    rgb = torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8, generator=generator).numpy()
    masks = torch.rand(5, 30, 40, generator=generator) > 0.6
    labels = torch.tensor([2, 2, 2, 0, 0])
    masks[3:] &= ~masks[:3].any(0)  # no overlap across classes
    detections = Detections(torch.rand(5), labels, torch.zeros(5, 4), masks)
    image = torch.from_numpy(rgb).permute(2, 0, 1)
    colors = [_class_color(int(c)) for c in labels]
    each = draw_segmentation_masks(image, masks, alpha=0.45, colors=colors).permute(1, 2, 0).numpy()
    unions = torch.stack([masks[:3].any(0), masks[3:].any(0)])
    by_class = draw_segmentation_masks(image, unions, alpha=0.45, colors=[colors[0], colors[3]])
    drawn = draw_detections(rgb, detections, boxes=False, min_side=0)
    assert np.array_equal(drawn, by_class.permute(1, 2, 0).numpy())
    overlap = (masks.sum(0) > 1).numpy()
    assert overlap.any() and np.array_equal(drawn[~overlap], each[~overlap])
    assert not np.array_equal(drawn[overlap], each[overlap])
