"""The box-conditioned mask head: pasting against hand-made cases and detectron2, the head's
box-frame geometry against the detector's own masks, shapes and gradients, the scores."""

import pytest
import torch

from di_maskdino.modeling import (
    BoxMaskHead,
    MaskQualityHead,
    box_mask_detections,
    instance_inference,
    paste_box_masks,
    top_pairs,
)


def cxcywh(xyxy, height, width):
    x0, y0, x1, y1 = xyxy
    return torch.tensor([[(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]])


def test_paste_hand_made():
    """A 4 x 4 mask whose left half is 1, in box (2, 2, 6, 6) of an 8 x 8 image: one mask cell
    per pixel, so pixels x = 2, 3 and y = 2..5 are exactly 1 and all others exactly 0."""
    mask = torch.zeros(1, 4, 4)
    mask[0, :, :2] = 1.0
    pasted = paste_box_masks(mask, torch.tensor([[2.0, 2.0, 6.0, 6.0]]), (8, 8))[0]
    expected = torch.zeros(8, 8)
    expected[2:6, 2:4] = 1.0
    torch.testing.assert_close(pasted, expected)


def test_paste_half_pixel_box():
    """A full mask in box (1, 0, 3.5, 1): pixel 1 and 2 are fully inside, pixel 3's centre
    (3.5) sits on the box edge, where the mask fades to 0.5; pixel 0 and 4 are outside."""
    pasted = paste_box_masks(torch.ones(1, 8, 8), torch.tensor([[1.0, 0.0, 3.5, 1.0]]), (1, 5))[0, 0]
    torch.testing.assert_close(pasted, torch.tensor([0.0, 1.0, 1.0, 0.5, 0.0]))


def test_paste_agrees_with_detectron2():
    d2_mask_ops = pytest.importorskip(
        "detectron2.layers.mask_ops", reason="detectron2 is not installed (install it from source, see README)"
    )
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 28, 28, generator=generator)
    boxes = torch.tensor(
        [[3.3, 4.1, 40.7, 30.2], [0, 0, 64, 48], [-5, 10, 20, 60], [50.5, 40.2, 51.0, 41.1], [10, 10, 10.5, 30]]
    )
    ours = paste_box_masks(masks, boxes, (48, 64))
    theirs, _ = d2_mask_ops._do_paste_mask(masks[:, None], boxes, 48, 64, skip_empty=False)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def tiny_head(**kwargs):
    torch.manual_seed(0)
    return BoxMaskHead(mask_dim=8, query_dim=12, dim=8, roi_size=14, mask_size=28, **kwargs)


def test_untrained_head_reproduces_the_detector_mask_inside_the_box():
    """With the mask prior the output layer starts at zero: the pasted box-frame mask is the
    detector's own mask (upsampled from stride 4 by `instance_inference`) inside the box and
    empty outside it - the box frame maps back onto the image where it came from."""
    head = tiny_head()
    height, width = 64, 96
    prior = torch.full((1, 16, 24), -10.0)
    prior[0, 4:10, 6:16] = 10.0  # image pixels y 16..40, x 24..64
    box_xyxy = (20.0, 12.0, 56.0, 44.0)  # cuts the object at x = 56
    box = cxcywh(box_xyxy, height, width)
    features = head.encode_image(torch.randn(1, 8, 16, 24))
    masks = head(features, torch.zeros(1, dtype=torch.int64), box, torch.randn(1, 12), prior)
    assert masks.logits.shape == (1, 28, 28) and masks.quality is None
    size = (height, width)
    refined = box_mask_detections(
        torch.ones(1), torch.zeros(1, dtype=torch.int64), box, masks.logits, masks.boxes, None, size, size, size
    )
    detector = instance_inference(torch.full((1, 1), 5.0), box, prior, size, size, size, topk=1)
    torch.testing.assert_close(refined.boxes, torch.tensor([box_xyxy]))
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[12:44, 20:56] = True
    assert not (refined.masks[0] & ~inside).any()
    differ = (refined.masks[0] ^ detector.masks[0]) & inside
    assert int(differ.sum()) <= 2, int(differ.sum())  # the object's two corners at stride-4 smoothing
    assert refined.masks[0, 16:40, 25:55].all()


def test_head_shapes_gradients_and_fine_map():
    head = tiny_head(fine_channels=5, quality=MaskQualityHead(8))
    features = head.encode_image(torch.randn(2, 8, 16, 24), torch.randn(2, 5, 32, 48))
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1], [0.4, 0.6, 0.3, 0.3]])
    masks = head(features, torch.tensor([0, 0, 1]), boxes, torch.randn(3, 12), torch.randn(3, 16, 24))
    assert masks.logits.shape == (3, 28, 28) and masks.quality.shape == (3,)
    (masks.logits.sum() + masks.quality.sum()).backward()
    assert all(p.grad is not None for p in head.parameters())
    assert head.fine_projection.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="finer backbone map"):
        head.encode_image(torch.randn(2, 8, 16, 24))


def test_head_arguments_are_checked():
    with pytest.raises(ValueError, match="power of 2"):
        BoxMaskHead(mask_dim=8, query_dim=8, dim=8, roi_size=14, mask_size=42)
    head = tiny_head()
    features = head.encode_image(torch.randn(1, 8, 16, 24))
    with pytest.raises(ValueError, match="mask logits"):
        head(features, torch.zeros(1, dtype=torch.int64), torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.randn(1, 12))


def test_scores_use_mask_probability_and_quality():
    """A box-frame mask (one cell per pixel) of logit -20 but for a block of logit 2: the mask
    is the block and the score is class score x sigmoid(2) x sigmoid(quality)."""
    logits = torch.full((1, 8, 8), -20.0)
    logits[0, 2:6, 2:6] = 2.0
    box = cxcywh((0.0, 0.0, 8.0, 8.0), 8, 8)
    quality = torch.tensor([0.5])
    found = box_mask_detections(
        torch.tensor([0.8]), torch.tensor([2]), box, logits, box, quality, (8, 8), (8, 8), (8, 8)
    )
    expected = 0.8 * torch.sigmoid(torch.tensor(2.0)) * torch.sigmoid(quality)
    assert found.masks[0, 2:6, 2:6].all() and found.masks[0].sum() == 16
    torch.testing.assert_close(found.scores, expected)


def test_top_pairs_is_the_selection_of_instance_inference():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 3, generator=generator)
    boxes = torch.rand(10, 4, generator=generator) * 0.5 + 0.25
    scores, query, labels = top_pairs(logits, 7)
    found = instance_inference(logits, boxes, None, (32, 32), (32, 32), (32, 32), topk=7)
    torch.testing.assert_close(scores, found.scores)
    assert labels.tolist() == found.labels.tolist()
    cx, cy, w, h = boxes[query].unbind(1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * 32
    torch.testing.assert_close(found.boxes, corners.clamp(0, 32))  # clipped to the image
