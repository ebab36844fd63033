"""Named output structures of the model (instead of nested lists of dicts).

Shape glossary: B batch, N queries, K classes, h x w mask-feature resolution (1/4 of the
padded input). Boxes are normalised (cx, cy, w, h) of the padded input.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .denoising import DenoisingQueries

__all__ = ["Predictions", "DenoisingOutput", "DIMaskDINOOutput", "RawDetections"]


@dataclass
class Predictions:
    """logits: (B, N, K) class logits (sigmoid, no background class); boxes: (B, N, 4);
    masks: (B, N, h, w) mask logits, or None where a stage predicts no masks."""

    logits: torch.Tensor
    boxes: torch.Tensor
    masks: Optional[torch.Tensor] = None

    def slice_queries(self, start: int, end: Optional[int] = None) -> "Predictions":
        masks = None if self.masks is None else self.masks[:, start:end]
        return Predictions(self.logits[:, start:end], self.boxes[:, start:end], masks)


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
    """

    layers: List[Predictions]
    encoder: Optional[Predictions] = None
    token_interaction: List[List[Predictions]] = field(default_factory=list)
    denoising: Optional[DenoisingOutput] = None

    @property
    def final(self) -> Predictions:
        return self.layers[-1]


@dataclass
class RawDetections:
    """The k best (query, class) pairs of every image, before post-processing (what the
    exported model returns).

    scores: (B, k) class probabilities (sigmoid), best first; labels: (B, k) int64;
    boxes: (B, k, 4) normalised (cx, cy, w, h) of the padded input; mask_logits: (B, k, h, w)
    mask logits of the pairs' queries at the mask-feature resolution, or None (detection
    only). `postprocess.detections_from_raw` turns one image's share into `Detections`.
    """

    scores: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    mask_logits: Optional[torch.Tensor]

    def as_tuple(self):
        return (self.scores, self.labels, self.boxes) + (() if self.mask_logits is None else (self.mask_logits,))

    @classmethod
    def from_tuple(cls, tensors) -> "RawDetections":
        tensors = tuple(tensors)
        if len(tensors) not in (3, 4):
            raise ValueError(
                f"RawDetections: expected 3 or 4 tensors (scores, labels, boxes[, masks]), got {len(tensors)}"
            )
        return cls(*tensors[:3], tensors[3] if len(tensors) == 4 else None)

    def image(self, index: int) -> "RawDetections":
        """Image `index`'s share, with a batch dimension of 1."""
        masks = None if self.mask_logits is None else self.mask_logits[index : index + 1]
        return RawDetections(
            self.scores[index : index + 1], self.labels[index : index + 1], self.boxes[index : index + 1], masks
        )
