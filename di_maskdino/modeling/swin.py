"""Swin Transformer backbone computing as MaskDINO's released Swin-L models do.

MaskDINO trained its Swin-L models (DI-MaskDINO's release carries the same backbone code) with
the detection variant of the Swin code: any input size (padded to whole patches), windows
padded at the bottom and right, the same window size and shift at every stage whatever the
feature size, and a LayerNorm on each returned map (`norm0`..`norm3` in its checkpoints).
`SwinBackbone` builds timm's Swin and makes it compute the same way:

- `always_partition=True`: timm keeps the configured window and shift at every stage (by
  default it shrinks the window, and drops the shift, where a stage's feature map built for
  `img_size` is no larger than one window - the release never does);
- `strict_img_size=False`: any input size, with the attention mask computed for each input;
- `use_pad_then_shift`: timm's block shifts the map and then pads it to whole windows; the
  release pads and then shifts. The two differ wherever a map is not a whole number of
  windows (every stage of a 1024 x 1024 input with window 12), so the blocks pad first;
- `output_norms`: one LayerNorm per returned map.

Shapes: maps are (B, H, W, C) inside the blocks (timm's layout) and (B, C, H, W) outside.
"""

import functools
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import TimmBackbone

__all__ = ["SwinBackbone", "pad_then_shift_attention", "pad_then_shift_block_class", "use_pad_then_shift"]


def _swin_block_class():
    from timm.models.swin_transformer import SwinTransformerBlock

    return SwinTransformerBlock


def pad_then_shift_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The shifted-window attention of a timm Swin `block` on a (B, H, W, C) map, padded to
    whole windows before the cyclic shift, as the released MaskDINO Swin computes it.

    The shifted-window mask is timm's `get_attn_mask` of the padded map: its regions are the
    padded map's, so padded positions (zeros after `norm1`) are attended to like any other
    position of their region, as in the release."""
    _, height, width, _ = x.shape
    window, shift = block.window_size, block.shift_size
    pad_h = (window[0] - height % window[0]) % window[0]
    pad_w = (window[1] - width % window[1]) % window[1]
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    mask = None
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        mask = block.get_attn_mask(x)
    from timm.models.swin_transformer import window_partition, window_reverse

    windows = window_partition(x, window).flatten(1, 2)  # (B * nW, wh * ww, C)
    windows = block.attn(windows, mask=mask).view(-1, window[0], window[1], x.shape[-1])
    x = window_reverse(windows, window, padded_h, padded_w)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :height, :width].contiguous()


@functools.lru_cache(maxsize=None)
def pad_then_shift_block_class() -> type:
    """timm's `SwinTransformerBlock` whose window attention is `pad_then_shift_attention`;
    the parameters, the normalisations and the MLP are timm's. (Made on first use, so that
    importing this module does not import timm.)"""

    class PadThenShiftBlock(_swin_block_class()):
        # NOTE: overrides timm's private `_attn` (timm's block calls it on norm1(x) and adds
        # the residual); tests/modeling/test_swin.py checks whole blocks against a direct
        # computation, so a change of timm's block structure fails there.
        def _attn(self, x: torch.Tensor) -> torch.Tensor:
            return pad_then_shift_attention(self, x)

    return PadThenShiftBlock


def use_pad_then_shift(model: nn.Module) -> int:
    """Makes every timm Swin block of `model` a pad-then-shift block (same parameters and
    buffers; only the window attention's order of padding and shifting changes). Returns
    the number of blocks changed."""
    block_class, new_class = _swin_block_class(), pad_then_shift_block_class()
    blocks = [m for m in model.modules() if type(m) is block_class]
    for block in blocks:
        # NOTE: a class change keeps the module's parameters, buffers and hooks; the subclass
        # adds no state of its own.
        block.__class__ = new_class
    return len(blocks)


class SwinBackbone(TimmBackbone):
    """A timm Swin Transformer (`swin_*`) as MaskDINO's released Swin backbone computes it
    (see the module docstring); feature maps res2..res5 as `TimmBackbone`. The timm model's
    parameters are `body.*`, the per-map LayerNorms `output_norms.<i>` (i over the returned
    maps, finest first).

    Args:
        model_name: a timm Swin model, e.g. "swin_large_patch4_window12_384".
        out_strides: strides to return (default 4, 8, 16, 32).
        pretrained: timm's own pretrained weights (its cache or the hub).
        **kwargs: passed to `timm.create_model` (e.g. drop_path_rate).
    """

    def __init__(
        self,
        model_name: str = "swin_large_patch4_window12_384",
        out_strides: Sequence[int] = (4, 8, 16, 32),
        pretrained: bool = False,
        **kwargs,
    ):
        if not model_name.startswith("swin_") or model_name.startswith("swin_s3"):
            raise ValueError(
                f"SwinBackbone: {model_name!r} is not a timm Swin Transformer (v1) model; use a swin_* model such as "
                "'swin_large_patch4_window12_384', or the generic timm backbone for other models"
            )
        super().__init__(model_name, out_strides, pretrained, strict_img_size=False, always_partition=True, **kwargs)
        if use_pad_then_shift(self.body) == 0:
            raise ValueError(f"SwinBackbone: timm's {model_name} has no Swin Transformer blocks")
        self.output_norms = nn.ModuleList(nn.LayerNorm(self._shapes[name].channels) for name in self._names)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing block by block, as the release's `use_checkpoint` (each
        timm stage's own `grad_checkpointing`; timm's feature extractor would instead
        recompute whole stages, keeping a stage's activations at once in the backward)."""
        stages = [m for m in self.body.modules() if hasattr(m, "blocks") and hasattr(m, "grad_checkpointing")]
        for stage in stages:
            stage.grad_checkpointing = enable

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        # the release pads the image at the bottom and right to whole patches; timm requires them
        patch = self.body.patch_embed.patch_size
        pad_h, pad_w = (-images.shape[-2]) % patch[0], (-images.shape[-1]) % patch[1]
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        maps = self.body(images)  # channels-last
        return {
            name: norm(m).permute(0, 3, 1, 2).contiguous()
            for name, norm, m in zip(self._names, self.output_norms, maps)
        }
