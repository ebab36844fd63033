"""The deformable decoder with iterative box refinement (paper Sec. 3.2.4, Eq. 9); its first
layer makes the balance-aware query Q_bal of the De-Imbalance module (Sec. 3.2.2, Eq. 4).

Each layer: self-attention among the queries (denoising groups masked apart), deformable
cross-attention to the encoder tokens around each query's reference box, feed-forward.
After each layer the reference box is refined by the shared box head (the next layer sees
it detached).

With DI-MaskDINO's parts: the first layer turns T_s2 into the balance-aware query Q_bal by
cross-attending to T_i (Eq. 4); BATO, when present, runs before the layer its guidance
source names (layer 1 for Q_bal) and from then on the layers attend to T_bal instead of T_i
and predict masks on the updated mask features.

Shape glossary: B batch, N queries (denoising + matching), S encoder tokens, C hidden dim,
L levels.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ..layers import (
    FFN,
    BoxPositionalQuery,
    DeformableAttentionBlock,
    MSDeformAttn,
    SelfAttentionBlock,
    at_least_float32,
    checkpointed,
    xavier_init_matrices,
)
from .bato import BalanceAwareTokensOptimization
from .boxes import refine_boxes
from .feature_tokens import FeatureTokens
from .prediction_heads import PredictionHeads
from .query_selection import TokenSet

__all__ = ["DecoderLayer", "DeformableDecoder", "DecoderOutput"]


@dataclass
class DecoderOutput:
    """hidden: per layer (B, N, C) outputs (hidden[0] is Q_bal with DI-MaskDINO's parts);
    references: L + 1 reference boxes (B, N, 4), references[l] being the one layer l
    started from; mask_features: per layer the mask features its masks are predicted on."""

    hidden: List[torch.Tensor]
    references: List[torch.Tensor]
    mask_features: List[torch.Tensor]

    @property
    def balance_aware_query(self) -> torch.Tensor:
        """Q_bal (Eq. 4): the output of the first decoder layer."""
        return self.hidden[0]


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, num_levels: int, num_points: int):
        super().__init__()
        self.self_attn = SelfAttentionBlock(dim, num_heads, dropout)
        self.cross_attn = DeformableAttentionBlock(dim, num_levels, num_heads, num_points, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, queries, query_pos, reference_boxes, memory: FeatureTokens, attn_mask=None):
        """queries, query_pos: (B, N, C); reference_boxes: (B, N, 4); memory: the tokens to
        attend to (T_i or T_bal); attn_mask: (N, N) bool, True where a query may not look."""
        queries = self.self_attn(queries, query_pos, attn_mask=attn_mask)
        reference = memory.box_references(reference_boxes)  # (B, N, L, 4)
        queries = self.cross_attn(
            queries,
            query_pos,
            reference,
            memory.tokens,
            memory.spatial_shapes,
            memory.level_start_index,
            value_padding_mask=memory.padding_mask,
        )
        return self.ffn(queries)


class DeformableDecoder(nn.Module):
    """
    Args:
        dim, num_heads, ffn_dim, dropout: layer sizes.
        num_levels, num_points: deformable cross-attention.
        num_layers: decoder layers (DEC_LAYERS).
        grad_checkpointing: run every decoder layer, and BATO, under activation checkpointing
            in training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        num_levels: int,
        num_points: int,
        num_layers: int,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        if num_layers < 1:
            raise ValueError(f"DeformableDecoder: needs at least one layer, got {num_layers}")
        self.layers = nn.ModuleList(
            DecoderLayer(dim, num_heads, ffn_dim, dropout, num_levels, num_points) for _ in range(num_layers)
        )
        self.ref_point_head = BoxPositionalQuery(dim)
        xavier_init_matrices(self.layers, self.ref_point_head)
        for module in self.layers.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()

    def forward(
        self,
        queries: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: FeatureTokens,
        mask_features: torch.Tensor,
        heads: PredictionHeads,
        *,
        attn_mask: Optional[torch.Tensor] = None,
        num_matching: Optional[int] = None,
        bato: Optional[BalanceAwareTokensOptimization] = None,
        token_sets: Optional[Dict[str, TokenSet]] = None,
    ) -> DecoderOutput:
        """
        Args:
            queries: (B, N, C) content queries (denoising first, then the N_m matching ones).
            reference_boxes: (B, N, 4) normalised initial reference boxes.
            memory: encoder tokens T_i.
            mask_features: (B, C, h, w).
            heads: the shared prediction heads (box refinement, BATO's guiding tokens).
            attn_mask: (N, N) self-attention mask (denoising), or None.
            num_matching: N_m (default N); BATO's guidance comes from the last N_m queries.
            bato: the BATO module, or None.
            token_sets: T_i, T_s1, T_s2 by name, for BATO guided by one of them.
        """
        num_matching = queries.shape[1] if num_matching is None else num_matching
        hidden, references, layer_mask_features = [], [reference_boxes], []
        attended = memory
        reference = reference_boxes
        # NOTE: like the release, the decoder layers run in float32 even under autocast.
        with torch.autocast(device_type=queries.device.type, enabled=False):
            queries, reference = at_least_float32(queries), at_least_float32(reference)
            for index, layer in enumerate(self.layers):
                query_pos = self.ref_point_head(reference)
                if bato is not None and index == bato.guidance.layer:
                    matching = slice(queries.shape[1] - num_matching, None)
                    tokens, pos, valid = bato.guidance.candidates(
                        token_sets or {}, queries[:, matching], query_pos[:, matching], self.ref_point_head
                    )
                    guide = bato.guiding_tokens(tokens, pos, heads, valid)
                    balanced, mask_features = checkpointed(self.grad_checkpointing, bato, memory, mask_features, guide)
                    attended = memory.with_tokens(balanced)  # T_bal
                # Eq. 4 (index 0): Q_bal = MHCA(T_s2, T_i), self-attention among the queries,
                # deformable cross-attention to T_i, feed-forward; Eq. 9 (later layers): the
                # same on T_bal once BATO has run.
                queries = checkpointed(
                    self.grad_checkpointing, layer, queries, query_pos, reference, attended, attn_mask
                )
                refined = refine_boxes(reference, heads.box_embed(queries))
                hidden.append(queries)
                references.append(refined)
                layer_mask_features.append(mask_features)
                reference = refined.detach()
        return DecoderOutput(hidden, references, layer_mask_features)
