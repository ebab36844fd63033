"""The residual attention and feed-forward blocks against hand computations."""

import torch
from torch import nn
from torch.nn import functional as F

from di_maskdino.layers import FFN, MLP, ConvNormAct, CrossAttentionBlock, SelfAttentionBlock, group_norm


def attention_by_hand(attn: nn.MultiheadAttention, query, key, value, mask=None):
    """Multi-head scaled dot-product attention with attn's projections, written out."""
    dim, heads = attn.embed_dim, attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.split(dim)
    b_q, b_k, b_v = attn.in_proj_bias.split(dim)
    q, k, v = query @ w_q.T + b_q, key @ w_k.T + b_k, value @ w_v.T + b_v

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, dim // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / (dim // heads) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(q.shape)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def test_self_attention_block_adds_pos_to_queries_and_keys_only():
    torch.manual_seed(0)
    block = SelfAttentionBlock(8, 2)
    x, pos = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[0, 3:] = True
    update = attention_by_hand(block.attn, x + pos, x + pos, x, mask)
    torch.testing.assert_close(block(x, pos, attn_mask=mask), block.norm(x + update), rtol=1e-5, atol=1e-5)


def test_cross_attention_block_keys_carry_memory_pos_values_do_not():
    torch.manual_seed(0)
    block = CrossAttentionBlock(8, 2)
    x, pos, memory, memory_pos = torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    update = attention_by_hand(block.attn, x + pos, memory + memory_pos, memory)
    torch.testing.assert_close(block(x, memory, pos, memory_pos), block.norm(x + update), rtol=1e-5, atol=1e-5)


def test_ffn_and_mlp():
    torch.manual_seed(0)
    ffn = FFN(8, 16, act_layer=nn.GELU)
    x = torch.randn(3, 8)
    update = ffn.linear2(F.gelu(ffn.linear1(x)))
    torch.testing.assert_close(ffn(x), F.layer_norm(x + update, (8,), ffn.norm.weight, ffn.norm.bias))
    mlp = MLP(4, 6, 2, 3)
    y = torch.randn(5, 4)
    expected = mlp.layers[2](F.relu(mlp.layers[1](F.relu(mlp.layers[0](y)))))
    torch.testing.assert_close(mlp(y), expected)


def test_conv_norm_act_takes_constructors():
    plain = ConvNormAct(4, 8, 3)
    assert (
        plain.conv.bias is not None
        and isinstance(plain.norm, nn.Identity)
        and isinstance(plain.activation, nn.Identity)
    )
    normed = ConvNormAct(4, 8, 1, norm_layer=group_norm(2), act_layer=nn.ReLU)
    assert normed.conv.bias is None and normed.norm.num_groups == 2 and isinstance(normed.activation, nn.ReLU)
    x = torch.randn(1, 4, 5, 5)
    expected = F.relu(F.group_norm(F.conv2d(x, normed.conv.weight), 2, normed.norm.weight, normed.norm.bias))
    torch.testing.assert_close(normed(x), expected)
