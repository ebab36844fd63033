"""Query selection with mask-enhanced box initialisation (two-stage; MaskDINO, DINO).

Every encoder token gets a class score and a box (its proposal refined by the shared box
head); the first selection S(T_i, k1) keeps the k1 best-scoring tokens as T_s1 (paper
Eq. 1). Their class and mask predictions are supervised ("encoder" outputs), and with
mask-enhanced initialisation their initial boxes are the tight boxes of those masks.

Shape glossary: B batch, S encoder tokens, k selected tokens, C hidden dim.
"""
from dataclasses import dataclass

import torch
from torch import nn

from .de_imbalance import select_top_k
from .decoder import EncoderTokens
from .geometry import encoder_proposals, masks_to_box_logits
from .heads import PredictionHeads
from .outputs import Predictions

__all__ = ["QuerySelection", "SelectedTokens"]


@dataclass
class SelectedTokens:
    """content: (B, k, C) selected tokens (detached); box_logits: (B, k, 4) their initial
    boxes (detached); predictions: the supervised two-stage outputs; all_tokens (B, S, C)
    and all_box_logits (B, S, 4): every scored encoder token (T_i) and its box."""

    content: torch.Tensor
    box_logits: torch.Tensor
    predictions: Predictions
    all_tokens: torch.Tensor
    all_box_logits: torch.Tensor


class QuerySelection(nn.Module):
    """
    Args:
        dim: hidden dim C.
        mask_enhanced_boxes: initialise the boxes from the predicted masks ("mask2box").
    """

    def __init__(self, dim: int, mask_enhanced_boxes: bool = True):
        super().__init__()
        self.mask_enhanced_boxes = mask_enhanced_boxes
        self.memory_proj = nn.Linear(dim, dim)
        self.memory_norm = nn.LayerNorm(dim)

    def forward(self, memory: EncoderTokens, mask_features: torch.Tensor, heads: PredictionHeads, k: int) -> SelectedTokens:
        tokens, proposal_logits = encoder_proposals(memory.tokens, memory.shapes)
        tokens = self.memory_norm(self.memory_proj(tokens))
        scores = heads.class_embed(tokens).max(-1).values
        box_logits = heads.box_embed(tokens) + proposal_logits
        _, selected, selected_box_logits = select_top_k(scores, k, tokens, box_logits)
        logits, masks = heads(selected, mask_features)
        predictions = Predictions(logits, selected_box_logits.sigmoid(), masks)
        if self.mask_enhanced_boxes:
            initial_box_logits = masks_to_box_logits(masks.detach())
        else:
            initial_box_logits = selected_box_logits.detach()
        return SelectedTokens(selected.detach(), initial_box_logits, predictions, tokens, box_logits)
