"""The timm backbone adapter (no pretrained weights are downloaded)."""

import pytest
import torch

from di_maskdino.modeling import TimmBackbone


@pytest.mark.parametrize(
    "name,kwargs,channels",
    [("resnet18", {}, (64, 128, 256, 512)), ("swin_tiny_patch4_window7_224", dict(img_size=224), (96, 192, 384, 768))],
)
def test_timm_backbone_gives_named_channels_first_maps(name, kwargs, channels):
    backbone = TimmBackbone(name, **kwargs)
    features = backbone(torch.rand(1, 3, 224, 224))
    shapes = backbone.output_shape()
    assert list(features) == ["res2", "res3", "res4", "res5"]
    for (key, feature), c, stride in zip(features.items(), channels, (4, 8, 16, 32)):
        assert (shapes[key].channels, shapes[key].stride) == (c, stride)
        assert feature.shape == (1, c, 224 // stride, 224 // stride)


def test_missing_stride_is_reported():
    with pytest.raises(ValueError, match="no feature map at stride"):
        TimmBackbone("resnet18", out_strides=(4, 64))
