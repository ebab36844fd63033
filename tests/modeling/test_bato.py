"""Balance-Aware Tokens Optimization: guiding tokens (Eq. 5-7), T_bal (Eq. 8), the
mask-feature update, and where each guidance source takes its guiding tokens from (Tab. 5)."""

import pytest
import torch
from torch.nn import functional as F

from di_maskdino.modeling import (
    BalanceAwareQueryGuidance,
    BalanceAwareTokensOptimization,
    GuidingTokens,
    MaskBoxGuidingTokens,
    QueryGuidingTokens,
    TokenSetGuidance,
    guidance_source,
)

from .tiny import encoded, perturb, tiny_images, tiny_model, tiny_targets

DIM = 32


def bato_and_memory(**kwargs):
    model = perturb(tiny_model())
    _, out, memory = encoded(model)
    torch.manual_seed(3)
    bato = perturb(BalanceAwareTokensOptimization(DIM, 4, 64, **kwargs), seed=4)
    return model, bato, memory, out.mask_features


def test_one_guiding_token_gives_t_bal_in_closed_form():
    """With G = 1 the softmax over one key is 1, so every encoder token receives the same
    attention output W_o (W_v g + b_v) + b_o, and
    T_bal = LN2(T' + W_2 relu(W_1 T' + b_1) + b_2), T' = LN1(T + W_o (W_v g + b_v) + b_o)."""
    _, bato, memory, mask_features = bato_and_memory(num_guiding_tokens=1)
    guide = GuidingTokens(values=torch.randn(2, 1, DIM), key_pos=torch.randn(2, 1, DIM))
    balanced, _ = bato(memory, mask_features, guide)

    attn = bato.cross_attn.attn
    w_v, b_v = attn.in_proj_weight[2 * DIM :], attn.in_proj_bias[2 * DIM :]
    update = (guide.values @ w_v.T + b_v) @ attn.out_proj.weight.T + attn.out_proj.bias  # (B, 1, C)
    norm1, ffn = bato.cross_attn.norm, bato.ffn
    t_prime = F.layer_norm(memory.tokens + update, (DIM,), norm1.weight, norm1.bias, norm1.eps)
    hidden = F.relu(t_prime @ ffn.linear1.weight.T + ffn.linear1.bias)
    expected = F.layer_norm(
        t_prime + hidden @ ffn.linear2.weight.T + ffn.linear2.bias, (DIM,), ffn.norm.weight, ffn.norm.bias, ffn.norm.eps
    )
    torch.testing.assert_close(balanced, expected, rtol=1e-5, atol=1e-5)


def test_mask_features_are_updated_from_the_finest_level_of_t_bal():
    """Oracle: relu(GN(conv3x3(M + upsample(finest level of T_bal)))) with the module's weights."""
    _, bato, memory, mask_features = bato_and_memory(num_guiding_tokens=3)
    guide = GuidingTokens(values=torch.randn(2, 3, DIM), key_pos=None)
    balanced, updated = bato(memory, mask_features, guide)
    finest = max(range(len(memory.shapes)), key=lambda i: memory.shapes[i][0] * memory.shapes[i][1])
    start = sum(h * w for h, w in memory.shapes[:finest])
    height, width = memory.shapes[finest]
    level = balanced[:, start : start + height * width].transpose(1, 2).reshape(2, DIM, height, width)
    summed = mask_features + F.interpolate(level, size=mask_features.shape[-2:], mode="bilinear", align_corners=False)
    conv = bato.mask_feature_conv
    expected = F.relu(
        F.group_norm(
            F.conv2d(summed, conv.conv.weight, padding=1),
            conv.norm.num_groups,
            conv.norm.weight,
            conv.norm.bias,
            conv.norm.eps,
        )
    )
    torch.testing.assert_close(updated, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("generate", [True, False])
def test_guiding_tokens_are_made_from_the_g_best_candidates(generate):
    """Eq. 5-7: the G candidates with the highest class logit (on the un-normed candidates);
    mask guiding tokens = their mask embeddings (values), box guiding tokens = their
    positional queries (added to the keys); without generation the candidates themselves."""
    model, bato, _, _ = bato_and_memory(
        num_guiding_tokens=3, generator=MaskBoxGuidingTokens() if generate else QueryGuidingTokens()
    )
    heads = model.head.heads
    tokens, pos = torch.randn(2, 10, DIM), torch.randn(2, 10, DIM)
    guide = bato.guiding_tokens(tokens, pos, heads)
    for b in range(2):
        scores = heads.class_embed(tokens[b]).max(-1).values
        best = sorted(range(10), key=lambda i: -scores[i].item())[:3]
        if generate:
            torch.testing.assert_close(guide.values[b], heads.mask_embed(tokens[b, best]))
            torch.testing.assert_close(guide.key_pos[b], pos[b, best])
        else:
            torch.testing.assert_close(guide.values[b], tokens[b, best])
            assert guide.key_pos is None


class Spy:
    """Records the candidates BATO's guiding tokens are chosen from."""

    def __init__(self, bato):
        self.original = bato.guiding_tokens
        self.seen = []
        bato.guiding_tokens = self

    def __call__(self, tokens, pos, heads, valid=None):
        self.seen.append((tokens, pos))
        return self.original(tokens, pos, heads, valid)


def named_token_sets(model, batch_targets=None):
    """T_i, T_s1, T_s2 and Q_bal (with their positional queries) computed step by step."""
    head = model.head
    _, out, memory = encoded(model)
    queries, token_sets, _, _ = head.select_queries(memory, out.mask_features)
    positional = head.decoder.ref_point_head
    named = {name: (s.tokens, positional(s.boxes)) for name, s in token_sets.items()}
    reference = queries.boxes
    decoded = head.decoder(queries.tokens, reference, memory, out.mask_features, head.heads)  # no BATO
    named["Q_bal"] = (decoded.balance_aware_query, positional(decoded.references[1].detach()))
    return named


@pytest.mark.parametrize("source", ["T_i", "T_s1", "T_s2", "Q_bal"])
def test_each_guidance_source_guides_with_its_named_token_set(source):
    model = perturb(tiny_model(bato=dict(guidance_source=source)))
    model.eval()
    expected_tokens, expected_pos = named_token_sets(model)[source]
    spy = Spy(model.head.bato)
    with torch.no_grad():
        model(model.preprocess(tiny_images())[0])
    ((tokens, pos),) = spy.seen
    torch.testing.assert_close(tokens, expected_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pos, expected_pos, rtol=1e-5, atol=1e-5)
    assert model.head.bato.guidance.layer == (1 if source == "Q_bal" else 0)


def test_q_bal_guidance_ignores_the_denoising_queries():
    """In training the denoising queries precede the matching ones; BATO's candidates are the
    matching queries only (their number is the number of decoder queries)."""
    model = perturb(tiny_model())
    spy = Spy(model.head.bato)
    model.train()
    batch, _ = model.preprocess(tiny_images())
    output = model(batch, targets=tiny_targets())
    ((tokens, _),) = spy.seen
    assert output.denoising.queries.num_queries > 0
    assert tokens.shape[1] == model.head.query_selection.num_selected // 2  # k2 = 12 of k1 = 24


def test_guidance_sources_by_name():
    assert isinstance(guidance_source("Q_bal"), BalanceAwareQueryGuidance)
    assert [guidance_source(n).layer for n in ("T_i", "T_s1", "T_s2")] == [0, 0, 0]
    assert isinstance(guidance_source("T_s1"), TokenSetGuidance)
    with pytest.raises(ValueError, match="one of"):
        guidance_source("Q")
    with pytest.raises(ValueError, match="at least 1"):
        BalanceAwareTokensOptimization(DIM, 4, 64, num_guiding_tokens=0)
