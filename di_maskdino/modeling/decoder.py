"""The deformable decoder with iterative box refinement (paper Sec. 3.4, Eq. 9-11).

Each layer: self-attention among the queries (denoising groups masked apart), deformable
cross-attention to the encoder tokens around each query's reference box, feed-forward.
After each layer the reference box is refined by the shared box head (the next layer sees
it detached). BATO, when on, runs before layer `bato_layer`: from then on the layers attend
to T_bal instead of T_i and their masks are predicted on the updated mask features.

Shape glossary: B batch, N queries (denoising + matching), S encoder tokens, C hidden dim,
L levels.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from ..layers import FFN, MLP, DeformableAttentionBlock, MSDeformAttn, SelfAttentionBlock, box_position_embedding, xavier_init_matrices
from .bato import BalanceAwareTokensOptimization, GuidingTokens
from .geometry import refine_boxes
from .heads import PredictionHeads

__all__ = ["DecoderLayer", "DeformableDecoder", "DecoderOutput", "EncoderTokens"]


@dataclass
class EncoderTokens:
    """The flattened encoder tokens as the decoder reads them.

    tokens: (B, S, C); pos: (B, S, C) sine positions; spatial_shapes: (L, 2);
    level_start_index: (L,); shapes: the same sizes as Python ints."""

    tokens: torch.Tensor
    pos: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    shapes: List[List[int]]

    def finest_level(self):
        """(start, H, W) of the level with the most tokens."""
        level = max(range(len(self.shapes)), key=lambda i: self.shapes[i][0] * self.shapes[i][1])
        start = sum(h * w for h, w in self.shapes[:level])
        return start, self.shapes[level][0], self.shapes[level][1]


@dataclass
class DecoderOutput:
    """hidden: per layer (B, N, C) outputs; references: L + 1 reference boxes (B, N, 4),
    references[l] being the one layer l started from; mask_features: per layer the mask
    features its masks are predicted on."""

    hidden: List[torch.Tensor]
    references: List[torch.Tensor]
    mask_features: List[torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, num_levels: int, num_points: int):
        super().__init__()
        self.self_attn = SelfAttentionBlock(dim, num_heads, dropout)
        self.cross_attn = DeformableAttentionBlock(dim, num_levels, num_heads, num_points, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, queries, query_pos, reference_boxes, memory: EncoderTokens, tokens, attn_mask=None):
        queries = self.self_attn(queries, query_pos, attn_mask=attn_mask)
        reference = reference_boxes[:, :, None].expand(-1, -1, len(memory.shapes), -1)  # (B, N, L, 4)
        queries = self.cross_attn(queries, query_pos, reference, tokens, memory.spatial_shapes, memory.level_start_index)
        return self.ffn(queries)


class DeformableDecoder(nn.Module):
    """
    Args:
        num_layers: decoder layers (DEC_LAYERS).
        bato: the BATO module, or None to turn BATO off.
        bato_layer: index of the layer before which BATO runs (1 when guided by Q_bal).
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
        bato: Optional[BalanceAwareTokensOptimization] = None,
        bato_layer: int = 1,
    ):
        super().__init__()
        if bato is not None and not 0 <= bato_layer < num_layers:
            raise ValueError(f"DeformableDecoder: BATO before layer {bato_layer} needs more than {bato_layer} decoder layers")
        self.layers = nn.ModuleList(
            DecoderLayer(dim, num_heads, ffn_dim, dropout, num_levels, num_points) for _ in range(num_layers)
        )
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.bato = bato
        self.bato_layer = bato_layer
        xavier_init_matrices(self.layers, self.ref_point_head)
        for module in self.layers.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()

    def forward(
        self,
        queries: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: EncoderTokens,
        mask_features: torch.Tensor,
        heads: PredictionHeads,
        attn_mask: Optional[torch.Tensor] = None,
        num_matching: Optional[int] = None,
        guide: Optional[GuidingTokens] = None,
    ) -> DecoderOutput:
        """
        Args:
            queries: (B, N, C) content queries (denoising first, then the N_m matching ones).
            reference_boxes: (B, N, 4) normalised initial reference boxes.
            memory: encoder tokens T_i.
            mask_features: (B, C, h, w).
            heads: the shared prediction heads (for refinement and BATO's guiding tokens).
            attn_mask: (N, N) self-attention mask (denoising), or None.
            num_matching: N_m; BATO's guidance comes from the last N_m queries only.
            guide: precomputed guiding tokens (guidance from T_i, T_s1 or T_s2); None means
                they are built from the queries at `bato_layer` (guidance from Q_bal).
        """
        num_matching = queries.shape[1] if num_matching is None else num_matching
        device_type = queries.device.type
        hidden, references, layer_mask_features = [], [reference_boxes], []
        tokens = memory.tokens
        reference = reference_boxes
        # NOTE: like the release, the decoder layers run in float32 even under autocast.
        with torch.autocast(device_type=device_type, enabled=False):
            queries, reference = queries.float(), reference.float()
            for index, layer in enumerate(self.layers):
                query_pos = self.ref_point_head(box_position_embedding(reference, queries.shape[-1] // 2))
                if self.bato is not None and index == self.bato_layer:
                    if guide is None:
                        guide = self.bato.guiding_tokens(queries[:, -num_matching:], query_pos[:, -num_matching:], heads)
                    tokens, mask_features = self.bato(tokens, memory.pos, guide, mask_features, memory.finest_level())
                queries = layer(queries, query_pos, reference, memory, tokens, attn_mask)
                refined = refine_boxes(reference, heads.box_embed(queries), boxes_are_logits=False)
                hidden.append(queries)
                references.append(refined)
                layer_mask_features.append(mask_features)
                reference = refined.detach()
        return DecoderOutput(hidden, references, layer_mask_features)
