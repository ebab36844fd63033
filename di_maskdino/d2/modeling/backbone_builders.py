"""timm backbones for detectron2 configs (MODEL.BACKBONE.NAME = "build_timm_backbone", or
"build_swin_backbone" for timm's Swin computing as MaskDINO's released Swin models), and
activation checkpointing of the backbone (MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING.BACKBONE)."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ResNet

from ...layers import CheckpointedSequential
from ...modeling.backbone import TimmBackbone, check_checkpointable, enable_backbone_checkpointing
from ...modeling.swin import SwinBackbone
from ..config.validation import ConfigError

__all__ = ["D2SwinBackbone", "D2TimmBackbone", "build_swin_backbone", "build_timm_backbone", "checkpoint_backbone"]


def checkpoint_backbone(backbone: Backbone) -> Backbone:
    """Activation checkpointing of the backbone in training: each of detectron2's ResNet
    stages (res2..res5; not the stem) as one region, or the timm backbone's own. Parameter
    names and checkpoints are unchanged."""
    if not isinstance(backbone, ResNet):
        return enable_backbone_checkpointing(backbone)
    check_checkpointable(backbone, "the ResNet backbone")
    # NOTE: detectron2's ResNet runs the stages listed in `stages`; each is replaced by a
    # Sequential of the same blocks (the same children, so the same parameter names) that
    # runs as one checkpointed region.
    for index, (name, stage) in enumerate(zip(backbone.stage_names, backbone.stages)):
        checkpointed = CheckpointedSequential(*stage)
        setattr(backbone, name, checkpointed)
        backbone.stages[index] = checkpointed
    return backbone


class _Detectron2Interface:
    """What detectron2 asks of a `Backbone` beyond the core's interface: `size_divisibility`
    and `ShapeSpec`s. Mixed in before a core backbone class whose first argument is the timm
    model name."""

    def __init__(self, model_name: str, size_divisibility: int = 32, **kwargs):
        super().__init__(model_name, **kwargs)
        self._size_divisibility = size_divisibility

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def output_shape(self):
        return {name: ShapeSpec(channels=s.channels, stride=s.stride) for name, s in super().output_shape().items()}


class D2TimmBackbone(_Detectron2Interface, TimmBackbone, Backbone):
    """`TimmBackbone` as a detectron2 `Backbone` (maps res2..res5; the timm model's
    parameters are named backbone.body.*)."""


class D2SwinBackbone(_Detectron2Interface, SwinBackbone, Backbone):
    """`SwinBackbone` as a detectron2 `Backbone` (maps res2..res5; parameters backbone.body.*
    and backbone.output_norms.*)."""


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape):
    """timm's Swin (MODEL.TIMM.NAME, a swin_* model) computing as MaskDINO's released Swin
    backbone, with a LayerNorm on each map. Reads MODEL.TIMM.NAME, OUT_STRIDES, PRETRAINED and
    DROP_PATH_RATE; it takes any input size (STRICT_IMG_SIZE does not apply; an IMG_SIZE other
    than 0 is refused)."""
    t = cfg.MODEL.TIMM
    if t.IMG_SIZE:
        raise ConfigError(
            f"MODEL.TIMM.IMG_SIZE = {t.IMG_SIZE}: build_swin_backbone takes any input size and does not use it; "
            "set MODEL.TIMM.IMG_SIZE 0 (or MODEL.BACKBONE.NAME build_timm_backbone for timm's own Swin)"
        )
    try:
        return D2SwinBackbone(
            t.NAME, out_strides=tuple(t.OUT_STRIDES), pretrained=t.PRETRAINED, drop_path_rate=t.DROP_PATH_RATE
        )
    except ValueError as error:
        raise ConfigError(
            f"MODEL.TIMM.NAME = {t.NAME!r} with MODEL.BACKBONE.NAME build_swin_backbone: {error}; set MODEL.TIMM.NAME "
            "to a swin_* model (e.g. swin_large_patch4_window12_384) or MODEL.BACKBONE.NAME build_timm_backbone"
        ) from error


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape):
    t = cfg.MODEL.TIMM
    kwargs = {"drop_path_rate": t.DROP_PATH_RATE}
    if t.IMG_SIZE:
        kwargs["img_size"] = t.IMG_SIZE
    if not t.STRICT_IMG_SIZE:  # only transformer backbones know this argument
        kwargs["strict_img_size"] = False
    return D2TimmBackbone(t.NAME, out_strides=tuple(t.OUT_STRIDES), pretrained=t.PRETRAINED, **kwargs)
