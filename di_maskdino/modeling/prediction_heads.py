"""The prediction heads shared by every stage of the model (paper Sec. 3.2.4, Eq. 10-11).

One class head, one box head and one mask-embedding head serve the encoder (two-stage)
output, the initial prediction, every decoder layer and the denoising queries; the
token-interaction layers of the De-Imbalance module share the class head, and BATO's
guiding tokens are made with the class and mask-embedding heads.

Shape glossary: B batch, N queries, C hidden dim, K classes, D mask dim, h x w mask-feature
resolution (1/4 of the padded image).
"""

from typing import Optional, Tuple

import torch
from torch import nn

from ..layers import MLP
from .outputs import Predictions, mask_logits

__all__ = ["PredictionHeads"]


class PredictionHeads(nn.Module):
    """Class logits and masks of a set of queries, plus the box head they share.

    forward: norm -> class logits (B, N, K); norm -> mask embedding . mask features
    (B, N, h, w). `box_embed` gives box deltas (B, N, 4) in logit space; callers add them to
    their reference boxes (see `boxes.refine_boxes`).
    """

    def __init__(self, hidden_dim: int, num_classes: int, mask_dim: Optional[int]):
        """mask_dim: D, or None for no mask-embedding head (a detection-only model whose
        BATO does not generate mask guiding tokens)."""
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.box_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3) if mask_dim is not None else None
        nn.init.zeros_(self.box_embed.layers[-1].weight)
        nn.init.zeros_(self.box_embed.layers[-1].bias)

    @property
    def num_classes(self) -> int:
        return self.class_embed.out_features

    def forward(
        self, queries: torch.Tensor, mask_features: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """queries (B, N, C), mask_features (B, D, h, w) or None -> logits (B, N, K), masks
        (B, N, h, w) or None."""
        x = self.norm(queries)
        logits = self.class_embed(x)
        if mask_features is None:
            return logits, None
        self._check_mask_branch()
        return logits, mask_logits(self.mask_embed(x), mask_features)

    def predict(
        self,
        queries: torch.Tensor,
        boxes: torch.Tensor,
        mask_features: Optional[torch.Tensor] = None,
        *,
        factored: bool = False,
    ) -> Predictions:
        """The `Predictions` of queries (B, N, C) with their boxes (B, N, 4): class logits and,
        given mask features (B, D, h, w), the mask logits - or with `factored` their factors,
        the mask embeddings (B, N, D) and the mask features (as the losses want them)."""
        x = self.norm(queries)
        logits = self.class_embed(x)
        if mask_features is None:
            return Predictions(logits, boxes)
        self._check_mask_branch()
        if factored:
            return Predictions(logits, boxes, mask_embed=self.mask_embed(x), mask_features=mask_features)
        return Predictions(logits, boxes, mask_logits(self.mask_embed(x), mask_features))

    def _check_mask_branch(self) -> None:
        if self.mask_embed is None:
            raise ValueError("PredictionHeads: mask features given to heads built without a mask-embedding head")
