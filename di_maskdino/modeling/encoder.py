"""The MaskDINO encoder, DI-MaskDINO's "feature tokens extractor" (paper Sec. 3.1).

It turns backbone maps into the encoder tokens T_i and the 1/4-resolution mask features:

1. 1x1 conv + GroupNorm projections of the transformer inputs (res3..res5 by default) and
   3x3 stride-2 conv + GroupNorm for the extra levels (stride 64 by default);
2. `num_layers` deformable self-attention layers over all levels (with sine position and
   learned level embeddings);
3. an FPN step from the highest-resolution encoder level down to the finest backbone map
   (res2, stride 4), then a 1x1 conv: the mask features.

Shape glossary: B batch, C hidden dim, L levels, S tokens (sum of H_l * W_l).

NOTE: no padding mask is used; like the authors' release, padded pixels are treated as
image (valid ratios are 1), which keeps every level's reference grid the same.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..layers import FFN, ConvNormAct, DeformableAttentionBlock, MSDeformAttn, c2_xavier_fill, feature_map_position_embedding, xavier_init_matrices
from .geometry import level_start_index_of, pixel_centres

__all__ = ["MaskDINOEncoder", "EncoderOutput"]


@dataclass
class EncoderOutput:
    """features: L maps (B, C, H_l, W_l), highest resolution first (strides 8, 16, 32, 64
    by default); mask_features: (B, mask_dim, H/4, W/4)."""

    features: List[torch.Tensor]
    mask_features: torch.Tensor


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a feed-forward block (post-norm)."""

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = DeformableAttentionBlock(dim, num_levels, num_heads, num_points, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, tokens, pos, reference_points, spatial_shapes, level_start_index):
        tokens = self.self_attn(tokens, pos, reference_points, tokens, spatial_shapes, level_start_index)
        return self.ffn(tokens)


class MaskDINOEncoder(nn.Module):
    """
    Args:
        in_channels: channels of every backbone map, e.g. {"res2": 256, ..., "res5": 2048}.
        in_strides: stride of every backbone map.
        transformer_in_features: maps that enter the deformable encoder.
        hidden_dim: token width C.
        mask_dim: channels of the mask features.
        num_levels: levels in the encoder (the transformer inputs plus extra stride-2 levels).
        num_layers, num_heads, num_points, ffn_dim, dropout: deformable encoder layers.
        common_stride: stride of the mask features.
        num_groups: GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: Dict[str, int],
        in_strides: Dict[str, int],
        *,
        transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
        hidden_dim: int = 256,
        mask_dim: int = 256,
        num_levels: int = 4,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        common_stride: int = 4,
        num_groups: int = 32,
    ):
        super().__init__()
        missing = [f for f in transformer_in_features if f not in in_channels]
        if missing:
            raise ValueError(f"MaskDINOEncoder: transformer inputs {missing} are not backbone outputs ({sorted(in_channels)})")
        if num_levels < len(transformer_in_features):
            raise ValueError(
                f"MaskDINOEncoder: num_levels ({num_levels}) must be at least the number of transformer inputs "
                f"({len(transformer_in_features)})"
            )
        self.transformer_in_features = sorted(transformer_in_features, key=lambda f: in_strides[f])
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels

        projections = [
            nn.Sequential(nn.Conv2d(in_channels[f], hidden_dim, kernel_size=1), nn.GroupNorm(num_groups, hidden_dim))
            for f in self.transformer_in_features
        ]
        # NOTE: the first extra level starts from the widest transformer input (res5 for a
        # ResNet), each further one from the previous extra level.
        self.extra_level_source = max(self.transformer_in_features, key=lambda f: in_channels[f])
        channels = in_channels[self.extra_level_source]
        for _ in range(num_levels - len(self.transformer_in_features)):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(num_groups, hidden_dim)
                )
            )
            channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        self.layers = nn.ModuleList(
            EncoderLayer(hidden_dim, num_levels, num_heads, num_points, ffn_dim, dropout) for _ in range(num_layers)
        )

        # FPN from the finest encoder level (stride of the first transformer input) to common_stride.
        finest_stride = in_strides[self.transformer_in_features[0]]
        num_fpn_levels = max(int(math.log2(finest_stride) - math.log2(common_stride)), 1)
        by_stride = sorted(in_channels, key=lambda f: in_strides[f])
        self.fpn_in_features = by_stride[:num_fpn_levels][::-1]  # coarse to fine, e.g. ["res2"]
        self.lateral_convs = nn.ModuleList(
            ConvNormAct(in_channels[f], hidden_dim, 1, num_groups=num_groups, activation=False) for f in self.fpn_in_features
        )
        self.output_convs = nn.ModuleList(
            ConvNormAct(hidden_dim, hidden_dim, 3, num_groups=num_groups) for _ in self.fpn_in_features
        )
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        xavier_init_matrices(self.layers)
        for module in self.layers.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)
        c2_xavier_fill(self.mask_features)

    @staticmethod
    def reference_points(spatial_shapes: Sequence[Sequence[int]], num_levels: int, device: torch.device) -> torch.Tensor:
        """(1, S, L, 2): every token's pixel centre (x, y), normalised, repeated for every level."""
        points = torch.cat([pixel_centres(height, width, device) for height, width in spatial_shapes])
        return points[None, :, None, :].expand(1, -1, num_levels, 2)

    def forward(self, features: Dict[str, torch.Tensor]) -> EncoderOutput:
        device_type = next(iter(features.values())).device.type
        # NOTE: like the release, the encoder runs in float32 even under autocast.
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward(features)

    def _forward(self, features: Dict[str, torch.Tensor]) -> EncoderOutput:
        maps = [proj(features[f].float()) for proj, f in zip(self.input_proj, self.transformer_in_features)]
        previous = features[self.extra_level_source].float()
        for proj in self.input_proj[len(self.transformer_in_features) :]:
            previous = proj(previous)
            maps.append(previous)

        batch = maps[0].shape[0]
        shapes = [tuple(m.shape[-2:]) for m in maps]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # (B, S, C)
        pos = torch.cat(
            [
                feature_map_position_embedding(batch, h, w, self.hidden_dim, m.device).flatten(2).transpose(1, 2)
                + self.level_embed[level]
                for level, (m, (h, w)) in enumerate(zip(maps, shapes))
            ],
            dim=1,
        )
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=tokens.device)
        level_start_index = level_start_index_of(spatial_shapes)
        reference = self.reference_points(shapes, self.num_levels, tokens.device).expand(batch, -1, -1, -1)
        for layer in self.layers:
            tokens = layer(tokens, pos, reference, spatial_shapes, level_start_index)

        sizes = [h * w for h, w in shapes]
        encoded = [
            t.transpose(1, 2).reshape(batch, self.hidden_dim, h, w) for t, (h, w) in zip(tokens.split(sizes, dim=1), shapes)
        ]
        fused = encoded[0]
        for feature, lateral, output in zip(self.fpn_in_features, self.lateral_convs, self.output_convs):
            lateral_map = lateral(features[feature].float())
            fused = output(lateral_map + F.interpolate(fused, size=lateral_map.shape[-2:], mode="bilinear", align_corners=False))
        return EncoderOutput(features=encoded, mask_features=self.mask_features(fused))
