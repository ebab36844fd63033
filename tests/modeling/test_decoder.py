"""The deformable decoder: iterative box refinement, denoising groups kept apart, and where
BATO changes what the layers attend to."""

import torch

from di_maskdino.modeling import denoising_attention_mask
from di_maskdino.modeling.boxes import inverse_sigmoid

from .tiny import encoded, perturb, tiny_model


def decoder_inputs(model, num_queries=12):
    _, out, memory = encoded(model)
    generator = torch.Generator().manual_seed(7)
    queries = torch.randn(2, num_queries, 32, generator=generator)
    boxes = torch.rand(2, num_queries, 4, generator=generator) * 0.5 + 0.25
    return queries, boxes, memory, out.mask_features


def test_each_layer_refines_the_previous_reference_box():
    """references[l + 1] = sigmoid(box_embed(hidden[l]) + logit(references[l]))."""
    model = perturb(tiny_model())
    queries, boxes, memory, mask_features = decoder_inputs(model)
    heads = model.head.heads
    decoded = model.head.decoder(queries, boxes, memory, mask_features, heads)
    assert len(decoded.hidden) == 3 and len(decoded.references) == 4
    torch.testing.assert_close(decoded.references[0], boxes)
    for layer in range(3):
        expected = (heads.box_embed(decoded.hidden[layer]) + inverse_sigmoid(decoded.references[layer])).sigmoid()
        torch.testing.assert_close(decoded.references[layer + 1], expected)
    assert decoded.balance_aware_query is decoded.hidden[0]


def test_each_layer_is_self_attention_then_cross_attention_then_ffn():
    """Layer 0 by hand from its blocks, with the positional query of the initial boxes."""
    model = perturb(tiny_model())
    queries, boxes, memory, mask_features = decoder_inputs(model)
    decoder = model.head.decoder
    decoded = decoder(queries, boxes, memory, mask_features, model.head.heads)
    layer = decoder.layers[0]
    pos = decoder.ref_point_head(boxes)
    x = layer.self_attn(queries, pos)
    x = layer.cross_attn(
        x, pos, boxes[:, :, None].expand(-1, -1, 4, -1), memory.tokens, memory.spatial_shapes, memory.level_start_index
    )
    torch.testing.assert_close(decoded.hidden[0], layer.ffn(x))


def test_matching_queries_never_see_the_denoising_queries():
    """With the denoising attention mask, prepending denoising queries leaves the matching
    queries' outputs and boxes unchanged (with BATO guided by them as well)."""
    model = perturb(tiny_model())
    queries, boxes, memory, mask_features = decoder_inputs(model)
    head = model.head
    plain = head.decoder(queries, boxes, memory, mask_features, head.heads, bato=head.bato)
    generator = torch.Generator().manual_seed(8)
    dn_queries, dn_boxes = torch.randn(2, 6, 32, generator=generator), torch.rand(2, 6, 4, generator=generator)
    mask = denoising_attention_mask(num_groups=2, group_size=3, num_matching=12, device=queries.device)
    with_dn = head.decoder(
        torch.cat([dn_queries, queries], 1),
        torch.cat([dn_boxes, boxes], 1),
        memory,
        mask_features,
        head.heads,
        attn_mask=mask,
        num_matching=12,
        bato=head.bato,
    )
    for layer in range(3):
        torch.testing.assert_close(with_dn.hidden[layer][:, 6:], plain.hidden[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(with_dn.references[layer + 1][:, 6:], plain.references[layer + 1])
    # and the denoising groups do not see each other: group 1 alone gives the same output
    group_1 = head.decoder(
        torch.cat([dn_queries[:, 3:], queries], 1),
        torch.cat([dn_boxes[:, 3:], boxes], 1),
        memory,
        mask_features,
        head.heads,
        attn_mask=denoising_attention_mask(1, 3, 12, queries.device),
        num_matching=12,
        bato=head.bato,
    )
    torch.testing.assert_close(with_dn.hidden[-1][:, 3:6], group_1.hidden[-1][:, :3], rtol=1e-5, atol=1e-5)


def test_bato_changes_what_the_layers_after_it_attend_to():
    """Guided by Q_bal, BATO runs before layer 1: layer 0 is the same with or without BATO,
    later layers differ and predict masks on updated mask features."""
    model = perturb(tiny_model())
    queries, boxes, memory, mask_features = decoder_inputs(model)
    head = model.head
    plain = head.decoder(queries, boxes, memory, mask_features, head.heads)
    balanced = head.decoder(queries, boxes, memory, mask_features, head.heads, bato=head.bato)
    torch.testing.assert_close(balanced.hidden[0], plain.hidden[0])
    assert not torch.allclose(balanced.hidden[1], plain.hidden[1])
    assert balanced.mask_features[0] is mask_features and plain.mask_features[2] is mask_features
    assert not torch.allclose(balanced.mask_features[1], mask_features)
