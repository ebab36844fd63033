"""Point sampling for the mask costs and losses (PointRend, as used by Mask2Former and
MaskDINO): masks are compared at a set of points instead of at every pixel.

Coordinates are normalised (x, y) in [0, 1] of the map, pixel centres at (i + 0.5) / W.
"""

import torch
from torch.nn import functional as F

__all__ = ["point_sample", "uncertain_point_coords"]


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of (R, 1, H, W) maps at (R, P, 2) points -> (R, P); zero outside."""
    grid = 2.0 * coords[:, :, None, :] - 1.0
    return F.grid_sample(maps, grid, align_corners=False)[:, 0, :, 0]


@torch.no_grad()
def uncertain_point_coords(
    logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_ratio: float
) -> torch.Tensor:
    """Importance sampling of (R, 1, H, W) mask logits: of `num_points` points per map,
    a fraction `importance_ratio` are the most uncertain (logit closest to 0) among
    `oversample_ratio * num_points` uniform candidates, the rest uniform. Returns (R, P, 2)."""
    count = logits.shape[0]
    candidates = torch.rand(count, int(num_points * oversample_ratio), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates).abs()
    num_uncertain = int(importance_ratio * num_points)
    index = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, index[..., None].expand(-1, -1, 2))
    uniform = torch.rand(count, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([chosen, uniform], dim=1)
