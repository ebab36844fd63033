"""Components against hand-made cases: selections, denoising, geometry, inference."""
import math

import pytest
import torch

from di_maskdino.modeling import DenoisingGenerator, denoising_attention_mask, instance_inference, select_top_k
from di_maskdino.modeling.geometry import encoder_proposals, inverse_sigmoid, masks_to_box_logits


def test_select_top_k_picks_the_k_best_of_each_image():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5], [5.0, -1.0, 2.0, 4.0, 3.0]])
    tokens = torch.arange(10.0).view(2, 5, 1).expand(2, 5, 3)
    index, selected = select_top_k(scores, 3, tokens)
    assert index.tolist() == [[1, 3, 4], [0, 3, 4]]
    assert selected[:, :, 0].tolist() == [[1.0, 3.0, 4.0], [5.0, 8.0, 9.0]]
    index, _ = select_top_k(scores, 9, tokens)  # more than there are: all of them, best first
    assert index.tolist() == [[1, 3, 4, 2, 0], [0, 3, 4, 2, 1]]


def test_denoising_attention_mask_hand_made():
    """2 groups of 2 denoising queries, then 3 matching queries (1 = blocked)."""
    expected = torch.tensor(
        [
            [0, 0, 1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(denoising_attention_mask(2, 2, 3, torch.device("cpu")), expected)


def test_denoising_queries_sit_in_their_slots():
    generator = DenoisingGenerator(num_classes=5, hidden_dim=4, num_queries=7, noise_scale=0.0)
    targets = [
        dict(labels=torch.tensor([4, 1]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.3, 0.1, 0.4]])),
        dict(labels=torch.tensor([3]), boxes=torch.tensor([[0.7, 0.6, 0.3, 0.2]])),
    ]
    queries = generator(targets)
    assert (queries.num_groups, queries.group_size, queries.num_targets) == (3, 2, [2, 1])
    embed = generator.label_embed.weight.detach()
    for group in range(3):
        for b, target in enumerate(targets):
            for j, label in enumerate(target["labels"]):
                slot = group * 2 + j
                torch.testing.assert_close(queries.content[b, slot], embed[label])
                torch.testing.assert_close(queries.box_logits[b, slot], inverse_sigmoid(target["boxes"][j]))
        # image 1 has one object: its second slot of every group is padding
        assert queries.content[1, group * 2 + 1].abs().sum() == 0 and queries.box_logits[1, group * 2 + 1].abs().sum() == 0


def test_denoising_noise_stays_within_its_bounds():
    torch.manual_seed(0)
    generator = DenoisingGenerator(num_classes=5, hidden_dim=4, num_queries=1000, noise_scale=0.4)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    queries = generator([dict(labels=torch.tensor([2]), boxes=box)])
    noisy = queries.box_logits[0].sigmoid()
    # centre moves by at most 0.4 * size / 2, size by at most 0.4 * size
    assert ((noisy[:, :2] - box[:, :2]).abs() <= 0.4 * box[:, 2:] / 2 + 1e-5).all()
    assert ((noisy[:, 2:] - box[:, 2:]).abs() <= 0.4 * box[:, 2:] + 1e-5).all()
    flipped = (queries.content[0] - generator.label_embed.weight[2]).abs().sum(-1) > 0
    assert 0.1 < flipped.float().mean().item() < 0.3  # label noise rate 0.2 x 4/5 (a flip may draw the same class)
    assert generator([dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4))]) is None


def test_masks_to_box_logits_hand_made():
    masks = torch.full((1, 2, 4, 6), -1.0)
    masks[0, 0, 1:3, 2:5] = 1.0  # rows 1-2, columns 2-4
    boxes = masks_to_box_logits(masks).sigmoid()[0]
    # pixel-index box (x 2..4, y 1..2): centre (3, 1.5), size (2, 1), normalised by (6, 4)
    torch.testing.assert_close(boxes[0], torch.tensor([3 / 6, 1.5 / 4, 2 / 6, 1 / 4]), rtol=0, atol=1e-6)
    # an empty mask: the release's degenerate box (1, 1, 0, 0), logits at +-log(1e5)
    torch.testing.assert_close(masks_to_box_logits(masks)[0, 1], torch.tensor([1, 1, -1, -1]) * math.log(1e5), rtol=0, atol=1e-3)


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


def test_instance_inference_hand_made():
    logits = torch.tensor([[2.0, -3.0], [0.5, 1.0]])  # 2 queries, 2 classes
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]])
    mask_logits = torch.full((2, 2, 2), -5.0)
    mask_logits[0, 0, 0] = 3.0  # query 0: one quarter of the map, probability sigmoid(3)
    mask_logits[1] = 1.0  # query 1: everything, probability sigmoid(1)
    result = instance_inference(logits, boxes, mask_logits, image_size=(8, 8), padded_size=(8, 8), output_size=(8, 8), topk=3)
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
    result = instance_inference(logits, boxes, mask_logits, image_size=(48, 32), padded_size=(64, 64), output_size=(96, 64), topk=1)
    torch.testing.assert_close(result.boxes[0], torch.tensor([0.0, 0.0, 64.0, 96.0]))
    assert result.masks.shape == (1, 96, 64)
