"""Panoptic and semantic inference against hand-made cases whose results were worked out by
hand (see the comments)."""

import math

import pytest
import torch

from di_maskdino.modeling import (
    Predictions,
    SegmentationInference,
    instance_inference,
    panoptic_inference,
    resize_mask_logits,
    semantic_inference,
)

IN, OUT = 10.0, -10.0  # mask logits: probability ~1 inside a mask, ~4.5e-5 outside


def logit(p):
    return math.log(p / (1 - p))


def hand_made_case():
    """4 x 6 pixels, classes 0 and 1 are things, 2 is stuff; one class logit per query
    (others very low), so a query's score is sigmoid of that logit.

        q0 thing 0, score .881, mask {(0,0)}
        q1 stuff 2, score .731, mask rows 0-1 x cols 0-4
        q2 thing 1, score .622, mask rows 2-3 x cols 3-5
        q3 stuff 2, score .818, mask rows 2-3 x cols 0-2
        q4 thing 0, score .119, whole image           -> below the 0.25 threshold: dropped
        q5 thing 1, score .5,   mask rows 1-2 x cols 2-3
        q6 thing 0, score .668, mask rows 2-3 x cols 4-5
    """
    queries = [
        (0, 2.0, [(0, 0)]),
        (2, 1.0, [(r, c) for r in range(2) for c in range(5)]),
        (1, 0.5, [(r, c) for r in (2, 3) for c in (3, 4, 5)]),
        (2, 1.5, [(r, c) for r in (2, 3) for c in (0, 1, 2)]),
        (0, -2.0, [(r, c) for r in range(4) for c in range(6)]),
        (1, 0.0, [(r, c) for r in (1, 2) for c in (2, 3)]),
        (0, logit(0.668), [(r, c) for r in (2, 3) for c in (4, 5)]),
    ]
    logits = torch.full((len(queries), 3), -20.0)
    masks = torch.full((len(queries), 4, 6), OUT)
    for n, (category, value, pixels) in enumerate(queries):
        logits[n, category] = value
        for r, c in pixels:
            masks[n, r, c] = IN
    return logits, masks, torch.tensor([True, True, False])


def test_panoptic_merging_hand_made():
    logits, masks, is_thing = hand_made_case()
    result = panoptic_inference(logits, masks, is_thing, object_mask_threshold=0.25, overlap_threshold=0.8)
    # Owners (largest score among the masks covering a pixel): (0,0) q0; the rest of rows
    # 0-1 cols 0-4 q1 (q5 at (1,2), (1,3) scores lower); (0,5), (1,5) are in no mask: q0
    # wins them with the largest score times ~0, but they are outside its mask (void);
    # rows 2-3 cols 0-2 q3; (2,3), (3,3) q2; rows 2-3 cols 4-5 q6 (.668 > .622).
    # q0: won 3 px (1 in its mask + 2 void) of its 1 -> segment 1.
    # q1: won 9 of its 10 (.9 >= .8)               -> segment 2 (stuff 2).
    # q2: won 2 of its 6 (.33 < .8)                -> dropped.
    # q3: won 6 of 6, stuff 2 already has segment 2 -> its pixels join segment 2.
    # q5: won nothing                              -> dropped.
    # q6: won 4 of 4                               -> segment 3.
    expected = torch.tensor(
        [
            [1, 2, 2, 2, 2, 0],
            [2, 2, 2, 2, 2, 0],
            [2, 2, 2, 0, 3, 3],
            [2, 2, 2, 0, 3, 3],
        ],
        dtype=torch.int32,
    )
    assert torch.equal(result.ids, expected)
    assert [(s.id, s.category_id, s.isthing) for s in result.segments] == [(1, 0, True), (2, 2, False), (3, 0, True)]


def test_panoptic_overlap_threshold_and_empty_result():
    logits, masks, is_thing = hand_made_case()
    # with a threshold of 0.3, q2 (won 2 of 6) becomes segment 3 and q6 segment 4
    result = panoptic_inference(logits, masks, is_thing, object_mask_threshold=0.25, overlap_threshold=0.3)
    assert [(s.id, s.category_id) for s in result.segments] == [(1, 0), (2, 2), (3, 1), (4, 0)]
    assert result.ids[2, 3] == 3 and result.ids[3, 3] == 3
    # nothing above the object threshold: all void
    none = panoptic_inference(logits, masks, is_thing, object_mask_threshold=0.95)
    assert none.segments == [] and int(none.ids.abs().sum()) == 0


def test_panoptic_sharpened_scores_weight_the_masks_but_not_the_threshold():
    # two queries with the same full mask. Sigmoid scores: q0 (.731, .711) for classes 0, 1,
    # q1 (.007, .690): q0 (.731) owns the image. Sharpened at T = 0.06: q0's best is
    # 1 / (1 + exp(-.02 / .06)) ~ .58, q1's ~ 1.0: q1 owns it, and the segment is class 1.
    logits = torch.tensor([[1.0, 0.9], [-5.0, 0.8]])
    masks = torch.full((2, 2, 2), IN)
    is_thing = torch.tensor([True, True])
    plain = panoptic_inference(logits, masks, is_thing, 0.25, 0.8, temperature=None)
    sharp = panoptic_inference(logits, masks, is_thing, 0.25, 0.8, temperature=0.06)
    assert [(s.id, s.category_id) for s in plain.segments] == [(1, 0)]
    assert [(s.id, s.category_id) for s in sharp.segments] == [(1, 1)]
    assert bool((plain.ids == 1).all()) and bool((sharp.ids == 1).all())
    # the threshold reads the sigmoid scores: 8 classes at sigmoid .3 (> .25) are kept though
    # their sharpened best is 1/8; a dominant class at sigmoid .2 is dropped though its
    # sharpened score is ~1
    eight = torch.full((1, 8), logit(0.3))
    assert len(panoptic_inference(eight, masks[:1], torch.ones(8, dtype=torch.bool), 0.25, 0.8, 0.06).segments) == 1
    low = torch.full((1, 8), -20.0)
    low[0, 3] = logit(0.2)
    assert panoptic_inference(low, masks[:1], torch.ones(8, dtype=torch.bool), 0.25, 0.8, 0.06).segments == []


def test_semantic_inference_hand_computation():
    # 2 queries, 2 classes, 1 x 2 pixels
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    masks = torch.tensor([[[0.5, -2.0]], [[1.0, 3.0]]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    c = [[sig(0.0), sig(1.0)], [sig(2.0), sig(-1.0)]]
    m = [[sig(0.5), sig(-2.0)], [sig(1.0), sig(3.0)]]
    expected = [[sum(c[n][k] * m[n][p] for n in range(2)) for p in range(2)] for k in range(2)]
    result = semantic_inference(logits, masks)
    assert result.shape == (2, 1, 2)
    torch.testing.assert_close(result[:, 0].double(), torch.tensor(expected, dtype=torch.float64))
    # sharpened: softmax over classes of the sigmoid scores divided by T
    T = 0.5
    sharp = [[math.exp(v / T) / sum(math.exp(u / T) for u in row) for v in row] for row in c]
    expected = [[sum(sharp[n][k] * m[n][p] for n in range(2)) for p in range(2)] for k in range(2)]
    torch.testing.assert_close(
        semantic_inference(logits, masks, temperature=T)[:, 0].double(), torch.tensor(expected, dtype=torch.float64)
    )


def test_resize_mask_logits_of_no_query():
    resized = resize_mask_logits(torch.zeros(0, 8, 8), image_size=(6, 4), padded_size=(8, 8), output_size=(12, 8))
    assert resized.shape == (0, 12, 8)


def test_resize_mask_logits_undoes_padding():
    # an image of 6 x 4 inside an 8 x 8 padded input; mask logits at 1/4 of the padded input
    mask_logits = torch.arange(4.0).view(1, 2, 2)
    resized = resize_mask_logits(mask_logits, image_size=(6, 4), padded_size=(8, 8), output_size=(12, 8))
    up = torch.nn.functional.interpolate(mask_logits[None], size=(8, 8), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.interpolate(up[:, :, :6, :4], size=(12, 8), mode="bilinear", align_corners=False)
    assert resized.shape == (1, 12, 8)
    torch.testing.assert_close(resized, expected[0])


def test_segmentation_inference_combines_the_tasks():
    logits, masks, is_thing = hand_made_case()
    boxes = torch.rand(logits.shape[0], 4) * 0.5 + 0.25
    inference = SegmentationInference(is_thing, instance=True, panoptic=True, semantic=True, temperature=None, topk=5)
    # masks at 1/4 of an unpadded 16 x 24 input, reported at 16 x 24
    results = inference.images(Predictions(logits[None], boxes[None], masks[None]), [(16, 24)], (16, 24), [(16, 24)])
    result = results[0]
    # instances: the top 5 (query, class) pairs, stuff class 2 removed
    everything = instance_inference(logits, boxes, masks, (16, 24), (16, 24), (16, 24), 5)
    things = everything.labels != 2
    assert torch.equal(result.instances.labels, everything.labels[things]) and len(result.instances) < 5
    assert torch.equal(result.instances.masks, everything.masks[things])
    # panoptic and semantic at the output size, equal to the functions on resized logits
    resized = resize_mask_logits(masks, (16, 24), (16, 24), (16, 24))
    expected = panoptic_inference(logits, resized, is_thing, 0.25, 0.8, None)
    assert torch.equal(result.panoptic.ids, expected.ids) and result.panoptic.segments == expected.segments
    torch.testing.assert_close(result.semantic, semantic_inference(logits, resized))
    # a thing-only class set keeps every instance
    all_things = SegmentationInference(torch.ones(3, dtype=torch.bool), topk=5)
    assert len(all_things(logits, boxes, masks, (16, 24), (16, 24), (16, 24)).instances) == 5


def test_segmentation_inference_rejects_bad_settings():
    with pytest.raises(ValueError, match="at least one"):
        SegmentationInference(torch.ones(3, dtype=torch.bool), instance=False)
    with pytest.raises(ValueError, match="temperature"):
        SegmentationInference(torch.ones(3, dtype=torch.bool), temperature=0.0)
    inference = SegmentationInference(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="3 classes"):
        inference(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 2, 2), (8, 8), (8, 8), (8, 8))
    with pytest.raises(ValueError, match="masks"):
        inference.images(Predictions(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)), [(8, 8)], (8, 8), [(8, 8)])
