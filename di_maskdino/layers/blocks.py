"""Reusable network blocks (post-norm, as in DETR / MaskDINO).

Every attention layer of the model is assembled from these: a residual self-attention
block, a residual cross-attention block, a residual deformable-attention block and a
residual feed-forward block, each followed by LayerNorm. All tensors are batch-first:
(B, N, C).

Norm and activation layers are passed as constructors (timm's convention): a `norm_layer`
is called with the number of channels, an `act_layer` with no argument; None leaves the
step out.
"""

import functools
from typing import Callable, Optional, Type

import torch
from fvcore.nn.weight_init import c2_xavier_fill
from torch import nn
from torch.nn import functional as F

from .ms_deform_attn import MSDeformAttn

__all__ = [
    "MLP",
    "FFN",
    "SelfAttentionBlock",
    "CrossAttentionBlock",
    "DeformableAttentionBlock",
    "ConvNormAct",
    "NormLayer",
    "group_norm",
    "with_pos",
    "multi_head_attention",
    "c2_xavier_fill",
    "xavier_init_matrices",
]

NormLayer = Callable[[int], nn.Module]


def group_norm(num_groups: int) -> NormLayer:
    """A norm-layer constructor: channels -> nn.GroupNorm(num_groups, channels)."""
    return functools.partial(nn.GroupNorm, num_groups)


def with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


def multi_head_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """What `attn(query, key, value, attn_mask=attn_mask, need_weights=False)[0]` computes
    for batch-first (B, N, C) inputs, with `attn`'s parameters, written with batch-first
    projections and scaled-dot-product attention.

    nn.MultiheadAttention transposes batch-first inputs to sequence-first and projects them
    there; under `torch.export` with a dynamic batch, whether those reshapes are views
    depends on the batch being 1, which would restrict the exported program to batches of
    one size class. attn_mask: (N_q, N_k) bool, True where a query may NOT attend.
    """
    batch, queries, dim = query.shape
    heads = attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)

    def split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias).unflatten(-1, (heads, dim // heads)).transpose(1, 2)

    allowed = None if attn_mask is None else ~attn_mask
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(
        split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v), attn_mask=allowed, dropout_p=dropout
    )
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def xavier_init_matrices(*modules: nn.Module) -> None:
    """Xavier-uniform initialisation of every parameter with two or more dimensions."""
    for module in modules:
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = self.activation(x)
        return x


class FFN(nn.Module):
    """x <- norm(x + dropout(linear2(dropout(act(linear1(x))))))."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.activation = act_layer()
        self.dropout_hidden = nn.Dropout(dropout)
        self.dropout_out = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.linear2(self.dropout_hidden(self.activation(self.linear1(x))))
        return self.norm(x + self.dropout_out(update))


class SelfAttentionBlock(nn.Module):
    """x <- norm(x + dropout(MHA(q = k = x + pos, v = x)))."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, pos: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """attn_mask: optional (N, N) bool, True where a query may NOT attend to a key."""
        query = with_pos(x, pos)
        update = multi_head_attention(self.attn, query, query, x, attn_mask=attn_mask)
        return self.norm(x + self.dropout(update))


class CrossAttentionBlock(nn.Module):
    """x <- norm(x + dropout(MHA(q = x + pos, k = memory + memory_pos, v = memory)))."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        pos: Optional[torch.Tensor] = None,
        memory_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        update = multi_head_attention(self.attn, with_pos(x, pos), with_pos(memory, memory_pos), memory)
        return self.norm(x + self.dropout(update))


class DeformableAttentionBlock(nn.Module):
    """x <- norm(x + dropout(MSDeformAttn(x + pos, reference_points, value))).

    The encoder uses it as self-attention (value = x), the decoder as cross-attention to
    the encoder tokens.
    """

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, dropout: float = 0.0):
        super().__init__()
        self.attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        pos: Optional[torch.Tensor],
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        level_sizes: Optional[torch.Tensor] = None,
        value_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        update = self.attn(
            with_pos(x, pos),
            reference_points,
            value,
            spatial_shapes,
            level_start_index,
            value_padding_mask=value_padding_mask,
            level_sizes=level_sizes,
        )
        return self.norm(x + self.dropout(update))


class ConvNormAct(nn.Module):
    """Conv2d (no bias when normalised) -> norm -> activation; Caffe2-style Xavier init.

    Args:
        norm_layer: channels -> norm module (e.g. `group_norm(32)`), or None.
        act_layer: activation class (e.g. nn.ReLU), or None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        norm_layer: Optional[NormLayer] = None,
        act_layer: Optional[Type[nn.Module]] = None,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm_layer is None)
        self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()
        self.activation = act_layer() if act_layer is not None else nn.Identity()
        c2_xavier_fill(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))
