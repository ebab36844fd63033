"""Point sampling for the mask costs and losses (PointRend, as used by Mask2Former and
MaskDINO): masks are compared at a set of points instead of at every pixel.

Coordinates are normalised (x, y) in [0, 1] of the map, pixel centres at (i + 0.5) / W.

Mask logits are dot products of mask embeddings with the mask features, and bilinear
sampling is linear in the map, so the logits of N masks at P points can be computed from
the D feature maps sampled at those points, without the (N, h, w) logits
(`mask_logits_at_points`). This holds at the borders too: a point's neighbours outside the
map count as zero, in the features as in the logits they would make.
"""

from typing import Optional

import torch
from torch.nn import functional as F

__all__ = ["point_sample", "uncertain_point_coords", "sample_channels", "mask_logits_at_points", "uniform_points"]


def uniform_points(count: int, num_points: int, device, dtype=torch.float32) -> torch.Tensor:
    """(count, num_points, 2) points drawn uniformly in [0, 1]^2 (every random point of the
    mask costs and losses is drawn here)."""
    return torch.rand(count, num_points, 2, device=device, dtype=dtype)


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of (R, 1, H, W) maps at (R, P, 2) points -> (R, P); zero outside."""
    grid = 2.0 * coords[:, :, None, :] - 1.0
    return F.grid_sample(maps, grid, align_corners=False)[:, 0, :, 0]


def sample_channels(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of every channel of (C, H, W) maps at (P, 2) points -> (C, P); zero outside."""
    grid = 2.0 * points[None, :, None, :].to(maps.dtype) - 1.0
    return F.grid_sample(maps[None], grid, align_corners=False)[0, :, :, 0]


def mask_logits_at_points(mask_embed: torch.Tensor, mask_features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Logits of the masks `mask_embed` (N, D) . `mask_features` (D, h, w) at (P, 2) points
    shared by all N masks -> (N, P); equal to point-sampling the (N, h, w) mask logits."""
    return mask_embed @ sample_channels(mask_features, points)


@torch.no_grad()
def uncertain_point_coords(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_ratio: float,
    frame: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Importance sampling of (R, 1, H, W) mask logits: of `num_points` points per map,
    a fraction `importance_ratio` are the most uncertain (logit closest to 0) among
    `oversample_ratio * num_points` uniform candidates, the rest uniform. Returns (R, P, 2).

    frame: optional (R, 2) (x, y) size of each map's image as a fraction of the map (a
    padding mask): the points are then drawn in the image, normalised by it (multiply by
    `frame` to sample the map)."""
    count = logits.shape[0]
    candidates = uniform_points(count, int(num_points * oversample_ratio), logits.device, logits.dtype)
    on_map = candidates if frame is None else candidates * frame[:, None, :].to(logits.dtype)
    uncertainty = -point_sample(logits, on_map).abs()
    num_uncertain = int(importance_ratio * num_points)
    index = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, index[..., None].expand(-1, -1, 2))
    uniform = uniform_points(count, num_points - num_uncertain, logits.device, logits.dtype)
    return torch.cat([chosen, uniform], dim=1)
