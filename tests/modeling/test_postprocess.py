"""Inference (scores, masks, boxes of the kept (query, class) pairs) against hand-made cases."""

import pytest
import torch

from di_maskdino.modeling import instance_inference


def test_instance_inference_hand_made():
    logits = torch.tensor([[2.0, -3.0], [0.5, 1.0]])  # 2 queries, 2 classes
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]])
    mask_logits = torch.full((2, 2, 2), -5.0)
    mask_logits[0, 0, 0] = 3.0  # query 0: one quarter of the map, probability sigmoid(3)
    mask_logits[1] = 1.0  # query 1: everything, probability sigmoid(1)
    result = instance_inference(
        logits, boxes, mask_logits, image_size=(8, 8), padded_size=(8, 8), output_size=(8, 8), topk=3
    )
    sig = torch.sigmoid
    expected_class = torch.tensor([sig(torch.tensor(2.0)), sig(torch.tensor(1.0)), sig(torch.tensor(0.5))])
    assert result.labels.tolist() == [0, 1, 0]
    assert result.masks[0].sum() > 0 and result.masks[1].all()
    # mask score: mean probability inside each mask (query 1's mask is uniform sigmoid(1))
    assert result.scores[1].item() == pytest.approx((expected_class[1] * sig(torch.tensor(1.0))).item(), rel=1e-5)
    assert result.scores[2].item() == pytest.approx((expected_class[2] * sig(torch.tensor(1.0))).item(), rel=1e-5)
    torch.testing.assert_close(result.boxes[0], torch.tensor([2.0, 2.0, 6.0, 6.0]))
    torch.testing.assert_close(result.boxes[1], torch.tensor([0.0, 0.0, 4.0, 4.0]))


def test_instance_inference_undoes_padding_and_resizing():
    """A box over the whole unpadded image (normalised by the padded size) maps to the whole
    original image."""
    logits = torch.tensor([[4.0]])
    boxes = torch.tensor([[0.25, 0.375, 0.5, 0.75]])  # image 48 x 32 inside a 64 x 64 input
    mask_logits = torch.ones(1, 16, 16)
    result = instance_inference(
        logits, boxes, mask_logits, image_size=(48, 32), padded_size=(64, 64), output_size=(96, 64), topk=1
    )
    torch.testing.assert_close(result.boxes[0], torch.tensor([0.0, 0.0, 64.0, 96.0]))
    assert result.masks.shape == (1, 96, 64)


def test_boxes_are_clipped_to_the_image():
    """A 4000 x 50 image (x, y): boxes reaching past the border end at it, as detectron2 reports them."""
    logits = torch.tensor([[4.0], [3.0]])
    # normalised by a 64 x 4000 padded input holding the 50 x 4000 image; the first box reaches
    # from y = -32 to y = 64 px of the padded frame, x from -200 to 600; the second lies inside
    boxes = torch.tensor([[0.05, 0.25, 0.2, 1.5], [0.5, 0.25, 0.1, 0.25]])
    result = instance_inference(
        logits, boxes, None, image_size=(50, 4000), padded_size=(64, 4000), output_size=(50, 4000), topk=2
    )
    x0, y0, x1, y1 = result.boxes[0].tolist()
    assert (x0, y0) == (0.0, 0.0) and x1 == pytest.approx(600.0) and y1 == 50.0
    assert (result.boxes[:, 0::2] <= 4000).all() and (result.boxes[:, 1::2] <= 50).all()
    torch.testing.assert_close(result.boxes[1], torch.tensor([1800.0, 8.0, 2200.0, 24.0]))
