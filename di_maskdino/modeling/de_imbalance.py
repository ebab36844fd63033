"""The De-Imbalance (DI) module: residual double-selection (paper Sec. 3.2, Eq. 1-4).

The first selection S(T_i, k1) happens in query selection (:mod:`.query_selection`) and
gives T_s1. Each stage here then lets the selected tokens interact - self-attention layers
with iterative box refinement whose class and box outputs are supervised - and keeps the
k_{j+1} best by class score: with the paper's two selections, one stage turns the k1 = 600
tokens of T_s1 into the k2 = 300 tokens of T_s2, which the first decoder layer turns into
the balance-aware query Q_bal. More stages give the three-selection variant (Tab. 7).

Shape glossary: B batch, N tokens entering a stage, k tokens kept, C hidden dim, K classes.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn

from ..layers import FFN, MLP, SelfAttentionBlock, box_position_embedding
from .geometry import inverse_sigmoid, refine_boxes
from .heads import PredictionHeads

__all__ = ["DeImbalance", "TokenInteraction", "TokenInteractionLayer", "TokenInteractionOutput", "select_top_k"]


def select_top_k(scores: torch.Tensor, k: int, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Indices (B, k) of the k largest `scores` (B, N) per image, and each (B, N, ...)
    tensor gathered at them. k larger than N keeps all N."""
    k = min(k, scores.shape[1])
    index = scores.topk(k, dim=1).indices
    gathered = tuple(t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])) for t in tensors)
    return (index,) + gathered


@dataclass
class TokenInteractionOutput:
    """Per-layer supervised predictions of a token-interaction stage (no masks)."""

    logits: List[torch.Tensor]  # each (B, N, K)
    boxes: List[torch.Tensor]  # each (B, N, 4), normalised cxcywh


class TokenInteractionLayer(nn.Module):
    """Self-attention among the selected tokens, then a feed-forward block (Eq. 2)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = SelfAttentionBlock(dim, num_heads, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.self_attn(tokens, pos))


class TokenInteraction(nn.Module):
    """One stage of token interaction with box refinement (Eq. 2-3).

    The positional query of every token is an MLP of the sine embedding of its current
    box; after each layer the box is refined from the layer output (the next layer sees
    it detached).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"TokenInteraction: num_layers must be at least 1, got {num_layers}")
        self.layers = nn.ModuleList(TokenInteractionLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.norm = nn.LayerNorm(dim)
        self.box_embed = MLP(dim, dim, 4, 3)
        nn.init.zeros_(self.box_embed.layers[-1].weight)
        nn.init.zeros_(self.box_embed.layers[-1].bias)

    def forward(self, tokens: torch.Tensor, boxes: torch.Tensor, heads: PredictionHeads):
        """
        Args:
            tokens: (B, N, C); boxes: (B, N, 4) normalised boxes of the tokens.

        Returns:
            last layer output (B, N, C), its refined boxes (B, N, 4, not detached), and the
            stage's supervised predictions.
        """
        logits, predicted_boxes = [], []
        reference = boxes
        for layer in self.layers:
            pos = self.ref_point_head(box_position_embedding(reference, tokens.shape[-1] // 2))
            tokens = layer(tokens, pos)
            refined = refine_boxes(reference, self.box_embed(tokens), boxes_are_logits=False)
            normed = self.norm(tokens)
            # NOTE: as in the released weights, the supervised outputs pass the stage norm
            # and then the shared heads' norm, and the supervised box refines the refined
            # box again from the normed output.
            logits.append(heads(normed)[0])
            predicted_boxes.append(refine_boxes(refined, self.box_embed(normed), boxes_are_logits=False))
            reference = refined.detach()
        return tokens, refined, TokenInteractionOutput(logits, predicted_boxes)


class DeImbalance(nn.Module):
    """Residual multi-selection: `len(selection_sizes)` stages of token interaction, each
    followed by a top-k selection by class score.

    Args:
        selection_sizes: sizes after the first selection, e.g. (300,) for the paper's
            k1 = 600 -> k2 = 300, or (600, 300) for three selections.
        num_layers: token-interaction layers per stage (TI_LAYERS).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, num_layers: int, selection_sizes: Sequence[int]):
        super().__init__()
        if not selection_sizes:
            raise ValueError("DeImbalance: needs at least one selection after the first")
        self.selection_sizes = list(selection_sizes)
        self.stages = nn.ModuleList(
            TokenInteraction(dim, num_heads, ffn_dim, dropout, num_layers) for _ in self.selection_sizes
        )

    def forward(self, tokens: torch.Tensor, box_logits: torch.Tensor, heads: PredictionHeads):
        """
        Args:
            tokens: (B, k1, C) T_s1 (detached); box_logits: (B, k1, 4) their initial boxes.

        Returns:
            T_s2 (B, k_last, C), its box logits (B, k_last, 4), and the supervised outputs of
            every stage (a list of TokenInteractionOutput).
        """
        outputs = []
        boxes = box_logits.sigmoid()
        device_type = tokens.device.type
        # NOTE: like the release, token interaction runs in float32 even under autocast.
        with torch.autocast(device_type=device_type, enabled=False):
            tokens, boxes = tokens.float(), boxes.float()
            for stage, k in zip(self.stages, self.selection_sizes):
                tokens, boxes, stage_output = stage(tokens, boxes, heads)
                outputs.append(stage_output)
                # Selection score: the class head on the stage-normed tokens (Eq. 4).
                scores = heads.class_embed(stage.norm(tokens)).max(-1).values
                _, tokens, boxes = select_top_k(scores, k, tokens, boxes)
        return tokens, inverse_sigmoid(boxes), outputs
