"""The De-Imbalance (DI) module: residual double-selection (paper Sec. 3.2.2, Eq. 1-4).

The first selection T_s1 = S(T_i, k1) (Eq. 1) happens in :mod:`.query_selection`. Here the
selected tokens interact (Eq. 2: self-attention layers with iterative box refinement, whose
class and box outputs are supervised) and the second selection keeps the k2 best of them by
class score (Eq. 3), giving T_s2. The first decoder layer then turns T_s2 into the
balance-aware query Q_bal (Eq. 4, :mod:`.decoder`). More stages give the three-selection
variant of Tab. 7 (T_s1 -> TI -> k2 -> TI -> k3).

Shape glossary: B batch, N tokens entering a stage, k tokens kept, C hidden dim, K classes.
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn

from ..layers import FFN, MLP, BoxPositionalQuery, SelfAttentionBlock, at_least_float32, checkpointed
from .boxes import inverse_sigmoid, refine_boxes
from .outputs import Predictions
from .prediction_heads import PredictionHeads
from .query_selection import TokenSet, select_top_k

__all__ = ["DeImbalance", "TokenInteraction", "TokenInteractionLayer"]


class TokenInteractionLayer(nn.Module):
    """Self-attention among the selected tokens, then a feed-forward block (Eq. 2)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = SelfAttentionBlock(dim, num_heads, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.self_attn(tokens, pos))


@dataclass
class InteractionResult:
    """tokens: (B, N, C) output of the last layer; boxes: (B, N, 4) its refined boxes (not
    detached); predictions: the supervised output of every layer (no masks)."""

    tokens: torch.Tensor
    boxes: torch.Tensor
    predictions: List[Predictions]


class TokenInteraction(nn.Module):
    """One stage of token interaction with box refinement (Eq. 2).

    The positional query of every token is made from its current box; after each layer the
    box is refined from the layer output (the next layer sees it detached). With
    `grad_checkpointing` each layer runs under activation checkpointing in training.
    """

    def __init__(
        self, dim: int, num_heads: int, ffn_dim: int, dropout: float, num_layers: int, grad_checkpointing: bool = False
    ):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        if num_layers < 1:
            raise ValueError(f"TokenInteraction: num_layers must be at least 1, got {num_layers}")
        self.layers = nn.ModuleList(TokenInteractionLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.ref_point_head = BoxPositionalQuery(dim)
        self.norm = nn.LayerNorm(dim)
        self.box_embed = MLP(dim, dim, 4, 3)
        nn.init.zeros_(self.box_embed.layers[-1].weight)
        nn.init.zeros_(self.box_embed.layers[-1].bias)

    def forward(self, tokens: torch.Tensor, boxes: torch.Tensor, heads: PredictionHeads) -> InteractionResult:
        """tokens: (B, N, C); boxes: (B, N, 4) normalised boxes of the tokens."""
        predictions = []
        reference = boxes
        for layer in self.layers:
            tokens = checkpointed(self.grad_checkpointing, layer, tokens, self.ref_point_head(reference))
            refined = refine_boxes(reference, self.box_embed(tokens))
            normed = self.norm(tokens)
            # NOTE: as in the released weights, the supervised outputs pass the stage norm and
            # then the shared heads' norm, and the supervised box refines the refined box
            # again, from the normed output.
            logits = heads(normed)[0]
            predictions.append(Predictions(logits, refine_boxes(refined, self.box_embed(normed))))
            reference = refined.detach()
        return InteractionResult(tokens, refined, predictions)

    def scores(self, tokens: torch.Tensor, heads: PredictionHeads) -> torch.Tensor:
        """(B, N) selection scores: the best class logit of the stage-normed tokens (Eq. 3)."""
        return heads.class_embed(self.norm(tokens)).max(-1).values


class DeImbalance(nn.Module):
    """Residual multi-selection: one stage of token interaction per further selection,
    each followed by a top-k selection by class score.

    Args:
        selection_sizes: sizes of the selections after the first: (k2,) for the paper's
            double selection, (k2, k3) for three selections; with the single-selection
            variant of Tab. 7, (k1,): token interaction then keeps every token.
        num_layers: token-interaction layers per stage (TI_LAYERS).
        grad_checkpointing: run every token-interaction layer under activation checkpointing
            in training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        num_layers: int,
        selection_sizes: Sequence[int],
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if not selection_sizes:
            raise ValueError("DeImbalance: needs at least one selection size after the first selection")
        self.selection_sizes = list(selection_sizes)
        self.stages = nn.ModuleList(
            TokenInteraction(dim, num_heads, ffn_dim, dropout, num_layers, grad_checkpointing)
            for _ in self.selection_sizes
        )

    def forward(self, selected: TokenSet, heads: PredictionHeads) -> Tuple[TokenSet, List[List[Predictions]]]:
        """
        Args:
            selected: T_s1 (detached) with its initial boxes.

        Returns:
            T_s2 (B, k_last tokens) with its box logits, and the supervised outputs of every
            token-interaction layer of every stage.
        """
        outputs = []
        tokens, boxes = selected.tokens, selected.boxes
        # NOTE: like the release, token interaction runs in float32 even under autocast.
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            tokens, boxes = at_least_float32(tokens), at_least_float32(boxes)
            for stage, k in zip(self.stages, self.selection_sizes):
                result = stage(tokens, boxes, heads)  # Eq. 2
                outputs.append(result.predictions)
                # Eq. 3: T_s2 = S(TI(T_s1), k2)
                _, tokens, boxes = select_top_k(stage.scores(result.tokens, heads), k, result.tokens, result.boxes)
        return TokenSet(tokens, inverse_sigmoid(boxes)), outputs
