"""Sine position encodings (Transformer / DETR style) and the positional queries made from
them.

`sine_features` turns scalar positions into interleaved (sin, cos) features with the usual
geometric frequencies; `feature_map_position_embedding` applies it to the pixels of a
feature map, `box_position_embedding` to reference boxes, and `BoxPositionalQuery` maps the
latter through an MLP to the positional query of a decoder or token-interaction query.
"""

import math
from typing import Optional

import torch

from .blocks import MLP

__all__ = ["feature_map_position_embedding", "box_position_embedding", "sine_features", "BoxPositionalQuery"]

TWO_PI = 2 * math.pi


def sine_features(positions: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """(...,) positions -> (..., num_feats): [sin(p / t_0), cos(p / t_0), sin(p / t_1), ...]
    with t_i = temperature ** (2 * (i // 2) / num_feats)."""
    exponent = 2 * (torch.arange(num_feats, dtype=torch.float32, device=positions.device) // 2) / num_feats
    angles = positions[..., None] / temperature**exponent
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)


def feature_map_position_embedding(
    batch: int, height: int, width: int, channels: int, device: torch.device, extents: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(B, channels, H, W) embedding of the pixel grid: the first half encodes the row,
    the second the column; positions (i + 1) / (H + eps) * 2 pi, i.e. normalised to (0, 2 pi].

    extents: optional (B, 2) valid (rows, columns) of every image: positions are then
    normalised by them instead of by H and W (DETR's padding-mask positions; beyond 2 pi in
    the padding)."""
    eps = 1e-6
    half = channels // 2
    if extents is None:
        rows = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * TWO_PI
        cols = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * TWO_PI
        row_features = sine_features(rows, half)[:, None, :].expand(height, width, half)
        col_features = sine_features(cols, half)[None, :, :].expand(height, width, half)
        embedding = torch.cat([row_features, col_features], dim=-1).permute(2, 0, 1)
        return embedding[None].expand(batch, channels, height, width)
    extents = extents.to(torch.float32)
    rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)[None] / (extents[:, :1] + eps) * TWO_PI
    cols = torch.arange(1, width + 1, dtype=torch.float32, device=device)[None] / (extents[:, 1:] + eps) * TWO_PI
    row_features = sine_features(rows, half)[:, :, None, :].expand(-1, height, width, half)
    col_features = sine_features(cols, half)[:, None, :, :].expand(-1, height, width, half)
    return torch.cat([row_features, col_features], dim=-1).permute(0, 3, 1, 2)


def box_position_embedding(boxes: torch.Tensor, num_feats: int) -> torch.Tensor:
    """(..., 4) normalised (cx, cy, w, h) -> (..., 4 * num_feats), ordered (cy, cx, w, h);
    (..., 2) points (x, y) -> (..., 2 * num_feats), ordered (y, x)."""
    scaled = boxes * TWO_PI
    order = [1, 0, 2, 3] if boxes.shape[-1] == 4 else [1, 0]
    return torch.cat([sine_features(scaled[..., i], num_feats) for i in order], dim=-1)


class BoxPositionalQuery(MLP):
    """The positional query of a box (DAB-DETR / DINO): a two-layer MLP of the box's sine
    embedding, (..., 4) normalised boxes -> (..., dim).

    The decoder, the token-interaction layers of the De-Imbalance module and BATO's box
    guiding tokens all make their positional queries this way.
    """

    def __init__(self, dim: int):
        super().__init__(2 * dim, dim, dim, 2)
        self.dim = dim

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        return super().forward(box_position_embedding(boxes, self.dim // 2))
