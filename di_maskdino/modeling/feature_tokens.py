"""Feature tokens: multi-level feature maps flattened into one token sequence, with the
bookkeeping of their levels (paper Sec. 3.2.1: the encoder's output, T_i).

Shape glossary: B batch, C channels, L levels, S tokens (sum over levels of H_l * W_l).
"""

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch

from ..layers import feature_map_position_embedding
from .padding import ImagePadding

__all__ = ["FeatureTokens", "pixel_centres", "level_start_index_of", "shapes_tensor", "level_sizes_tensor"]


def pixel_centres(height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H * W, 2) normalised (x, y) centres of an H x W map's pixels, row by row."""
    y = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    x = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


def shapes_tensor(
    shapes: Sequence[Tuple[int, int]], device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """(L, 2) tensor of L (H_l, W_l) pairs (int64 by default).

    Built element by element rather than with `torch.as_tensor`, which would freeze the
    sizes of a dynamic-shape `torch.export` into constants."""
    return torch.stack(
        [torch.stack([torch.full((), size, dtype=dtype, device=device) for size in shape]) for shape in shapes]
    )


def level_sizes_tensor(shapes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(L, 2) float32 tensor of the L levels' (W_l, H_l), which deformable attention divides
    pixel offsets by.

    Made from the sizes themselves rather than by converting `shapes_tensor`'s int64 tensor:
    under `torch.compile` this is one small float buffer that every encoder layer reads,
    where a conversion would be inlined into each layer's kernel as an int64 gather, which
    Inductor vectorises badly (about 30 ms per layer at 800 x 1333 on a CPU)."""
    return shapes_tensor([(width, height) for height, width in shapes], device, torch.float32)


def level_start_index_of(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(L, 2) level sizes -> (L,) index of every level's first token."""
    sizes = spatial_shapes.prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


@dataclass
class FeatureTokens:
    """Tokens of L feature levels, flattened level by level (row-major within a level).

    tokens: (B, S, C); pos: (B, S, C) sine positions of the tokens' pixels;
    spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64;
    level_sizes: (L, 2) float32 (W_l, H_l) (`level_sizes_tensor`);
    shapes: the same (H_l, W_l) as Python ints (symbolic ints under `torch.export`, which
    is why they are never converted with `int()`).
    padding: the images' valid regions, or None (the padded region counts as image, as in
    the release). With it, `padding_mask` (B, S) marks the padded tokens, `valid_ratios`
    (B, L, 2) places points and boxes normalised by the images on the maps, and the sine
    positions count the valid tokens only.
    """

    tokens: torch.Tensor
    pos: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    level_sizes: torch.Tensor
    shapes: List[Tuple[int, int]]
    padding: Optional[ImagePadding] = None
    padding_mask: Optional[torch.Tensor] = None
    valid_ratios: Optional[torch.Tensor] = None

    @classmethod
    def from_maps(cls, maps: Sequence[torch.Tensor], padding: Optional[ImagePadding] = None) -> "FeatureTokens":
        """Flattens L maps (B, C, H_l, W_l), in the given order, with their sine positions
        (counted over the valid cells with `padding`)."""
        batch, channels = maps[0].shape[:2]
        shapes = [(m.shape[-2], m.shape[-1]) for m in maps]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        pos = torch.cat(
            [
                feature_map_position_embedding(
                    batch, h, w, channels, tokens.device, None if padding is None else padding.extents((h, w))
                )
                .flatten(2)
                .transpose(1, 2)
                for h, w in shapes
            ],
            dim=1,
        )
        spatial_shapes = shapes_tensor(shapes, tokens.device)
        return cls(
            tokens,
            pos,
            spatial_shapes,
            level_start_index_of(spatial_shapes),
            level_sizes_tensor(shapes, tokens.device),
            shapes,
            padding,
            None if padding is None else padding.token_padding_mask(shapes),
            None if padding is None else padding.valid_ratios(shapes, tokens.dtype),
        )

    @property
    def sizes(self) -> List[int]:
        """Tokens per level."""
        return [h * w for h, w in self.shapes]

    def with_tokens(self, tokens: torch.Tensor) -> "FeatureTokens":
        """The same levels and positions holding other tokens (e.g. T_bal instead of T_i)."""
        return replace(self, tokens=tokens)

    def level_maps(self, tokens: torch.Tensor = None) -> List[torch.Tensor]:
        """`tokens` (default: self.tokens) (B, S, C) back to L maps (B, C, H_l, W_l)."""
        tokens = self.tokens if tokens is None else tokens
        batch = tokens.shape[0]
        return [
            t.transpose(1, 2).reshape(batch, -1, h, w)
            for t, (h, w) in zip(tokens.split(self.sizes, dim=1), self.shapes)
        ]

    def finest_level(self) -> int:
        """Index of the level with the most tokens."""
        return max(range(len(self.shapes)), key=lambda i: self.sizes[i])

    def reference_points(self) -> torch.Tensor:
        """(1, S, L, 2): every token's pixel centre (x, y), normalised, repeated for every
        level (the reference points of deformable self-attention over all levels); with a
        padding, (B, S, L, 2): the centre in the image frame placed on every level by its
        valid ratio (Deformable-DETR)."""
        centres = self.image_frame_centres()
        if self.valid_ratios is None:
            return centres[:, :, None, :].expand(1, -1, len(self.shapes), 2)
        return centres[:, :, None, :] * self.valid_ratios[:, None, :, :]

    def box_references(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, N, 4) normalised cxcywh boxes -> (B, N, L, 4) reference boxes of the L levels
        (the same boxes, placed by the valid ratios with a padding)."""
        references = boxes[:, :, None].expand(-1, -1, len(self.shapes), -1)
        if self.valid_ratios is None:
            return references
        return references * self.valid_ratios.repeat(1, 1, 2)[:, None].to(boxes.dtype)

    def image_frame_centres(self) -> torch.Tensor:
        """(1 or B, S, 2) every token's pixel centre normalised by the map (no padding) or by
        the image (with a padding: beyond 1 for the padded tokens)."""
        if self.valid_ratios is None:
            return torch.cat([pixel_centres(h, w, self.tokens.device) for h, w in self.shapes])[None]
        ratios = self.valid_ratios
        points = torch.cat([pixel_centres(h, w, ratios.device, ratios.dtype) for h, w in self.shapes])[None]
        own = torch.cat([ratios[:, level, None].expand(-1, h * w, -1) for level, (h, w) in enumerate(self.shapes)], 1)
        return points / own
