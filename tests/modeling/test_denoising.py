"""Denoising queries and their attention mask against hand-made cases."""

import torch

from di_maskdino.modeling import DenoisingGenerator, denoising_attention_mask
from di_maskdino.modeling.boxes import inverse_sigmoid


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
        assert (
            queries.content[1, group * 2 + 1].abs().sum() == 0 and queries.box_logits[1, group * 2 + 1].abs().sum() == 0
        )


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
