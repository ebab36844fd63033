"""Backbone interface of the model core.

A backbone is any module whose forward maps a (B, 3, H, W) image batch to a dict of
feature maps (e.g. "res2".."res5") and whose `output_shape()` gives, per name, an object
with `channels` and `stride` - detectron2's `Backbone` does exactly this, so its ResNet
plugs in directly. `TimmBackbone` adapts any timm model with `features_only` support
(ResNets, Swin, ConvNeXt, ...).
"""

from dataclasses import dataclass
from typing import Dict, Sequence

import torch
from torch import nn

__all__ = ["FeatureSpec", "TimmBackbone"]


@dataclass(frozen=True)
class FeatureSpec:
    channels: int
    stride: int


class TimmBackbone(nn.Module):
    """A timm model as a multi-scale backbone; its feature maps are named res{log2(stride)}.

    Args:
        model_name: any timm model name that supports `features_only`.
        out_strides: strides to return (default 4, 8, 16, 32 -> res2..res5).
        pretrained: load timm's pretrained weights (downloads; off by default).
        **kwargs: passed to `timm.create_model` (e.g. img_size for Swin, drop_path_rate).
    """

    def __init__(
        self, model_name: str, out_strides: Sequence[int] = (4, 8, 16, 32), pretrained: bool = False, **kwargs
    ):
        super().__init__()
        import timm

        probe = timm.create_model(model_name, features_only=True, pretrained=False, **kwargs)
        reductions = probe.feature_info.reduction()
        missing = [s for s in out_strides if s not in reductions]
        if missing:
            raise ValueError(
                f"TimmBackbone: {model_name} has no feature map at stride(s) {missing}; it offers {reductions}"
            )
        out_indices = [reductions.index(s) for s in out_strides]
        del probe
        self.body = timm.create_model(
            model_name, features_only=True, out_indices=out_indices, pretrained=pretrained, **kwargs
        )
        channels = self.body.feature_info.channels()
        self._names = [f"res{int(s).bit_length() - 1}" for s in out_strides]
        self._shapes = {name: FeatureSpec(c, s) for name, c, s in zip(self._names, channels, out_strides)}
        # timm's hierarchical transformers return channels-last maps
        self._channels_last = getattr(self.body, "output_fmt", "NCHW") == "NHWC"

    def output_shape(self) -> Dict[str, FeatureSpec]:
        return dict(self._shapes)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        maps = self.body(images)
        if self._channels_last:
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        return dict(zip(self._names, maps))
