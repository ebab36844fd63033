"""The multi-scale deformable attention layer of Deformable-DETR (Zhu et al. 2021).

Each query predicts, per head, P sampling offsets on each of L feature levels around its
reference point and a softmax weight per sample; the output is the weighted sum of the
bilinearly sampled values (:func:`di_maskdino.ops.ms_deform_attn`).

Shape glossary: B batch, Q queries, S value tokens (sum of H_l * W_l), D model width,
L levels, P points, heads attention heads.
"""

import math
from typing import Optional

import torch
from torch import nn

from ..ops import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the parameter names of the released
    MaskDINO / DI-MaskDINO checkpoints (`sampling_offsets`, `attention_weights`,
    `value_proj`, `output_proj`).

    Args:
        embed_dim: model width D.
        num_levels: feature levels L.
        num_heads: attention heads; must divide `embed_dim`.
        num_points: sampling points P per level and head.
    """

    def __init__(self, embed_dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"MSDeformAttn: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_levels, self.num_heads, self.num_points = embed_dim, num_levels, num_heads, num_points
        samples = num_heads * num_levels * num_points  # per query
        # per sample: an (x, y) offset and an attention logit
        self.sampling_offsets, self.attention_weights = nn.Linear(embed_dim, 2 * samples), nn.Linear(embed_dim, samples)
        self.value_proj, self.output_proj = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR's initialisation: at start every head looks in its own direction
        (angles 2*pi*h/heads, on the square of radius 1), point p at distance p + 1 pixels,
        with uniform attention over all samples."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float64) * (2 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().amax(dim=-1, keepdim=True)
        distance = torch.arange(1, self.num_points + 1, dtype=torch.float64)
        offsets = directions[:, None, None, :] * distance[None, None, :, None]
        offsets = offsets.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor] = None,
        level_sizes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Q, D) queries (with their positional embedding already added).
            reference_points: (B, Q, L, 2) normalised (x, y) points, offsets then count in
                pixels of each level; or (B, Q, L, 4) normalised boxes (cx, cy, w, h),
                offsets then scale with the box size.
            value: (B, S, D) flattened multi-level features.
            spatial_shapes: (L, 2) int64 (H_l, W_l).
            level_start_index: (L,) int64.
            value_padding_mask: optional (B, S) bool, True where a value token is padding.
            level_sizes: optional (L, 2) (W_l, H_l), floating or integer: `spatial_shapes`
                flipped, which point offsets are divided by; made from `spatial_shapes` if not
                given. Callers that run several layers on the same levels build it once (see
                `FeatureTokens.level_sizes`) and must keep it equal to `spatial_shapes`.

        Returns:
            (B, Q, D) tensor.
        """
        batch, queries, _ = query.shape
        tokens = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if reference_points.shape[:3] != (batch, queries, levels) or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"MSDeformAttn: reference_points must be (B, Q, L, 2) or (B, Q, L, 4) with "
                f"(B, Q, L) = {(batch, queries, levels)}, got {tuple(reference_points.shape)}"
            )
        projected = self.value_proj(value)
        if value_padding_mask is not None:
            projected = projected.masked_fill(value_padding_mask[..., None], 0.0)
        projected = projected.view(batch, tokens, heads, self.embed_dim // heads)

        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        reference = reference_points[:, :, None, :, None, :]  # (B, Q, 1, L, 1, 2 or 4)
        if reference_points.shape[-1] == 2:
            if level_sizes is None:
                level_sizes = spatial_shapes.flip(-1)
            locations = self.point_locations(reference, offsets, level_sizes)
        else:
            locations = reference[..., :2] + offsets / points * reference[..., 2:] * 0.5
        output = ms_deform_attn(projected, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)

    @staticmethod
    def point_locations(reference: torch.Tensor, offsets: torch.Tensor, level_sizes: torch.Tensor) -> torch.Tensor:
        """reference (B, Q, 1, L, 1, 2) normalised points + offsets (B, Q, heads, L, P, 2) in
        pixels of each level / level_sizes (L, 2) as (W_l, H_l) -> (B, Q, heads, L, P, 2)
        normalised sampling locations.

        The same additions and divisions as broadcasting over the 6-d offsets, computed on
        rows of L * P * 2 numbers: with a last dimension of 2, PyTorch's elementwise loops
        and Inductor's generated code are scalar (at 800 x 1333, about 40 ms instead of 5 per
        encoder layer in eager)."""
        batch, queries, heads, levels, points, _ = offsets.shape
        row = levels * points * 2
        size = level_sizes.to(offsets.dtype)[:, None, :].expand(levels, points, 2).reshape(row)
        reference = reference.expand(batch, queries, 1, levels, points, 2).reshape(batch, queries, 1, row)
        return (reference + offsets.reshape(batch, queries, heads, row) / size).view(offsets.shape)
