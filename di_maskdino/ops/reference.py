"""Pure-PyTorch multi-scale deformable attention, built on `torch.nn.functional.grid_sample`.

It is the test oracle of the compiled kernels and the fallback when they are not built.
Shapes are those of :func:`di_maskdino.ops.ms_deform_attn`. The levels are processed one at
a time, so the largest intermediate is (B * heads, C_h, Q, P) for a single level.
"""

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_reference"]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by bilinear `grid_sample` on every level.

    grid_sample(align_corners=False, padding_mode="zeros") with grid = 2 * location - 1 is
    exactly the sampling rule of the kernels: pixel centres at half-integers, zero outside.

    Returns:
        (B, Q, heads * C_h) tensor.
    """
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    output = value.new_zeros(batch * heads, channels, queries)
    for level in range(levels):
        height, width = shapes[level]
        start = starts[level]
        # (B, H_l * W_l, heads, C_h) -> (B * heads, C_h, H_l, W_l)
        value_l = value[:, start : start + height * width]
        value_l = value_l.permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
        # (B, Q, heads, P, 2) -> (B * heads, Q, P, 2) in grid_sample's [-1, 1] convention
        grid = 2 * sampling_locations[:, :, :, level] - 1
        grid = grid.transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled = F.grid_sample(value_l, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # (B, Q, heads, P) -> (B * heads, 1, Q, P)
        weights = attention_weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, 1, queries, points)
        output = output + (sampled * weights).sum(-1)
    # (B * heads, C_h, Q) -> (B, Q, heads * C_h)
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()
