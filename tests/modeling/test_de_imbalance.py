"""The De-Imbalance module: token interaction (Eq. 2) and the second selection (Eq. 3)."""

import pytest
import torch

from di_maskdino.modeling import DeImbalance, TokenSet
from di_maskdino.modeling.boxes import inverse_sigmoid

from .tiny import encoded, perturb, tiny_model


def t_s1(model):
    _, out, memory = encoded(model)
    return model.head.query_selection(memory, out.mask_features, model.head.heads).selected


def test_second_selection_keeps_the_top_k2_of_the_interacted_tokens():
    """Oracle: the class scores of the token-interaction output, computed by hand (stage
    norm, class head, best class), ranked with sorted(). Swapping T_s1 and T_s2, or scoring
    before the interaction, fails this test."""
    model = perturb(tiny_model())
    selected = t_s1(model)  # 24 tokens
    heads, de_imbalance = model.head.heads, model.head.de_imbalance
    t_s2, _ = de_imbalance(selected, heads)
    stage = de_imbalance.stages[0]
    interacted = stage(selected.tokens, selected.boxes, heads)
    scores = heads.class_embed(stage.norm(interacted.tokens)).max(-1).values
    for b in range(2):
        ranked = sorted(range(24), key=lambda i: -scores[b, i].item())[:12]
        torch.testing.assert_close(t_s2.tokens[b], interacted.tokens[b, ranked], rtol=0, atol=0)
        torch.testing.assert_close(t_s2.box_logits[b], inverse_sigmoid(interacted.boxes[b, ranked]), rtol=0, atol=0)
        # the same positions chosen by the scores of T_s1 would give other tokens
        before = heads.class_embed(stage.norm(selected.tokens[b])).max(-1).values
        assert sorted(range(24), key=lambda i: -before[i].item())[:12] != ranked


def test_token_interaction_layer_refines_boxes_from_its_output():
    """Eq. 2 with iterative refinement: after each layer the box becomes
    sigmoid(box_embed(tokens) + logit(box)); the supervised box refines once more, from the
    normed tokens; the next layer starts from the refined box."""
    model = perturb(tiny_model())
    selected = t_s1(model)
    heads, stage = model.head.heads, model.head.de_imbalance.stages[0]
    result = stage(selected.tokens, selected.boxes, heads)
    tokens, boxes = selected.tokens, selected.boxes
    for layer, prediction in zip(stage.layers, result.predictions):
        tokens = layer(tokens, stage.ref_point_head(boxes))
        refined = (stage.box_embed(tokens) + inverse_sigmoid(boxes)).sigmoid()
        normed = stage.norm(tokens)
        torch.testing.assert_close(prediction.logits, heads.class_embed(heads.norm(normed)))
        torch.testing.assert_close(prediction.boxes, (stage.box_embed(normed) + inverse_sigmoid(refined)).sigmoid())
        assert prediction.masks is None
        boxes = refined
    torch.testing.assert_close(result.tokens, tokens)
    torch.testing.assert_close(result.boxes, boxes)


def test_token_interaction_is_self_attention_among_the_tokens():
    """Permuting the tokens permutes the interaction's output the same way (no token-order
    dependence), and a token's output depends on the others (it is not a per-token MLP)."""
    model = perturb(tiny_model())
    selected = t_s1(model)
    stage, heads = model.head.de_imbalance.stages[0], model.head.heads
    permutation = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    plain = stage(selected.tokens, selected.boxes, heads).tokens
    permuted = stage(selected.tokens[:, permutation], selected.boxes[:, permutation], heads).tokens
    torch.testing.assert_close(permuted, plain[:, permutation], rtol=1e-5, atol=1e-5)
    changed = selected.tokens.clone()
    changed[:, 1:] += 1.0
    assert not torch.allclose(stage(changed, selected.boxes, heads).tokens[:, 0], plain[:, 0])


@pytest.mark.parametrize("sizes,kept", [((12,), [12]), ((10, 6), [10, 6])])
def test_stages_and_sizes(sizes, kept):
    module = DeImbalance(32, 4, 64, 0.0, num_layers=1, selection_sizes=sizes)
    model = tiny_model()
    selected = t_s1(model)
    t_s2, outputs = module(selected, model.head.heads)
    assert len(module.stages) == len(sizes) and len(outputs) == len(sizes)
    assert t_s2.tokens.shape == (2, kept[-1], 32) and t_s2.box_logits.shape == (2, kept[-1], 4)
    # each stage's outputs cover the tokens that entered it
    assert [stage[0].logits.shape[1] for stage in outputs] == [24] + kept[:-1]


def test_runs_in_float32_under_autocast():
    model = tiny_model()
    selected = t_s1(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_s2, outputs = model.head.de_imbalance(
            TokenSet(selected.tokens.bfloat16(), selected.box_logits), model.head.heads
        )
    assert t_s2.tokens.dtype == torch.float32 and outputs[0][0].logits.dtype == torch.float32


def test_needs_a_selection_size():
    with pytest.raises(ValueError, match="at least one selection size"):
        DeImbalance(32, 4, 64, 0.0, num_layers=1, selection_sizes=())
