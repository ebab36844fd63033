"""Vision transformers for detectron2 configs (MODEL.BACKBONE.NAME = "build_vit_backbone"):
a timm ViT (`TimmViT`: DINOv2, DINOv3, any plain timm ViT) whose one map detectron2's
`SimpleFeaturePyramid` (ViTDet) turns into the maps p2..p5 at strides 4, 8, 16, 32.

Parameter names: backbone.net.body.* for the ViT (backbone.net.body.blocks.N.*,
backbone.net.body.pos_embed, backbone.net.body.patch_embed.*, as detectron2's layer-wise
learning-rate decay reads them, see `di_maskdino.d2.solver`), backbone.simfp_2..5.* for the
pyramid.
"""

import logging

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid

from ...modeling import SpecError, TimmViT, probe_vit
from ..config.validation import ConfigError, spec_problem_lines

__all__ = ["D2TimmViT", "ViTFeaturePyramid", "build_vit_backbone", "PYRAMID_STRIDES", "VIT_KEYS"]

logger = logging.getLogger("di_maskdino")

PYRAMID_STRIDES = (4, 8, 16, 32)  # p2..p5
# the scale factors (of the ViT's map) SimpleFeaturePyramid builds: 2 transposed convolutions,
# 1, none, a max-pool
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)
# NOTE: ViTDet's pyramid normalises with LayerNorm over channels (detectron2's "LN").
PYRAMID_NORM = "LN"

# argument of TimmViT -> config key
VIT_KEYS = {
    "model_name": "MODEL.VIT.NAME",
    "patch_size": "MODEL.VIT.PATCH_SIZE",
    "pretrained": "MODEL.VIT.PRETRAINED",
    "pretrained_file": "MODEL.VIT.PRETRAINED_FILE",
    "drop_path_rate": "MODEL.VIT.DROP_PATH_RATE",
}


class D2TimmViT(TimmViT, Backbone):
    """`TimmViT` as a detectron2 `Backbone` (one map, "vit", at stride P)."""

    def output_shape(self):
        return {name: ShapeSpec(channels=s.channels, stride=s.stride) for name, s in super().output_shape().items()}


class ViTFeaturePyramid(SimpleFeaturePyramid):
    """detectron2's `SimpleFeaturePyramid` on a `D2TimmViT` (`net`), with what the rest of the
    project asks of a backbone: `set_grad_checkpointing` (the ViT's blocks, for
    MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING.BACKBONE) and `num_blocks` (for
    SOLVER.LAYER_DECAY)."""

    @property
    def num_blocks(self) -> int:
        return self.net.num_blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)


def pyramid_scales(patch_size: int):
    """The scale factors of a ViT map at stride `patch_size` that give PYRAMID_STRIDES."""
    return tuple(patch_size / stride for stride in PYRAMID_STRIDES)


def _config_error(cfg, error: SpecError) -> ConfigError:
    return ConfigError("invalid configuration:\n" + "\n".join(spec_problem_lines(cfg, error, VIT_KEYS)))


@BACKBONE_REGISTRY.register()
def build_vit_backbone(cfg, input_shape):
    """MODEL.VIT: the timm ViT, its weights and the pyramid's channels. A patch size whose
    pyramid strides are not 4, 8, 16, 32, a name that is no timm ViT, a missing file or one
    that does not fit raise ConfigError naming the key."""
    v = cfg.MODEL.VIT
    try:
        patch = int(probe_vit(v.NAME, v.PATCH_SIZE).patch_embed.patch_size[0])
    except SpecError as error:
        raise _config_error(cfg, error) from error
    scales = pyramid_scales(patch)
    if any(scale not in PYRAMID_SCALES for scale in scales):
        # NOTE: DINOv2's timm models have 14-pixel patches: strides 3.5, 7, 14, 28, which the
        # encoder cannot use (and SimpleFeaturePyramid builds scale factors 4, 2, 1, 0.5 only).
        # A patch size of 16 gives 4, 8, 16, 32; timm resamples the pretrained 14 x 14 patch
        # embedding (and the position embeddings) to it when it loads the weights.
        strides = ", ".join(f"{patch / s:g}" for s in PYRAMID_SCALES)
        raise ConfigError(
            f"invalid configuration:\n  MODEL.VIT.PATCH_SIZE = {v.PATCH_SIZE!r}: must give the pyramid the strides "
            f"4, 8, 16, 32 (patch size / 4, 2, 1, 0.5); {v.NAME} with {patch}-pixel patches gives {strides}: set "
            "MODEL.VIT.PATCH_SIZE 16 (timm resamples pretrained patch embeddings to it)"
        )
    if not (v.PRETRAINED or v.PRETRAINED_FILE):
        logger.warning(
            f"MODEL.VIT: {v.NAME} starts from random weights (MODEL.VIT.PRETRAINED False, PRETRAINED_FILE empty); "
            "MODEL.WEIGHTS may still fill it"
        )
    try:
        vit = D2TimmViT(
            v.NAME,
            patch_size=v.PATCH_SIZE,
            pretrained=v.PRETRAINED,
            pretrained_file=v.PRETRAINED_FILE,
            drop_path_rate=v.DROP_PATH_RATE,
        )
    except SpecError as error:
        raise _config_error(cfg, error) from error
    (feature,) = vit.output_shape()
    return ViTFeaturePyramid(vit, feature, v.OUT_CHANNELS, scales, norm=PYRAMID_NORM)
