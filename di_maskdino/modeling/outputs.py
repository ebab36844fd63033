"""Named output structures of the model (instead of nested lists of dicts).

Shape glossary: B batch, N queries, K classes, h x w mask-feature resolution (1/4 of the
padded input). Boxes are normalised (cx, cy, w, h) of the padded input.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .box_mask_head import BoxHeadFeatures
from .denoising import DenoisingQueries

__all__ = ["Predictions", "DenoisingOutput", "DIMaskDINOOutput"]


@dataclass
class Predictions:
    """logits: (B, N, K) class logits (sigmoid, no background class); boxes: (B, N, 4);
    masks: (B, N, h, w) mask logits, or None where a stage predicts no masks;
    embeddings: (B, N, C) the query embeddings the heads read (decoder layers), or None."""

    logits: torch.Tensor
    boxes: torch.Tensor
    masks: Optional[torch.Tensor] = None
    embeddings: Optional[torch.Tensor] = None

    def slice_queries(self, start: int, end: Optional[int] = None) -> "Predictions":
        masks = None if self.masks is None else self.masks[:, start:end]
        embeddings = None if self.embeddings is None else self.embeddings[:, start:end]
        return Predictions(self.logits[:, start:end], self.boxes[:, start:end], masks, embeddings)


@dataclass
class DenoisingOutput:
    """The denoising queries and their predictions at every supervised stage (the initial
    prediction and every decoder layer, as in `DIMaskDINOOutput.layers`).

    A model that trains with denoising queries reports `queries = None` (and no layers) for
    a batch without objects, so that its denoising losses are still charged, as zeros."""

    queries: Optional[DenoisingQueries]
    layers: List[Predictions]


@dataclass
class DIMaskDINOOutput:
    """Everything the model predicts for a batch.

    layers: the initial prediction (layer 0, from the queries entering the decoder) and
        then one entry per decoder layer; `final` is the last.
    encoder: the two-stage prediction of the k1 first-selected tokens T_s1.
    token_interaction: per DI stage, per token-interaction layer (no masks).
    denoising: present in training when the model has denoising queries.
    box_features: the box-conditioned mask head's per-image features, when the model has
        that head.
    """

    layers: List[Predictions]
    encoder: Optional[Predictions] = None
    token_interaction: List[List[Predictions]] = field(default_factory=list)
    denoising: Optional[DenoisingOutput] = None
    box_features: Optional[BoxHeadFeatures] = None

    @property
    def final(self) -> Predictions:
        return self.layers[-1]
