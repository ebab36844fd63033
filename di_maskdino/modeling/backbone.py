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

__all__ = ["FeatureSpec", "TimmBackbone", "enable_backbone_checkpointing", "check_checkpointable"]


def check_checkpointable(module: nn.Module, what: str) -> None:
    """Refuses activation checkpointing of `module` when it holds BatchNorm layers that
    update running statistics: the recomputation in backward would update them twice."""
    tracking = [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if tracking:
        raise ValueError(
            f"activation checkpointing of {what}: {len(tracking)} BatchNorm layers (e.g. {tracking[0]!r}) update "
            "running statistics in training, which the recomputation in backward would do twice; use frozen "
            "BatchNorm (detectron2: MODEL.RESNETS.NORM 'FrozenBN', the paper's setting), GroupNorm, or turn the "
            "backbone switch off (MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING.BACKBONE False)"
        )


def enable_backbone_checkpointing(backbone: nn.Module) -> nn.Module:
    """Turns on the backbone's own activation checkpointing (`set_grad_checkpointing`, as
    timm models and `TimmBackbone` have it)."""
    if not hasattr(backbone, "set_grad_checkpointing"):
        raise ValueError(
            f"activation checkpointing of the backbone: {type(backbone).__name__} has no set_grad_checkpointing(); "
            "use TimmBackbone or detectron2's ResNet (di_maskdino.d2), or turn the backbone switch off"
        )
    check_checkpointable(backbone, "the backbone")
    backbone.set_grad_checkpointing(True)
    return backbone


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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing of the feature extractor (every module of the
        flattened model but the first and the last, non-reentrant by timm's default)."""
        if not hasattr(self.body, "set_grad_checkpointing"):
            raise ValueError(f"TimmBackbone: timm's {type(self.body).__name__} offers no gradient checkpointing")
        self.body.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        maps = self.body(images)
        if self._channels_last:
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        return dict(zip(self._names, maps))
