"""The timm backbone adapter (no pretrained weights are downloaded)."""

import pytest
import torch

from di_maskdino.modeling import TimmBackbone
from di_maskdino.modeling.backbone import enable_backbone_checkpointing


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


def assert_checkpointing_keeps_features_and_gradients(make_backbone, x):
    """Features and parameter gradients of `make_backbone()` (float64) with and without
    `enable_backbone_checkpointing`: equal. Returns the checkpointed backbone."""
    results = []
    for enabled in (False, True):
        backbone = make_backbone()
        if enabled:
            enable_backbone_checkpointing(backbone)
        features = backbone(x)
        sum((f * f.detach().sin()).sum() for f in features.values()).backward()
        results.append((features, {n: p.grad for n, p in backbone.named_parameters()}))
    (plain, plain_grads), (features, grads) = results
    for name in features:
        torch.testing.assert_close(features[name], plain[name], rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    return backbone


@pytest.mark.slow
def test_timm_checkpointing_keeps_gradients():
    """timm's own checkpointing, float64: the same features and gradients."""

    def convnext():
        torch.manual_seed(0)
        return TimmBackbone("convnext_atto").double()  # LayerNorm: nothing to update twice

    x = torch.rand(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert assert_checkpointing_keeps_features_and_gradients(convnext, x).body.grad_checkpointing


def test_timm_checkpointing_refuses_batch_norm():
    with pytest.raises(ValueError, match="BatchNorm"):
        enable_backbone_checkpointing(TimmBackbone("resnet18"))
