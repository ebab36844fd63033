"""The first selection with mask-enhanced box initialisation (paper Sec. 3.2.2, Eq. 1;
the two-stage query selection of DINO / MaskDINO).

Every encoder token of T_i gets a class score and a box (its proposal refined by the shared
box head); the first selection T_s1 = S(T_i, k1) keeps the k1 best-scoring tokens. Their
class and mask predictions are supervised (the "encoder" output), and with mask-enhanced
initialisation their initial boxes are the tight boxes of those masks.

Shape glossary: B batch, S encoder tokens, k selected tokens, C hidden dim.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.ops import box_convert, masks_to_boxes

from .boxes import inverse_sigmoid
from .feature_tokens import FeatureTokens, pixel_centres
from .outputs import Predictions, mask_logits
from .prediction_heads import PredictionHeads

__all__ = [
    "QuerySelection",
    "SelectedTokens",
    "TokenSet",
    "select_top_k",
    "encoder_proposals",
    "masks_to_box_logits",
]


# queries whose mask logits are computed at once for the mask-enhanced boxes in training
MASK_CHUNK = 100


def select_top_k(scores: torch.Tensor, k: int, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """S(., k): indices (B, k) of the k largest `scores` (B, N) per image, best first, and
    each (B, N, ...) tensor gathered at them. k larger than N keeps all N."""
    k = min(k, scores.shape[1])
    index = scores.topk(k, dim=1).indices
    gathered = tuple(
        t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])) for t in tensors
    )
    return (index,) + gathered


@dataclass
class TokenSet:
    """A set of tokens with a box each: T_i, T_s1, T_s2 or the queries of a decoder layer.

    tokens: (B, N, C); box_logits: (B, N, 4), inverse sigmoid of normalised cxcywh boxes;
    valid: (B, N) bool, the tokens a selection takes before the others (T_i's image tokens
    with a padding mask), or None: all alike.
    """

    tokens: torch.Tensor
    box_logits: torch.Tensor
    valid: Optional[torch.Tensor] = None

    @property
    def boxes(self) -> torch.Tensor:
        return self.box_logits.sigmoid()


@dataclass
class SelectedTokens:
    """scored: every encoder token of T_i (projected and normed) with its box;
    selected: T_s1, the k1 best tokens (detached) with their initial boxes (detached);
    predictions: the supervised two-stage prediction of T_s1."""

    scored: TokenSet
    selected: TokenSet
    predictions: Predictions


def encoder_proposals(
    tokens: torch.Tensor, shapes: Sequence[Tuple[int, int]], centres: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two-stage proposals, one per encoder token (Deformable-DETR / DINO).

    Level l (in the order of `shapes`) proposes, at each pixel centre, a square box of side
    0.05 * 2**l. Tokens whose proposal leaves (0.01, 0.99) in any coordinate are invalid:
    their proposal logit is +inf and their token is zeroed.

    Args:
        tokens: (B, S, C) encoder tokens T_i.
        shapes: L (H_l, W_l) pairs.
        centres: optional (B, S, 2) token centres in the image frame
            (`FeatureTokens.image_frame_centres` with a padding mask; the padded tokens lie
            beyond 1 and so are invalid); default: the pixel centres of the maps.

    Returns:
        tokens with invalid ones zeroed, (B, S, C); proposal box logits (1 or B, S, 4).
    """
    if centres is None:
        centres = torch.cat([pixel_centres(h, w, tokens.device) for h, w in shapes])[None]
    sizes = torch.cat([centres.new_full((h * w,), 0.05 * 2.0**level) for level, (h, w) in enumerate(shapes)])  # (S,)
    proposals = torch.cat([centres, sizes[None, :, None].expand(centres.shape[0], -1, 2)], dim=-1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    logits = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
    return tokens.masked_fill(~valid, 0.0), logits


MASK_BOX_EDGES = ("indices", "pixels")


def masks_to_box_logits(
    mask_logits: torch.Tensor, edges: str = "indices", frame_scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mask-enhanced box initialisation: the tight box of every predicted mask (logit > 0).

    Args:
        mask_logits: (B, N, H, W).
        edges: "indices": boxes span pixel indices (x_max - x_min, the release's "mask2box");
            "pixels": boxes span the pixels' outer edges (x_max + 1 - x_min, its "bitmask",
            detectron2's `BitMasks.get_bounding_boxes`).

        frame_scale: optional (B, 2) (x, y) size of every image as a fraction of the mask
            (`ImagePadding.frame_scale`): the boxes are then normalised by the images.

    Returns:
        (B, N, 4) box logits, normalised by the mask size (or by the images).

    NOTE: an empty mask gets the degenerate box (cx, cy, w, h) = (1, 1, 0, 0) with "indices"
    and (0, 0, 0, 0) with "pixels", whose logits are +-11.5 - the boxes the authors' release
    derives for it in each mode.
    """
    if edges not in MASK_BOX_EDGES:
        raise ValueError(f"masks_to_box_logits: edges must be one of {MASK_BOX_EDGES}, got {edges!r}")
    batch, queries, height, width = mask_logits.shape
    binary = (mask_logits > 0).flatten(0, 1)
    # in the logits' precision, at least single (float64 models stay float64)
    dtype = torch.promote_types(mask_logits.dtype, torch.float32)
    corners = masks_to_boxes(binary).to(dtype)
    if edges == "pixels":
        corners = corners + corners.new_tensor([0.0, 0.0, 1.0, 1.0])
    cx, cy, w, h = box_convert(corners, "xyxy", "cxcywh").unbind(-1)
    # divided by the sizes one by one (not by a tensor made of them), so that a dynamic-shape
    # torch.export keeps them symbolic
    boxes = torch.stack([cx / width, cy / height, w / width, h / height], dim=-1).view(batch, queries, 4)
    if frame_scale is not None:
        boxes = boxes / frame_scale.to(boxes.dtype).repeat(1, 2)[:, None, :]
    empty = ~binary.flatten(1).any(1).view(batch, queries, 1)
    empty_box = [1.0, 1.0, 0.0, 0.0] if edges == "indices" else [0.0, 0.0, 0.0, 0.0]
    return inverse_sigmoid(torch.where(empty, boxes.new_tensor(empty_box), boxes))


class QuerySelection(nn.Module):
    """
    Args:
        dim: hidden dim C.
        num_selected: k1, tokens kept by the first selection.
        mask_enhanced_boxes: initialise the boxes from the predicted masks; otherwise the
            selected tokens keep their predicted boxes.
        mask_box_edges: the extent of those boxes ("indices" or "pixels", see
            `masks_to_box_logits`).
    """

    def __init__(self, dim: int, num_selected: int, mask_enhanced_boxes: bool = True, mask_box_edges: str = "indices"):
        super().__init__()
        if num_selected < 1:
            raise ValueError(f"QuerySelection: the first selection must keep at least one token, got {num_selected}")
        if mask_box_edges not in MASK_BOX_EDGES:
            raise ValueError(f"QuerySelection: mask_box_edges must be one of {MASK_BOX_EDGES}, got {mask_box_edges!r}")
        self.num_selected = num_selected
        self.mask_enhanced_boxes = mask_enhanced_boxes
        self.mask_box_edges = mask_box_edges
        self.memory_proj = nn.Linear(dim, dim)
        self.memory_norm = nn.LayerNorm(dim)

    def forward(
        self, memory: FeatureTokens, mask_features: Optional[torch.Tensor], heads: PredictionHeads
    ) -> SelectedTokens:
        """mask_features: (B, D, h, w), or None for a detection-only model (no masks)."""
        padded = memory.padding is not None
        centres = memory.image_frame_centres() if padded else None
        tokens, proposal_logits = encoder_proposals(memory.tokens, memory.shapes, centres)
        tokens = self.memory_norm(self.memory_proj(tokens))
        box_logits = heads.box_embed(tokens) + proposal_logits
        # Eq. 1: T_s1 = S(T_i, k1), scored by the best class logit of each token
        scores = heads.class_embed(tokens).max(-1).values
        valid = None
        if padded:
            # NOTE: with a padding mask, the padded tokens come after every image token: how many
            # of them a batch has must not decide which image tokens are kept. The image's own
            # tokens compete as in the release (its border tokens included).
            valid = ~memory.padding_mask
            scores = scores.masked_fill(memory.padding_mask, float("-inf"))
        _, selected, selected_box_logits = select_top_k(scores, self.num_selected, tokens, box_logits)
        # in training the supervised masks stay factored (`Predictions`); the boxes need them whole
        predictions = heads.predict(selected, selected_box_logits.sigmoid(), mask_features, factored=self.training)
        if self.mask_enhanced_boxes and not predictions.has_masks:
            raise ValueError(
                "QuerySelection: mask-enhanced box initialisation needs mask features (the model has no mask "
                "branch); initialise the boxes from the encoder's boxes (mask_enhanced_boxes=False)"
            )
        # with a padding mask the boxes are normalised by the images (the mask features are
        # zero outside them, so no mask reaches into the padding)
        frame_scale = None
        if padded and mask_features is not None:
            frame_scale = memory.padding.frame_scale(mask_features.shape[-2:], memory.tokens.dtype)
        if self.mask_enhanced_boxes and predictions.mask_embed is not None:
            with torch.no_grad():  # a chunk of queries at a time: the whole logits only transiently
                initial_box_logits = torch.cat(
                    [
                        masks_to_box_logits(mask_logits(embed, mask_features), self.mask_box_edges, frame_scale)
                        for embed in predictions.mask_embed.split(MASK_CHUNK, dim=1)
                    ],
                    dim=1,
                )
        elif self.mask_enhanced_boxes:
            initial_box_logits = masks_to_box_logits(predictions.masks.detach(), self.mask_box_edges, frame_scale)
        else:
            initial_box_logits = selected_box_logits.detach()
        return SelectedTokens(
            scored=TokenSet(tokens, box_logits, valid),
            selected=TokenSet(selected.detach(), initial_box_logits),
            predictions=predictions,
        )
