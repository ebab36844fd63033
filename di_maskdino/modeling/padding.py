"""Padding masks: predictions of an image that do not depend on the rest of its batch.

Images of a batch are padded at the bottom / right to one canvas. Without a padding mask
(the release's behaviour) the padded region takes part in the network, so an image's
predictions change with the size of its neighbours. `ImagePadding` describes which part
of every feature map is image and makes that part independent of the canvas:

- convolutions and norms (hooks installed by `ImagePadding.masking`, on the backbone and on
  the model's own convolutions): GroupNorm statistics span the valid region only, and
  every convolution / norm output is zero outside it, so that a convolution at the image
  edge reads zeros beyond it whatever the canvas;
- bilinear upsampling reads the valid edge beyond it (`replicate_edges`), as it would at
  the border of a canvas that ends there;
- deformable attention zeroes padded value tokens and places its sampling points with
  valid ratios (`FeatureTokens`); sine positions count the valid tokens only;
- boxes are normalised by the image size, not by the canvas ("image frame").

Feature map sizes: a map at stride s of a canvas H x W (a multiple of the largest stride
up to 32) is ceil(H / s) x ceil(W / s); of an image h x w, its first ceil(h / s) x
ceil(w / s) cells are valid. The stride of a map is read from its size (`map_stride`).

Shape glossary: B batch, C channels, H x W canvas, h_l x w_l a feature map, L levels.
"""

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ImagePadding",
    "map_stride",
    "check_padding_mask_support",
    "check_batch_statistics",
    "masked_group_norm",
    "upsample_within",
]

# leaf modules a backbone may hold under a padding mask besides convolutions and norms (their
# outputs are zeroed outside the image; GroupNorm takes valid-region statistics): activations
# that keep zero at zero, dropout, and max pooling (of such activations: zero padding and the
# canvas border then give the same maxima)
_PADDING_SAFE_LEAVES = (nn.ReLU, nn.ReLU6, nn.Identity, nn.MaxPool2d, nn.Dropout)


BATCH_STATISTICS_ERROR = (
    "padding mask: BatchNorm in training takes its statistics over the padded batch; use frozen BatchNorm or "
    "GroupNorm (detectron2: MODEL.RESNETS.NORM 'FrozenBN' or 'GN')"
)


def check_batch_statistics(backbone: nn.Module) -> None:
    """Refuses a backbone whose BatchNorm layers train (their statistics span the padding)."""
    if any(_tracks_batch_statistics(m) for m in backbone.modules()):
        raise ValueError(BATCH_STATISTICS_ERROR)


def upsample_within(x: torch.Tensor, size, padding: Optional["ImagePadding"]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) maps to `size`; with a padding, from the images' cells
    only (edges repeated beyond them), by the ratio of the two maps' strides (a canvas whose
    maps do not halve exactly, e.g. one that ends with an image, samples where a larger one
    does), and zero outside the images at the new size."""
    if padding is None:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    (in_y, in_x), (out_y, out_x) = padding.strides(x.shape[-2:]), padding.strides(size)
    resized = F.interpolate(
        padding.replicate_edges(x), scale_factor=(in_y // out_y, in_x // out_x), mode="bilinear", align_corners=False
    )
    return padding.zero_padding(resized[..., : size[0], : size[1]])


def map_stride(size: int, canvas: int) -> int:
    """The stride s (a power of two) of a map `size` cells long on a canvas `canvas` pixels
    long: the smallest s with ceil(canvas / s) == size."""
    stride = 1
    while -(-canvas // stride) > size:
        stride *= 2
    if -(-canvas // stride) != size:
        raise ValueError(
            f"padding mask: a feature map {size} cells long on a canvas of {canvas} pixels is not at a power-of-two "
            "stride; pad the batch to a multiple of the backbone's largest stride (SIZE_DIVISIBILITY)"
        )
    return stride


def _is_per_channel_norm(module: nn.Module) -> bool:
    # NOTE: detectron2's and torchvision's FrozenBatchNorm2d (per-channel affine maps) are
    # recognised by name, so that the model core needs neither; BatchNorm by torch's base class
    # of its BatchNorm layers (tests/modeling/test_padding.py builds both kinds).
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).__name__ == "FrozenBatchNorm2d"


def _tracks_batch_statistics(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training


def check_padding_mask_support(backbone: nn.Module) -> None:
    """Refuses a backbone the padding mask cannot make independent of the canvas: one with
    layers that mix positions other than convolutions, GroupNorm and max pooling (attention,
    LayerNorm over tokens, pooling over the map: Swin, ViT, squeeze-excitation)."""
    unsupported = sorted(
        {
            type(m).__name__
            for m in backbone.modules()
            if not any(True for _ in m.children())
            and not isinstance(m, (nn.Conv2d, nn.GroupNorm) + _PADDING_SAFE_LEAVES)
            and not _is_per_channel_norm(m)
        }
    )
    if unsupported:
        raise ValueError(
            f"the padding mask (MODEL.DI_MASKDINO.PADDING_MASK) supports convolutional backbones (ResNets); "
            f"{type(backbone).__name__} holds {unsupported}, which would read the padded region; turn the padding "
            "mask off for this backbone"
        )


def masked_group_norm(norm: nn.GroupNorm, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GroupNorm of (B, C, h, w) maps with the statistics of the valid cells (`valid`
    (B, 1, h, w), 1 or 0) only; zero outside them."""
    batch, channels, height, width = x.shape
    dtype = x.dtype
    # statistics in float32 at least (under autocast the input can be float16, whose squares
    # overflow), as torch's GroupNorm takes them
    x = x.to(torch.promote_types(dtype, torch.float32))
    groups = norm.num_groups
    grouped = x.reshape(batch, groups, channels // groups, height * width)
    weight = valid.reshape(batch, 1, 1, height * width).to(x.dtype)
    count = weight.sum(-1, keepdim=True) * (channels // groups)
    mean = (grouped * weight).sum((-2, -1), keepdim=True) / count
    spread = torch.linalg.vector_norm((grouped - mean) * weight, dim=(-2, -1), keepdim=True)
    inverse_std = torch.rsqrt(spread * spread / count + norm.eps)  # (B, G, 1, 1)
    # per image and channel: y = x * scale + shift on the valid cells
    scale = inverse_std.expand(-1, -1, channels // groups, -1).reshape(batch, channels)
    shift = -mean.expand(-1, -1, channels // groups, -1).reshape(batch, channels) * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    normed = torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])
    return (normed * valid.to(x.dtype)).to(dtype)


class ImagePadding:
    """The valid region of every image of a padded batch.

    Args:
        image_sizes: (B, 2) int64 (h, w) of the images before padding.
        canvas: (H, W) of the padded batch.
        host_sizes: the image sizes as (h, w) ints, where they are known without reading the
            device (`DIMaskDINO.detect` then runs a single image on its own canvas).
    """

    def __init__(
        self,
        image_sizes: torch.Tensor,
        canvas: Tuple[int, int],
        host_sizes: Optional[List[Tuple[int, int]]] = None,
    ):
        if image_sizes.dim() != 2 or image_sizes.shape[1] != 2:
            raise ValueError(f"ImagePadding: image sizes must be (B, 2) (h, w), got {tuple(image_sizes.shape)}")
        self.image_sizes = image_sizes.long()
        self.canvas = (canvas[0], canvas[1])
        self.host_sizes = host_sizes  # the same sizes as Python ints, where known without a sync
        self._valid: Dict[tuple, torch.Tensor] = {}

    @classmethod
    def of(cls, sizes: Sequence[Tuple[int, int]], canvas: Tuple[int, int], device: torch.device) -> "ImagePadding":
        """From a list of (h, w)."""
        return cls(torch.tensor([list(s) for s in sizes], dtype=torch.long, device=device), canvas)

    def map_shape(self, shape: Tuple[int, int], canvas: Tuple[int, int]) -> Tuple[int, int]:
        """The size, on a canvas of size `canvas`, of the map whose size is `shape` here."""
        s_y, s_x = self.strides(shape)
        return -(-canvas[0] // s_y), -(-canvas[1] // s_x)

    def strides(self, shape: Tuple[int, int]) -> Tuple[int, int]:
        """(s_y, s_x) of a map of size `shape` (h_l, w_l)."""
        return map_stride(shape[0], self.canvas[0]), map_stride(shape[1], self.canvas[1])

    def extents(self, shape: Tuple[int, int]) -> torch.Tensor:
        """(B, 2) valid (rows, columns) of every image in a map of size `shape`."""
        stride = self.image_sizes.new_tensor(self.strides(shape))
        return torch.div(self.image_sizes + stride - 1, stride, rounding_mode="floor")

    def valid(self, shape: Tuple[int, int]) -> torch.Tensor:
        """(B, 1, h_l, w_l) bool, True on the image's cells of a map of size `shape`."""
        key = (shape[0], shape[1])
        symbolic = not all(isinstance(size, int) for size in key)  # traced by torch.export: no cache
        if symbolic or key not in self._valid:
            extents = self.extents(key)
            rows = torch.arange(key[0], device=extents.device)[None, :] < extents[:, :1]
            cols = torch.arange(key[1], device=extents.device)[None, :] < extents[:, 1:]
            valid = (rows[:, :, None] & cols[:, None, :])[:, None]
            if symbolic:
                return valid
            self._valid[key] = valid
        return self._valid[key]

    def valid_as(self, shape: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """`valid` as 1 / 0 of `dtype` (cached like it)."""
        key = (shape[0], shape[1], dtype)
        if not all(isinstance(size, int) for size in shape):
            return self.valid(shape).to(dtype)
        if key not in self._valid:
            self._valid[key] = self.valid(shape).to(dtype)
        return self._valid[key]

    def zero_padding(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h_l, w_l) maps with zeros outside the images."""
        return x * self.valid_as(x.shape[-2:], x.dtype)

    def token_padding_mask(self, shapes: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """(B, S) bool, True for the padded tokens of L maps of sizes `shapes` flattened
        level by level."""
        return torch.cat([~self.valid(shape).flatten(1) for shape in shapes], dim=1)

    def frame_scale(self, shape: Tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 2) (x, y) size of the image in a map of size `shape`, as a fraction of the map:
        a point normalised by the image (the image frame) times this is normalised by the
        map. Deformable-DETR's valid ratios, exact rather than counted in cells."""
        s_y, s_x = self.strides(shape)
        sizes = self.image_sizes.to(dtype)
        return torch.stack([sizes[:, 1] / (s_x * shape[1]), sizes[:, 0] / (s_y * shape[0])], dim=-1)

    def valid_ratios(self, shapes: Sequence[Tuple[int, int]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, L, 2) `frame_scale` of every level."""
        return torch.stack([self.frame_scale(shape, dtype) for shape in shapes], dim=1)

    def canvas_frame_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, N, 4) cxcywh boxes normalised by the images -> normalised by the canvas."""
        scale = self.frame_scale(self.canvas, boxes.dtype)
        return boxes * scale.repeat(1, 2)[:, None, :]

    def replicate_edges(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h_l, w_l) maps whose cells beyond the image repeat its last row / column,
        so that bilinear resampling reads there what it reads at the border of a map that
        ends with the image."""
        height, width = x.shape[-2:]
        extents = self.extents((height, width))
        rows = torch.minimum(torch.arange(height, device=x.device)[None, :], extents[:, :1] - 1)  # (B, h_l)
        cols = torch.minimum(torch.arange(width, device=x.device)[None, :], extents[:, 1:] - 1)  # (B, w_l)
        channels = x.shape[1]
        x = x.gather(2, rows[:, None, :, None].expand(-1, channels, -1, width))
        return x.gather(3, cols[:, None, None, :].expand(-1, channels, height, -1))

    @staticmethod
    def is_masked(module: nn.Module) -> bool:
        """Whether the padding mask hooks `module`: a convolution or a norm."""
        return isinstance(module, (nn.Conv2d, nn.GroupNorm)) or _is_per_channel_norm(module)

    def hook(self, module: nn.Module, inputs, output):
        """The forward hook of a convolution or norm (`is_masked`): its output with zeros outside
        the images, GroupNorm's from valid-region statistics."""
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            return output
        valid = self.valid_as(output.shape[-2:], output.dtype)
        if isinstance(module, nn.GroupNorm):
            return masked_group_norm(module, inputs[0], valid)
        if _tracks_batch_statistics(module):
            raise ValueError(BATCH_STATISTICS_ERROR)
        if torch.is_grad_enabled():
            return output * valid
        return output.mul_(valid)  # no autograd: the module's fresh output, in place

    @classmethod
    def hooked_modules(cls, *parts: nn.Module) -> List[nn.Module]:
        """The modules of `parts` that need the hook: every convolution and GroupNorm, and
        the per-channel norms that are not inside a convolution (detectron2's Conv2d applies
        its norm and activation itself, and its hook then zeroes the result)."""
        hooked = []
        for part in parts:
            inside_convolutions = {
                id(child) for m in part.modules() if isinstance(m, nn.Conv2d) for child in m.modules() if child is not m
            }
            hooked += [
                m
                for m in part.modules()
                if cls.is_masked(m) and (isinstance(m, (nn.Conv2d, nn.GroupNorm)) or id(m) not in inside_convolutions)
            ]
        return hooked

    @contextlib.contextmanager
    def masking(self, *modules: nn.Module):
        """Within the context, every convolution and norm of `modules` leaves zeros outside
        the images, and GroupNorm takes valid-region statistics (forward hooks, removed on
        exit)."""
        handles: List = []
        try:
            handles += [m.register_forward_hook(self.hook) for m in self.hooked_modules(*modules)]
            yield self
        finally:
            for handle in handles:
                handle.remove()
