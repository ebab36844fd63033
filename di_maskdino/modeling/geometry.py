"""Box and level bookkeeping shared by the query selection, DI module and decoder.

Boxes are normalised (cx, cy, w, h) in [0, 1] unless a name says otherwise; "logits" are
their inverse sigmoid, the space in which box refinements are added.
"""
from typing import List

import torch
from torchvision.ops import box_convert, masks_to_boxes

__all__ = [
    "pixel_centres",
    "level_start_index_of",
    "inverse_sigmoid",
    "refine_boxes",
    "encoder_proposals",
    "masks_to_box_logits",
]


def pixel_centres(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H * W, 2) normalised (x, y) centres of an H x W map's pixels, row by row."""
    y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


def level_start_index_of(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(L, 2) level sizes -> (L,) index of every level's first token."""
    sizes = spatial_shapes.prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x kept above `eps`."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(box_logits_or_boxes: torch.Tensor, delta: torch.Tensor, *, boxes_are_logits: bool) -> torch.Tensor:
    """Iterative box refinement: sigmoid(delta + logit(reference))."""
    logits = box_logits_or_boxes if boxes_are_logits else inverse_sigmoid(box_logits_or_boxes)
    return (delta + logits).sigmoid()


def encoder_proposals(tokens: torch.Tensor, shapes: List[List[int]]):
    """Two-stage proposals, one per encoder token (Deformable-DETR / DINO).

    Level l (in the order of `shapes`) proposes, at each pixel centre, a square box of side
    0.05 * 2**l. Tokens whose proposal leaves (0.01, 0.99) in any coordinate are invalid:
    their proposal logit is +inf and their token is zeroed.

    Args:
        tokens: (B, S, C) encoder tokens T_i.
        shapes: L (H_l, W_l) pairs.

    Returns:
        tokens with invalid ones zeroed, (B, S, C); proposal box logits (1, S, 4).
    """
    proposals = []
    for level, (height, width) in enumerate(shapes):
        centres = pixel_centres(height, width, tokens.device)
        size = centres.new_full((centres.shape[0], 2), 0.05 * 2.0**level)
        proposals.append(torch.cat([centres, size], dim=-1))
    proposals = torch.cat(proposals)[None]
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    logits = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
    return tokens.masked_fill(~valid, 0.0), logits


def masks_to_box_logits(mask_logits: torch.Tensor) -> torch.Tensor:
    """Mask-enhanced box initialisation: the tight box of every predicted mask (logit > 0).

    Args:
        mask_logits: (B, N, H, W).

    Returns:
        (B, N, 4) box logits, normalised by the mask size; boxes span pixel indices
        (x_max - x_min, as the release computes them).

    NOTE: an empty mask gets the degenerate box (cx, cy, w, h) = (1, 1, 0, 0), whose logits
    are (+11.5, +11.5, -11.5, -11.5) - the box the authors' release derives for it.
    """
    batch, queries, height, width = mask_logits.shape
    binary = (mask_logits > 0).flatten(0, 1)
    boxes = box_convert(masks_to_boxes(binary), "xyxy", "cxcywh")
    boxes = boxes / torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    empty = ~binary.flatten(1).any(1)
    boxes[empty] = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=boxes.dtype, device=boxes.device)
    return inverse_sigmoid(boxes.view(batch, queries, 4))
