"""The MaskDINO encoder, DI-MaskDINO's feature tokens extractor (paper Sec. 3.2.1).

It turns backbone maps into the encoder tokens T_i and the 1/4-resolution mask features:

1. 1x1 conv + norm projections of the transformer inputs (res3..res5 by default) and 3x3
   stride-2 conv + norm for the extra levels (stride 64 by default);
2. `num_layers` deformable self-attention layers over all levels (with sine position and
   learned level embeddings);
3. an FPN step from the highest-resolution encoder level down to the finest backbone map
   (res2, stride 4), then a 1x1 conv: the mask features (not built for a detection-only
   model, `mask_dim=None`).

Shape glossary: B batch, C hidden dim, L levels, S tokens (sum of H_l * W_l).

NOTE: by default no padding mask is used; like the authors' release, padded pixels are
treated as image (valid ratios are 1). With an `ImagePadding` (`padding.py`), the padded
region is invisible to the image's tokens and mask features.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Type

import torch
from torch import nn

from ..layers import (
    FFN,
    ConvNormAct,
    DeformableAttentionBlock,
    MSDeformAttn,
    NormLayer,
    at_least_float32,
    c2_xavier_fill,
    checkpointed,
    group_norm,
    xavier_init_matrices,
)
from .feature_tokens import FeatureTokens
from .padding import ImagePadding, upsample_within

__all__ = ["MaskDINOEncoder", "EncoderOutput", "EncoderLayer"]


@dataclass
class EncoderOutput:
    """features: L maps (B, C, H_l, W_l), highest resolution first (strides 8, 16, 32, 64
    by default); mask_features: (B, mask_dim, H/4, W/4), or None (detection only), zero
    outside the images with a padding; padding: the images' valid regions, or None."""

    features: List[torch.Tensor]
    mask_features: Optional[torch.Tensor]
    padding: Optional[ImagePadding] = None


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a feed-forward block (post-norm)."""

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = DeformableAttentionBlock(dim, num_levels, num_heads, num_points, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(
        self, tokens, pos, reference_points, spatial_shapes, level_start_index, level_sizes=None, padding_mask=None
    ):
        tokens = self.self_attn(
            tokens,
            pos,
            reference_points,
            tokens,
            spatial_shapes,
            level_start_index,
            level_sizes=level_sizes,
            value_padding_mask=padding_mask,
        )
        return self.ffn(tokens)


class MaskDINOEncoder(nn.Module):
    """
    Args:
        in_channels: channels of every backbone map, e.g. {"res2": 256, ..., "res5": 2048}.
        in_strides: stride of every backbone map.
        transformer_in_features: maps that enter the deformable encoder.
        hidden_dim: token width C.
        mask_dim: channels of the mask features; None builds no mask-feature part (a
            detection-only model).
        num_levels: levels in the encoder (the transformer inputs plus extra stride-2 levels).
        num_layers, num_heads, num_points, ffn_dim, dropout: deformable encoder layers.
        common_stride: stride of the mask features.
        norm_layer: channels -> norm module of the projections and FPN convolutions
            (default GroupNorm with 32 groups).
        act_layer: activation of the FPN output convolutions.
        grad_checkpointing: run each deformable encoder layer, and the FPN that makes the
            mask features, under activation checkpointing in training (their activations are
            recomputed in backward instead of kept).
    """

    def __init__(
        self,
        in_channels: Dict[str, int],
        in_strides: Dict[str, int],
        *,
        transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
        hidden_dim: int = 256,
        mask_dim: Optional[int] = 256,
        num_levels: int = 4,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        common_stride: int = 4,
        norm_layer: Optional[NormLayer] = None,
        act_layer: Type[nn.Module] = nn.ReLU,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        missing = [f for f in transformer_in_features if f not in in_channels]
        if missing:
            raise ValueError(
                f"MaskDINOEncoder: transformer inputs {missing} are not backbone outputs ({sorted(in_channels)})"
            )
        if num_levels < len(transformer_in_features):
            raise ValueError(
                f"MaskDINOEncoder: num_levels ({num_levels}) must be at least the number of transformer inputs "
                f"({len(transformer_in_features)})"
            )
        self.transformer_in_features = sorted(transformer_in_features, key=lambda f: in_strides[f])
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels
        norm_layer = norm_layer if norm_layer is not None else group_norm(32)
        # NOTE: the first extra level starts from the widest transformer input (res5 for a
        # ResNet), of equally wide ones the coarsest (p5 of a feature pyramid, whose maps all
        # have one width; MaskDINO picks the same), each further one from the previous extra level.
        self.extra_level_source = max(self.transformer_in_features, key=lambda f: (in_channels[f], in_strides[f]))
        # the stride of the coarsest map the backbone and the encoder make
        extra_levels = num_levels - len(self.transformer_in_features)
        self.coarsest_stride = max(max(in_strides.values()), in_strides[self.extra_level_source] * 2**extra_levels)
        self.input_proj = self._input_projections(in_channels, norm_layer)
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        self.layers = nn.ModuleList(
            EncoderLayer(hidden_dim, num_levels, num_heads, num_points, ffn_dim, dropout) for _ in range(num_layers)
        )

        # FPN from the finest encoder level (stride of the first transformer input) to common_stride.
        finest_stride = in_strides[self.transformer_in_features[0]]
        num_fpn_levels = max(int(math.log2(finest_stride) - math.log2(common_stride)), 1)
        by_stride = sorted(in_channels, key=lambda f: in_strides[f])
        self.fpn_in_features = by_stride[:num_fpn_levels][::-1] if mask_dim is not None else []  # e.g. ["res2"]
        self.lateral_convs = nn.ModuleList(
            ConvNormAct(in_channels[f], hidden_dim, 1, norm_layer=norm_layer) for f in self.fpn_in_features
        )
        self.output_convs = nn.ModuleList(
            ConvNormAct(hidden_dim, hidden_dim, 3, norm_layer=norm_layer, act_layer=act_layer)
            for _ in self.fpn_in_features
        )
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim, kernel_size=1) if mask_dim is not None else None
        self.reset_parameters()

    def _input_projections(self, in_channels: Dict[str, int], norm_layer: NormLayer) -> nn.ModuleList:
        """1x1 conv + norm of every transformer input, then 3x3 stride-2 conv + norm for each
        extra level."""
        dim = self.hidden_dim
        projections = [
            nn.Sequential(nn.Conv2d(in_channels[f], dim, kernel_size=1), norm_layer(dim))
            for f in self.transformer_in_features
        ]
        channels = in_channels[self.extra_level_source]
        for _ in range(self.num_levels - len(self.transformer_in_features)):
            projections.append(
                nn.Sequential(nn.Conv2d(channels, dim, kernel_size=3, stride=2, padding=1), norm_layer(dim))
            )
            channels = dim
        return nn.ModuleList(projections)

    def reset_parameters(self) -> None:
        xavier_init_matrices(self.layers)
        for module in self.layers.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)
        if self.mask_features is not None:
            c2_xavier_fill(self.mask_features)

    def forward(self, features: Dict[str, torch.Tensor], padding: Optional[ImagePadding] = None) -> EncoderOutput:
        """features: the backbone maps; padding: the images' valid regions (the padding mask),
        or None. With a padding, the encoder's convolutions and norms must run under the
        padding's hooks (`DIMaskDINO` registers them; `ImagePadding.masking` for an encoder on
        its own)."""
        device_type = next(iter(features.values())).device.type
        # NOTE: like the release, the encoder runs in float32 even under autocast.
        with torch.autocast(device_type=device_type, enabled=False):
            encoded = self.encode(features, padding)
            mask_features = (
                checkpointed(self.grad_checkpointing, self.mask_feature_map, encoded[0], features, padding)
                if self.predicts_masks
                else None
            )
            return EncoderOutput(features=encoded, mask_features=mask_features, padding=padding)

    @property
    def predicts_masks(self) -> bool:
        return self.mask_features is not None

    def input_levels(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """The L projected input maps (B, C, H_l, W_l), highest resolution first."""
        maps = [proj(at_least_float32(features[f])) for proj, f in zip(self.input_proj, self.transformer_in_features)]
        previous = at_least_float32(features[self.extra_level_source])
        for proj in self.input_proj[len(self.transformer_in_features) :]:
            previous = proj(previous)
            maps.append(previous)
        return maps

    def encode(self, features: Dict[str, torch.Tensor], padding: Optional[ImagePadding] = None) -> List[torch.Tensor]:
        """Deformable self-attention over the levels: T_i as L maps (B, C, H_l, W_l)."""
        levels = FeatureTokens.from_maps(self.input_levels(features), padding)
        level_pos = torch.cat([self.level_embed[level].expand(size, -1) for level, size in enumerate(levels.sizes)])
        pos = levels.pos + level_pos
        reference = levels.reference_points().expand(levels.tokens.shape[0], -1, -1, -1)
        tokens = levels.tokens
        for layer in self.layers:
            tokens = checkpointed(
                self.grad_checkpointing,
                layer,
                tokens,
                pos,
                reference,
                levels.spatial_shapes,
                levels.level_start_index,
                levels.level_sizes,
                levels.padding_mask,
            )
        return levels.level_maps(tokens)

    def mask_feature_map(
        self, finest_encoded: torch.Tensor, features: Dict[str, torch.Tensor], padding: Optional[ImagePadding] = None
    ) -> torch.Tensor:
        """FPN from the finest encoded level down to the common stride, then the 1x1 conv.

        With a padding, the coarser map is upsampled from its valid cells only (its edge
        repeated beyond them) and the sum is zero outside the images, as if each image were
        alone on a canvas of its own size."""
        fused = finest_encoded
        for feature, lateral, output in zip(self.fpn_in_features, self.lateral_convs, self.output_convs):
            lateral_map = lateral(at_least_float32(features[feature]))
            upsampled = upsample_within(fused, lateral_map.shape[-2:], padding)
            fused = output(lateral_map + upsampled)
        return self.mask_features(fused)
