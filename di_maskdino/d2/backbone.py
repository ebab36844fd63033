"""timm backbones for detectron2 configs: MODEL.BACKBONE.NAME = "build_timm_backbone"."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..modeling.backbone import TimmBackbone

__all__ = ["D2TimmBackbone", "build_timm_backbone"]


class D2TimmBackbone(Backbone):
    """detectron2 `Backbone` around `TimmBackbone` (maps res2..res5)."""

    def __init__(self, body: TimmBackbone, size_divisibility: int = 32):
        super().__init__()
        self.body = body
        self._size_divisibility = size_divisibility

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def output_shape(self):
        return {name: ShapeSpec(channels=s.channels, stride=s.stride) for name, s in self.body.output_shape().items()}

    def forward(self, x):
        return self.body(x)


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape):
    t = cfg.MODEL.TIMM
    kwargs = {"drop_path_rate": t.DROP_PATH_RATE}
    if t.IMG_SIZE:
        kwargs["img_size"] = t.IMG_SIZE
    if not t.STRICT_IMG_SIZE:  # only transformer backbones know this argument
        kwargs["strict_img_size"] = False
    return D2TimmBackbone(TimmBackbone(t.NAME, out_strides=tuple(t.OUT_STRIDES), pretrained=t.PRETRAINED, **kwargs))
