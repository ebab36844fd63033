"""Named output structures of the model (instead of nested lists of dicts).

Shape glossary: B batch, N queries, K classes, D mask dim, h x w mask-feature resolution
(1/4 of the padded input). Boxes are normalised (cx, cy, w, h) of the padded input.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .box_mask_head import BoxHeadFeatures
from .denoising import DenoisingQueries
from .padding import ImagePadding

__all__ = ["Predictions", "DenoisingOutput", "DIMaskDINOOutput", "mask_logits", "RawDetections"]


def mask_logits(mask_embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
    """Mask logits of the prediction heads (Sec. 3.2.4): (B, N, D) mask embeddings . (B, D, h, w)
    mask features -> (B, N, h, w)."""
    return torch.einsum("bnd,bdhw->bnhw", mask_embed, mask_features)


class Predictions:
    """The class, box and mask predictions of one supervised output.

    logits: (B, N, K) class logits (sigmoid, no background class); boxes: (B, N, 4);
    masks: (B, N, h, w) mask logits, or None where a stage predicts no masks.

    The mask logits are the product of the mask embeddings (B, N, D) and the mask features
    (B, D, h, w) (`mask_logits`). A prediction can hold that product (`masks=`), or the two
    factors (`mask_embed=`, `mask_features=`), as the model does in training: the losses
    need the logits only at sampled points (see `point_sampling.mask_logits_at_points`),
    and (B, N, h, w) logits for every supervised output would be the largest tensors of a
    training step. `masks` then computes the product on first access (and keeps it).

    embeddings: (B, N, C) the query embeddings the heads read (decoder layers; the box mask
    head reads them too), or None.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        masks: Optional[torch.Tensor] = None,
        *,
        mask_embed: Optional[torch.Tensor] = None,
        mask_features: Optional[torch.Tensor] = None,
        embeddings: Optional[torch.Tensor] = None,
    ):
        if (mask_embed is None) != (mask_features is None):
            raise ValueError("Predictions: mask_embed and mask_features go together")
        if masks is not None and mask_embed is not None:
            raise ValueError("Predictions: give the mask logits or their factors (mask_embed, mask_features), not both")
        self.logits = logits
        self.boxes = boxes
        self._masks = masks
        self.mask_embed = mask_embed
        self.mask_features = mask_features
        self.embeddings = embeddings

    @property
    def has_masks(self) -> bool:
        return self._masks is not None or self.mask_embed is not None

    @property
    def masks(self) -> Optional[torch.Tensor]:
        if self._masks is None and self.mask_embed is not None:
            self._masks = mask_logits(self.mask_embed, self.mask_features)
        return self._masks

    def slice_queries(self, start: int, end: Optional[int] = None) -> "Predictions":
        embeddings = None if self.embeddings is None else self.embeddings[:, start:end]
        if self.mask_embed is not None and self._masks is None:
            return Predictions(
                self.logits[:, start:end],
                self.boxes[:, start:end],
                mask_embed=self.mask_embed[:, start:end],
                mask_features=self.mask_features,
                embeddings=embeddings,
            )
        masks = None if self._masks is None else self._masks[:, start:end]
        return Predictions(self.logits[:, start:end], self.boxes[:, start:end], masks, embeddings=embeddings)

    def __repr__(self) -> str:
        masks = "factored" if self._masks is None and self.mask_embed is not None else self._masks is not None
        return f"Predictions(logits={tuple(self.logits.shape)}, boxes={tuple(self.boxes.shape)}, masks={masks})"


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
    padding: the images' valid regions when the model has a padding mask (its boxes are then
        normalised by each image), else None.
    """

    layers: List[Predictions]
    encoder: Optional[Predictions] = None
    token_interaction: List[List[Predictions]] = field(default_factory=list)
    denoising: Optional[DenoisingOutput] = None
    box_features: Optional[BoxHeadFeatures] = None
    padding: Optional[ImagePadding] = None

    @property
    def final(self) -> Predictions:
        return self.layers[-1]

    def named(self) -> List[Tuple[str, Predictions]]:
        """Every supervised output with its name: "layer 0" (the initial prediction),
        "layer 1", ... (the decoder layers), then "TI s.i" (stage s, token-interaction layer
        i of the DI module)."""
        named = [(f"layer {i}", p) for i, p in enumerate(self.layers)]
        for s, stage in enumerate(self.token_interaction):
            named += [(f"TI {s}.{i}", p) for i, p in enumerate(stage)]
        return named


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
