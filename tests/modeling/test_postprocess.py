"""Inference (scores, masks, boxes of the kept (query, class) pairs) against hand-made cases
and against the release's way of resizing every mask to the full image."""

import pytest
import torch
from torch.nn import functional as F

from di_maskdino.modeling import RawDetections, instance_inference
from di_maskdino.modeling.postprocess import detections_from_raw, paste_masks


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


def release_paste(mask_logits, image_size, padded_size, output_size):
    """The release's resize of every mask: to the padded input, crop, to the output size;
    mask = logits > 0, score = mean probability inside the mask."""
    masks = F.interpolate(mask_logits[None].float(), size=padded_size, mode="bilinear", align_corners=False)
    masks = masks[:, :, : image_size[0], : image_size[1]]
    masks = F.interpolate(masks, size=output_size, mode="bilinear", align_corners=False)[0]
    binary = masks > 0
    scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return binary, scores


def blob_logits(count, height, width, seed=0):
    """Object-like mask logits: positive inside a random disc, negative elsewhere, one
    empty mask and one positive everywhere."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    centres = torch.rand(count, 2, generator=generator) * torch.tensor([height, width])
    radii = torch.rand(count, generator=generator) * min(height, width) / 3 + 0.5
    distance = ((ys - centres[:, 0, None, None]) ** 2 + (xs - centres[:, 1, None, None]) ** 2).sqrt()
    logits = radii[:, None, None] - distance + torch.randn(count, height, width, generator=generator) * 0.2
    logits[0] = -1.0
    logits[1] = torch.rand(height, width, generator=generator) + 0.1
    return logits


# (mask size, image size, padded size, output size): integer first scale with and without a
# second resize (up, down, identity), a non-integer first scale
GEOMETRIES = [
    ((16, 24), (64, 96), (64, 96), (64, 96)),
    ((16, 24), (60, 90), (64, 96), (130, 200)),
    ((16, 24), (61, 83), (64, 96), (37, 51)),
    ((13, 17), (50, 66), (52, 68), (50, 66)),
    ((13, 17), (50, 66), (52, 68), (101, 30)),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", ["blobs", "noise"])
def test_paste_masks_matches_the_release_resize(geometry, kind):
    (height, width), image_size, padded_size, output_size = geometry
    if kind == "blobs":
        logits = blob_logits(12, height, width)
    else:
        logits = torch.randn(12, height, width, generator=torch.Generator().manual_seed(3)) * 2
    masks, scores = paste_masks(logits, image_size, padded_size, output_size)
    expected_masks, expected_scores = release_paste(logits, image_size, padded_size, output_size)
    assert masks.dtype == torch.bool and masks.shape == expected_masks.shape
    # equal up to pixels within float rounding of the threshold (none in these cases)
    assert (masks != expected_masks).sum() <= 1e-4 * masks.numel()
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
    if kind == "blobs":  # the empty mask
        assert scores[0] == 0 and not masks[0].any()


def test_score_threshold_and_max_detections_match_filtering_everything():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(20, 4, generator=generator) * 2
    boxes = torch.rand(20, 4, generator=generator) * 0.5 + 0.2
    masks = blob_logits(20, 16, 24, seed=2)
    raw = RawDetections(*[t[None] for t in _top_pairs(logits, boxes, masks, 30)])
    geometry = dict(image_sizes=[(60, 90)], padded_size=(64, 96), output_sizes=[(120, 180)])
    everything = detections_from_raw(raw, **geometry)[0]
    for threshold, limit in [(0.0, 5), (0.2, None), (0.2, 3), (0.9, 10)]:
        found = detections_from_raw(raw, **geometry, score_threshold=threshold, max_detections=limit)[0]
        keep = (everything.scores >= threshold).nonzero()[:, 0]
        if limit is not None:
            keep = keep[everything.scores[keep].argsort(descending=True)[:limit]]
        torch.testing.assert_close(found.scores, everything.scores[keep])
        assert torch.equal(found.labels, everything.labels[keep])
        assert torch.equal(found.masks, everything.masks[keep])
        torch.testing.assert_close(found.boxes, everything.boxes[keep])


def _top_pairs(logits, boxes, masks, k):
    scores, index = logits.sigmoid().flatten().topk(k)
    query = index // logits.shape[1]
    return scores, index % logits.shape[1], boxes[query], masks[query]


def test_boxes_are_clipped_to_the_resized_image():
    logits = torch.tensor([[4.0]])
    boxes = torch.tensor([[0.9, 0.1, 0.5, 0.5]])  # sticks out right and top
    result = instance_inference(logits, boxes, None, image_size=(64, 64), padded_size=(64, 64), output_size=(32, 32))
    torch.testing.assert_close(result.boxes[0], torch.tensor([20.8, 0.0, 32.0, 11.2]))
    assert result.masks is None
