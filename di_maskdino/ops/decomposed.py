"""Multi-scale deformable attention from standard gather and arithmetic operators, for
export to runtimes that do not know our operator (ONNX; `di_maskdino.export`).

The bilinear sampling is written out: per level and sample, the four neighbouring pixels
are gathered from the flattened values by index and weighted, pixels outside the map
contributing zero. It avoids `grid_sample`, which some runtimes mis-compile, and shapes
never depend on the values of `spatial_shapes` (the level sizes are read as tensors), so a
dynamic-shape export keeps the image size free.

Shapes are those of :func:`di_maskdino.ops.ms_deform_attn`.
"""

import torch

__all__ = ["ms_deform_attn_gather"]


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by explicit bilinear gathers.

    Sampling rule (as the kernels): location (x, y) in [0, 1] of level l samples pixel
    coordinates (x * W_l - 0.5, y * H_l - 0.5), pixel centres at integers, zeros outside.

    Returns:
        (B, Q, heads * C_h) tensor.
    """
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    # (B, S, heads, C_h) -> rows of (B * heads * S, C_h): row (b * heads + h) * S + s
    rows = value.permute(0, 2, 1, 3).reshape(-1, channels)
    # (B, heads, 1) offset of each (image, head) block of rows
    block = (torch.arange(batch * heads, device=value.device) * tokens).view(batch, 1, heads, 1)
    output = value.new_zeros(batch, queries, heads, channels)
    shapes = spatial_shapes.to(sampling_locations.dtype)
    for level in range(levels):
        height_f, width_f = shapes[level, 0], shapes[level, 1]
        height, width = spatial_shapes[level, 0], spatial_shapes[level, 1]
        x = sampling_locations[:, :, :, level, :, 0] * width_f - 0.5  # (B, Q, heads, P)
        y = sampling_locations[:, :, :, level, :, 1] * height_f - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        x0, y0 = x0.long(), y0.long()
        weight = attention_weights[:, :, :, level]  # (B, Q, heads, P)
        start = level_start_index[level] + block
        for dy in (0, 1):
            yi = y0 + dy
            wy = fy if dy else 1 - fy
            for dx in (0, 1):
                xi = x0 + dx
                wx = fx if dx else 1 - fx
                inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                index = start + yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
                corner_weight = torch.where(inside, wx * wy * weight, 0.0)  # (B, Q, heads, P)
                sampled = rows.index_select(0, index.reshape(-1)).view(batch, queries, heads, points, channels)
                output = output + (sampled * corner_weight[..., None]).sum(3)
    return output.reshape(batch, queries, heads * channels)
