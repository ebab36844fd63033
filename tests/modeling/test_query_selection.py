"""The first selection (Eq. 1) and mask-enhanced box initialisation."""

import math

import pytest
import torch

from di_maskdino.modeling import QuerySelection, select_top_k
from di_maskdino.modeling.query_selection import encoder_proposals, masks_to_box_logits

from .tiny import encoded, perturb, tiny_model


def test_select_top_k_picks_the_k_best_of_each_image():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5], [5.0, -1.0, 2.0, 4.0, 3.0]])
    tokens = torch.arange(10.0).view(2, 5, 1).expand(2, 5, 3)
    index, selected = select_top_k(scores, 3, tokens)
    assert index.tolist() == [[1, 3, 4], [0, 3, 4]]
    assert selected[:, :, 0].tolist() == [[1.0, 3.0, 4.0], [5.0, 8.0, 9.0]]
    index, _ = select_top_k(scores, 9, tokens)  # more than there are: all of them, best first
    assert index.tolist() == [[1, 3, 4, 2, 0], [0, 3, 4, 2, 1]]


def test_masks_to_box_logits_hand_made():
    masks = torch.full((1, 2, 4, 6), -1.0)
    masks[0, 0, 1:3, 2:5] = 1.0  # rows 1-2, columns 2-4
    boxes = masks_to_box_logits(masks).sigmoid()[0]
    # pixel-index box (x 2..4, y 1..2): centre (3, 1.5), size (2, 1), normalised by (6, 4)
    torch.testing.assert_close(boxes[0], torch.tensor([3 / 6, 1.5 / 4, 2 / 6, 1 / 4]), rtol=0, atol=1e-6)
    # an empty mask: the release's degenerate box (1, 1, 0, 0), logits at +-log(1e5)
    torch.testing.assert_close(
        masks_to_box_logits(masks)[0, 1], torch.tensor([1, 1, -1, -1]) * math.log(1e5), rtol=0, atol=1e-3
    )


def test_mask_boxes_covering_whole_pixels_as_bitmasks():
    """edges="pixels" (the release's "bitmask"): the box spans the outer edges of the mask's
    pixels, one pixel wider and taller than "indices"; oracle: the extent of every mask read
    pixel by pixel in Python."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.randn(2, 5, 7, 9, generator=generator) - 1.2  # sparse random masks
    masks[1, 4] = -1.0  # one empty mask
    boxes = masks_to_box_logits(masks, "pixels").sigmoid()
    for b in range(2):
        for q in range(5):
            pixels = [(y, x) for y in range(7) for x in range(9) if masks[b, q, y, x] > 0]
            if not pixels:  # detectron2's BitMasks box of an empty mask: (0, 0, 0, 0)
                torch.testing.assert_close(boxes[b, q], torch.zeros(4), rtol=0, atol=1e-4)
                continue
            x0, x1 = min(x for _, x in pixels), max(x for _, x in pixels) + 1
            y0, y1 = min(y for y, _ in pixels), max(y for y, _ in pixels) + 1
            expected = torch.tensor([(x0 + x1) / 2 / 9, (y0 + y1) / 2 / 7, (x1 - x0) / 9, (y1 - y0) / 7])
            torch.testing.assert_close(boxes[b, q], expected, rtol=0, atol=2e-5)  # logits clamp at 1e-5
    indices = masks_to_box_logits(masks, "indices").sigmoid()
    nonempty = (masks > 0).flatten(2).any(-1)
    widths = (boxes[..., 2:] - indices[..., 2:])[nonempty]
    torch.testing.assert_close(widths, torch.tensor([1 / 9, 1 / 7]).expand_as(widths), rtol=0, atol=3e-5)


def test_an_unknown_mask_box_extent_is_refused():
    with pytest.raises(ValueError, match="edges must be one of"):
        masks_to_box_logits(torch.zeros(1, 1, 2, 2), "bitmask")
    with pytest.raises(ValueError, match="mask_box_edges must be one of"):
        QuerySelection(32, 10, True, "bitmask")


def test_encoder_proposals():
    tokens = torch.ones(1, 4 * 4 + 2 * 2, 2)
    kept, logits = encoder_proposals(tokens, [[4, 4], [2, 2]])
    boxes = logits.sigmoid()[0]
    # level 0: centres (j + 0.5) / 4, side 0.05; level 1: side 0.1
    torch.testing.assert_close(boxes[5], torch.tensor([1.5 / 4, 1.5 / 4, 0.05, 0.05]))
    torch.testing.assert_close(boxes[16], torch.tensor([0.25, 0.25, 0.1, 0.1]))
    assert torch.isfinite(logits).all() and torch.equal(kept, tokens)
    # a centre at 0.005 lies outside (0.01, 0.99): invalid, zeroed, +inf
    kept, logits = encoder_proposals(torch.ones(1, 100, 2), [[1, 100]])
    assert torch.isinf(logits[0, 0]).all() and kept[0, 0].abs().sum() == 0 and torch.isfinite(logits[0, 50]).all()


def first_selection(k=20, mask_enhanced_boxes=True):
    model = perturb(tiny_model())
    _, out, memory = encoded(model)
    heads = model.head.heads
    selection = QuerySelection(32, k, mask_enhanced_boxes)
    return selection, memory, out.mask_features, heads, selection(memory, out.mask_features, heads)


def test_first_selection_keeps_the_k1_best_tokens_of_t_i():
    """Oracle: project and norm every token by hand, score it by its best class logit, and
    rank the scores with Python's sorted()."""
    selection, memory, _, heads, result = first_selection(k=20)
    tokens, _ = encoder_proposals(memory.tokens, memory.shapes)
    projected = selection.memory_norm(selection.memory_proj(tokens))
    for b in range(projected.shape[0]):
        scores = heads.class_embed(projected[b]).max(-1).values.tolist()
        best = sorted(range(len(scores)), key=lambda i: -scores[i])[:20]
        torch.testing.assert_close(result.selected.tokens[b], projected[b, best].detach(), rtol=0, atol=0)
    assert not result.selected.tokens.requires_grad and not result.selected.box_logits.requires_grad
    assert result.scored.tokens.shape == memory.tokens.shape
    assert tuple(result.predictions.masks.shape) == (2, 20, 16, 24)


def test_mask_enhanced_initial_boxes_are_the_boxes_of_the_selected_masks():
    """Oracle: the tight box of each mask from numpy's nonzero."""
    _, _, _, _, result = first_selection(k=20)
    masks = (result.predictions.masks > 0).numpy()
    boxes = result.selected.boxes.numpy()
    height, width = masks.shape[-2:]
    checked = 0
    for b in range(masks.shape[0]):
        for q in range(masks.shape[1]):
            ys, xs = masks[b, q].nonzero()
            if len(xs) == 0:
                continue
            expected = [
                (xs.min() + xs.max()) / 2 / width,
                (ys.min() + ys.max()) / 2 / height,
                (xs.max() - xs.min()) / width,
                (ys.max() - ys.min()) / height,
            ]
            assert boxes[b, q] == pytest.approx(expected, abs=1e-4)
            checked += 1
    assert checked > 0


def test_without_mask_enhancement_the_initial_boxes_are_the_predicted_ones():
    _, _, _, _, result = first_selection(k=20, mask_enhanced_boxes=False)
    torch.testing.assert_close(result.selected.boxes, result.predictions.boxes, rtol=0, atol=0)


def test_box_of_a_selected_token_is_its_proposal_refined_by_the_box_head():
    selection, memory, _, heads, result = first_selection(k=5)
    _, proposals = encoder_proposals(memory.tokens, memory.shapes)
    index = select_top_k(heads.class_embed(result.scored.tokens).max(-1).values, 5)[0]
    delta = heads.box_embed(result.scored.tokens)
    for b in range(2):
        expected = (delta[b, index[b]] + proposals[0, index[b]]).sigmoid()
        torch.testing.assert_close(result.predictions.boxes[b], expected)


def test_the_first_selection_needs_a_size():
    with pytest.raises(ValueError, match="at least one token"):
        QuerySelection(32, 0)


def test_training_keeps_masks_factored_and_boxes_unchanged(monkeypatch):
    """In training the two-stage masks stay factored and the mask-enhanced boxes come from
    chunks of queries; the boxes and mask logits equal those of evaluation."""
    model = perturb(tiny_model())
    _, encoder_output, memory = encoded(model)
    selection, heads = model.head.query_selection, model.head.heads
    evaluated = selection.eval()(memory, encoder_output.mask_features, heads)
    monkeypatch.setattr("di_maskdino.modeling.query_selection.MASK_CHUNK", 5)  # 24 queries: 5 chunks
    trained = selection.train()(memory, encoder_output.mask_features, heads)
    assert evaluated.predictions.mask_embed is None and trained.predictions.mask_embed is not None
    torch.testing.assert_close(trained.selected.box_logits, evaluated.selected.box_logits, rtol=0, atol=0)
    torch.testing.assert_close(trained.predictions.masks, evaluated.predictions.masks, rtol=1e-6, atol=1e-6)
