"""Balance-Aware Tokens Optimization (BATO, paper Sec. 3.3, Eq. 5-8).

Guiding tokens T_g are made from the best queries of the chosen guidance source (by
default Q_bal, the output of the first decoder layer): the top NUM_GUIDING_TOKENS by class
score give mask guiding tokens (their mask embeddings, the values) and box guiding tokens
(their positional queries, added to the keys). Every encoder token then cross-attends to
T_g (Eq. 7), giving the balance-aware tokens T_bal, and the highest-resolution level of
T_bal, upsampled to 1/4, updates the mask features (Eq. 8). Later decoder layers attend to
T_bal and predict masks on the updated features.

Shape glossary: B batch, N queries, G guiding tokens, S encoder tokens, C hidden dim.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..layers import FFN, ConvNormAct, CrossAttentionBlock, xavier_init_matrices
from .de_imbalance import select_top_k
from .heads import PredictionHeads

__all__ = ["BalanceAwareTokensOptimization", "GuidingTokens"]


@dataclass
class GuidingTokens:
    """values: (B, G, C) mask guiding tokens; pos: (B, G, C) box guiding tokens, or None
    when guiding-token generation is off."""

    values: torch.Tensor
    pos: Optional[torch.Tensor]


class BalanceAwareTokensOptimization(nn.Module):
    """
    Args:
        dim: hidden dim C (the mask dim must equal it: mask embeddings are the values).
        num_heads, ffn_dim, dropout: the cross-attention and feed-forward blocks.
        num_guiding_tokens: G, how many queries guide.
        generate_guiding_tokens: True (paper) builds mask/box guiding tokens from the
            selected queries; False uses the selected queries themselves as keys and values
            (Tab. 6).
        num_groups: GroupNorm groups of the mask-feature convolution.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        num_guiding_tokens: int = 50,
        generate_guiding_tokens: bool = True,
        num_groups: int = 32,
    ):
        super().__init__()
        self.num_guiding_tokens = num_guiding_tokens
        self.generate_guiding_tokens = generate_guiding_tokens
        self.cross_attn = CrossAttentionBlock(dim, num_heads, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.mask_feature_conv = ConvNormAct(dim, dim, 3, num_groups=num_groups)
        xavier_init_matrices(self.cross_attn, self.ffn)

    def guiding_tokens(self, queries: torch.Tensor, query_pos: torch.Tensor, heads: PredictionHeads) -> GuidingTokens:
        """T_g from the G queries with the highest class score (Eq. 5-6).

        queries: (B, N, C) guidance source (matching queries only, never denoising ones);
        query_pos: (B, N, C) their positional queries.

        NOTE: as in the released weights, scores and mask embeddings are computed on the
        queries without the heads' LayerNorm.
        """
        scores = heads.class_embed(queries).max(-1).values
        _, selected, selected_pos = select_top_k(scores, self.num_guiding_tokens, queries, query_pos)
        if not self.generate_guiding_tokens:
            return GuidingTokens(values=selected, pos=None)
        return GuidingTokens(values=heads.mask_embed(selected), pos=selected_pos)

    def forward(
        self,
        tokens: torch.Tensor,
        token_pos: torch.Tensor,
        guide: GuidingTokens,
        mask_features: torch.Tensor,
        finest_level: Tuple[int, int, int],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tokens: (B, S, C) encoder tokens T_i; token_pos: (B, S, C) their sine positions.
            guide: guiding tokens T_g.
            mask_features: (B, C, h, w) 1/4-resolution mask features.
            finest_level: (start, H, W) of the highest-resolution level inside S.

        Returns:
            T_bal (B, S, C) and the updated mask features (B, C, h, w).
        """
        balanced = self.ffn(self.cross_attn(tokens, guide.values, pos=token_pos, memory_pos=guide.pos))
        start, height, width = finest_level
        finest = balanced[:, start : start + height * width].transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
        upsampled = F.interpolate(finest, size=mask_features.shape[-2:], mode="bilinear", align_corners=False)
        return balanced, self.mask_feature_conv(mask_features + upsampled)
