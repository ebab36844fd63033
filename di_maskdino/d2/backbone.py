"""timm backbones for detectron2 configs: MODEL.BACKBONE.NAME = "build_timm_backbone"."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..modeling.backbone import TimmBackbone

__all__ = ["D2TimmBackbone", "build_timm_backbone"]


class D2TimmBackbone(TimmBackbone, Backbone):
    """`TimmBackbone` as a detectron2 `Backbone` (maps res2..res5; the timm model's
    parameters are named backbone.body.*)."""

    def __init__(self, model_name: str, size_divisibility: int = 32, **kwargs):
        super().__init__(model_name, **kwargs)
        self._size_divisibility = size_divisibility

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def output_shape(self):
        return {name: ShapeSpec(channels=s.channels, stride=s.stride) for name, s in super().output_shape().items()}


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape):
    t = cfg.MODEL.TIMM
    kwargs = {"drop_path_rate": t.DROP_PATH_RATE}
    if t.IMG_SIZE:
        kwargs["img_size"] = t.IMG_SIZE
    if not t.STRICT_IMG_SIZE:  # only transformer backbones know this argument
        kwargs["strict_img_size"] = False
    return D2TimmBackbone(t.NAME, out_strides=tuple(t.OUT_STRIDES), pretrained=t.PRETRAINED, **kwargs)
