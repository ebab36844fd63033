"""The shared prediction heads (Eq. 10-11) against a hand computation."""

import torch
from torch.nn import functional as F

from di_maskdino.modeling import PredictionHeads


def test_class_logits_and_masks_by_hand():
    torch.manual_seed(0)
    heads = PredictionHeads(hidden_dim=8, num_classes=3, mask_dim=5)
    queries, features = torch.randn(2, 4, 8), torch.randn(2, 5, 3, 6)
    logits, masks = heads(queries, features)
    normed = F.layer_norm(queries, (8,), heads.norm.weight, heads.norm.bias, heads.norm.eps)
    torch.testing.assert_close(logits, normed @ heads.class_embed.weight.T + heads.class_embed.bias)
    embedding = heads.mask_embed(normed)
    for b in range(2):
        for n in range(4):
            expected = (embedding[b, n][:, None, None] * features[b]).sum(0)  # dot product per pixel
            torch.testing.assert_close(masks[b, n], expected, rtol=1e-5, atol=1e-5)
    assert heads(queries)[1] is None and heads.num_classes == 3


def test_box_head_starts_at_zero_deltas():
    heads = PredictionHeads(hidden_dim=8, num_classes=3, mask_dim=8)
    assert torch.equal(heads.box_embed(torch.randn(5, 8)), torch.zeros(5, 4))
