"""Balance-Aware Tokens Optimization (BATO, paper Sec. 3.2.3, Eq. 5-8).

BATO takes the G best queries of a guidance source (by default the balance-aware query
Q_bal made by the first decoder layer, Eq. 4), turns them into guiding tokens T_g and lets
every encoder token cross-attend to them: the result is the balance-aware tokens T_bal
(Eq. 8), which the later decoder layers attend to instead of T_i. The highest-resolution
level of T_bal also updates the mask features those layers predict masks on.

The parts are composed, each replaceable:
- a guidance source (Tab. 5): `BalanceAwareQueryGuidance` (Q_bal, the paper's model) or
  `TokenSetGuidance` for T_i, T_s1 or T_s2 - it decides which tokens guide and before
  which decoder layer BATO runs;
- a guiding-token generator (Tab. 6): `MaskBoxGuidingTokens` (mask and box guiding tokens,
  Eq. 5-7) or `QueryGuidingTokens` (the selected queries themselves, no generation);
- the cross-attention, feed-forward and mask-feature update of
  `BalanceAwareTokensOptimization`.

Shape glossary: B batch, N candidate tokens, G guiding tokens, S encoder tokens, C hidden
dim, h x w mask-feature resolution.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Type

import torch
from torch import nn

from ..layers import (
    FFN,
    BoxPositionalQuery,
    ConvNormAct,
    CrossAttentionBlock,
    NormLayer,
    group_norm,
    xavier_init_matrices,
)
from .feature_tokens import FeatureTokens
from .padding import upsample_within
from .prediction_heads import PredictionHeads
from .query_selection import TokenSet, select_top_k

__all__ = [
    "BalanceAwareTokensOptimization",
    "GuidingTokens",
    "GuidanceSource",
    "BalanceAwareQueryGuidance",
    "TokenSetGuidance",
    "guidance_source",
    "GUIDANCE_SOURCES",
    "MaskBoxGuidingTokens",
    "QueryGuidingTokens",
]

# Tab. 5: the encoder tokens T_i, the first-selected T_s1, the second-selected T_s2, or the
# balance-aware query Q_bal (the paper's choice).
GUIDANCE_SOURCES = ("T_i", "T_s1", "T_s2", "Q_bal")


class GuidanceSource(ABC):
    """Which tokens BATO's guiding tokens come from, and before which decoder layer BATO
    runs (`layer`)."""

    name: str
    layer: int

    @abstractmethod
    def candidates(
        self,
        token_sets: Dict[str, TokenSet],
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        positional_query: BoxPositionalQuery,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(tokens (B, N, C), their positional queries (B, N, C), which of them may guide
        (B, N) bool or None: all) to choose guiding tokens from.

        token_sets: the named token sets of this forward pass ("T_i", "T_s1", "T_s2");
        queries, query_pos: the matching queries entering decoder layer `layer` and their
        positional queries; positional_query: the decoder's box -> positional query module.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, before decoder layer {self.layer})"


class BalanceAwareQueryGuidance(GuidanceSource):
    """Guidance from Q_bal, the output of decoder layer 0 (Eq. 4): BATO runs before layer 1,
    so layer 0 attends to T_i and layers 1.. to T_bal (as in the release)."""

    name = "Q_bal"
    layer = 1

    def candidates(self, token_sets, queries, query_pos, positional_query):
        return queries, query_pos, None


class TokenSetGuidance(GuidanceSource):
    """Guidance from a token set made before the decoder (T_i, T_s1 or T_s2; Tab. 5).

    NOTE: the paper does not say where BATO runs with these sources; as they exist before
    the decoder, BATO runs before layer 0 and every decoder layer attends to T_bal. Their
    positional queries come from their boxes through the decoder's positional-query MLP.
    """

    layer = 0

    def __init__(self, name: str):
        if name not in ("T_i", "T_s1", "T_s2"):
            raise ValueError(f"TokenSetGuidance: the token set must be T_i, T_s1 or T_s2, got {name!r}")
        self.name = name

    def candidates(self, token_sets, queries, query_pos, positional_query):
        if self.name not in token_sets:
            raise ValueError(
                f"BATO guidance from {self.name} needs a model that makes {self.name} (T_s2: the DI module)"
            )
        chosen = token_sets[self.name]
        return chosen.tokens, positional_query(chosen.boxes), chosen.valid


def guidance_source(name: str) -> GuidanceSource:
    """The guidance source called `name`, one of GUIDANCE_SOURCES."""
    if name == "Q_bal":
        return BalanceAwareQueryGuidance()
    if name in GUIDANCE_SOURCES:
        return TokenSetGuidance(name)
    raise ValueError(f"BATO guidance source must be one of {GUIDANCE_SOURCES}, got {name!r}")


@dataclass
class GuidingTokens:
    """T_g as the cross-attention reads it: values (B, G, C); key_pos (B, G, C) added to the
    values to make the keys, or None."""

    values: torch.Tensor
    key_pos: Optional[torch.Tensor]


class MaskBoxGuidingTokens(nn.Module):
    """Guiding-token generation (Eq. 5-7): the mask guiding tokens are the mask embeddings
    of the chosen queries (Eq. 5), the box guiding tokens their positional queries (Eq. 6),
    and T_g combines them (Eq. 7).

    NOTE: Eq. 7 sums the mask and box guiding tokens; the release (and we) put that sum into
    the keys only, the values being the mask guiding tokens alone.
    """

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, heads: PredictionHeads) -> GuidingTokens:
        return GuidingTokens(values=heads.mask_embed(tokens), key_pos=pos)


class QueryGuidingTokens(nn.Module):
    """No guiding-token generation (Tab. 6): the chosen queries are keys and values."""

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, heads: PredictionHeads) -> GuidingTokens:
        return GuidingTokens(values=tokens, key_pos=None)


class BalanceAwareTokensOptimization(nn.Module):
    """
    Args:
        dim: hidden dim C (with `MaskBoxGuidingTokens` the mask dim must equal it: mask
            embeddings are the values).
        num_heads, ffn_dim, dropout: the cross-attention and feed-forward blocks.
        guidance: the guidance source (default: Q_bal).
        generator: the guiding-token generator (default: `MaskBoxGuidingTokens`).
        num_guiding_tokens: G, how many of the guidance source's tokens guide.
        norm_layer: norm of the mask-feature convolution (default GroupNorm, 32 groups).
        update_mask_features: build the mask-feature update (False for a detection-only
            model, which has no mask features).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float = 0.0,
        *,
        guidance: Optional[GuidanceSource] = None,
        generator: Optional[nn.Module] = None,
        num_guiding_tokens: int = 50,
        norm_layer: Optional[NormLayer] = None,
        act_layer: Type[nn.Module] = nn.ReLU,
        update_mask_features: bool = True,
    ):
        super().__init__()
        if num_guiding_tokens < 1:
            raise ValueError(f"BATO: the number of guiding tokens must be at least 1, got {num_guiding_tokens}")
        self.guidance = guidance if guidance is not None else BalanceAwareQueryGuidance()
        self.generator = generator if generator is not None else MaskBoxGuidingTokens()
        self.num_guiding_tokens = num_guiding_tokens
        self.cross_attn = CrossAttentionBlock(dim, num_heads, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)
        norm_layer = norm_layer if norm_layer is not None else group_norm(32)
        self.mask_feature_conv = (
            ConvNormAct(dim, dim, 3, norm_layer=norm_layer, act_layer=act_layer) if update_mask_features else None
        )
        xavier_init_matrices(self.cross_attn, self.ffn)

    def guiding_tokens(
        self, tokens: torch.Tensor, pos: torch.Tensor, heads: PredictionHeads, valid: Optional[torch.Tensor] = None
    ) -> GuidingTokens:
        """T_g from the G candidates with the highest class score (Eq. 5-7).

        tokens, pos: (B, N, C) candidates of the guidance source (matching queries only,
        never denoising ones) and their positional queries; valid: (B, N) bool, the
        candidates that come before the others whatever their score (T_i's image tokens
        under a padding mask), or None.

        NOTE: as in the released weights, the scores are computed on the candidates without
        the prediction heads' LayerNorm (and so are the mask embeddings of Eq. 5).
        NOTE (panoptic): the best candidates guide whatever their class, thing or stuff; the
        box guiding tokens of stuff queries come from boxes that are supervised only with
        MODEL.DI_MASKDINO.LOSS.STUFF_BOX_LOSS (see criterion.py).
        """
        scores = heads.class_embed(tokens).max(-1).values
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        _, chosen, chosen_pos = select_top_k(scores, self.num_guiding_tokens, tokens, pos)
        return self.generator(chosen, chosen_pos, heads)

    def forward(
        self, memory: FeatureTokens, mask_features: Optional[torch.Tensor], guide: GuidingTokens
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            memory: the encoder tokens T_i (with their sine positions).
            mask_features: (B, C, h, w) 1/4-resolution mask features, or None (detection only).
            guide: the guiding tokens T_g.

        Returns:
            T_bal (B, S, C) and the updated mask features (B, C, h, w) (None without mask features).
        """
        # Eq. 8: T_bal = FFN(MHCA(T_i, T_g))
        balanced = self.ffn(self.cross_attn(memory.tokens, guide.values, pos=memory.pos, memory_pos=guide.key_pos))
        if self.mask_feature_conv is None or mask_features is None:
            if mask_features is not None:
                raise ValueError("BATO was built without the mask-feature update but was given mask features")
            # NOTE: a detection-only model has no mask features, so there is nothing to update;
            # T_bal still guides the later decoder layers, and the mask guiding tokens are
            # still the mask embeddings of Eq. 5 (the mask-embedding head is kept for them).
            return balanced, None
        # NOTE: the mask-feature update has no equation in the paper; as in the release, the
        # finest level of T_bal, upsampled to the mask features, is added to them and passed
        # through a 3x3 conv + norm + activation.
        # With a padding mask, the finest level is upsampled from the images' cells only.
        finest = memory.level_maps(balanced)[memory.finest_level()]
        upsampled = upsample_within(finest, mask_features.shape[-2:], memory.padding)
        return balanced, self.mask_feature_conv(mask_features + upsampled)
