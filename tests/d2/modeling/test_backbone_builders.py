"""Activation checkpointing of detectron2's ResNet (MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING.BACKBONE):
the same parameter names and gradients, less kept for backward, BatchNorm refused."""

import os

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.modeling import build_model  # noqa: E402

from di_maskdino.d2 import load_config  # noqa: E402
from di_maskdino.layers import CheckpointedSequential  # noqa: E402
from tests.layers.test_activation_checkpointing import saved_bytes  # noqa: E402
from tests.tooling import ROOT  # noqa: E402

QUICK = os.path.join(ROOT, "configs", "quick_start.yaml")  # ResNet-18 with GroupNorm


def quick_model(checkpoint_backbone: bool, *opts):
    switch = ["MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING.BACKBONE", str(checkpoint_backbone)]
    cfg = load_config(QUICK, switch + list(opts))
    torch.manual_seed(0)
    return build_model(cfg)


def backbone_gradients(model):
    backbone = model.backbone.double().train()
    x = torch.rand(1, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    saved, features = saved_bytes(lambda: backbone(x))
    sum((f * f.detach().sin()).sum() for f in features.values()).backward()
    return saved, features, {n: p.grad for n, p in backbone.named_parameters()}


def test_resnet_blocks_are_checkpointed_with_the_same_names_and_gradients():
    plain, checked = quick_model(False), quick_model(True)
    assert list(checked.state_dict()) == list(plain.state_dict())
    stages = checked.backbone.stages
    assert all(isinstance(stage, CheckpointedSequential) for stage in stages)
    assert [getattr(checked.backbone, name) for name in checked.backbone.stage_names] == stages
    saved, features, grads = backbone_gradients(checked)
    plain_saved, plain_features, plain_grads = backbone_gradients(plain)
    for name in features:
        torch.testing.assert_close(features[name], plain_features[name], rtol=0, atol=0)
    assert [n for n, g in grads.items() if g is None] == [n for n, g in plain_grads.items() if g is None]
    for name, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(grad, plain_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    assert saved < plain_saved / 2


def test_batch_norm_with_running_statistics_is_refused():
    with pytest.raises(ValueError, match="BatchNorm.*FrozenBN"):
        quick_model(True, "MODEL.RESNETS.NORM", "BN")
    quick_model(True, "MODEL.RESNETS.NORM", "FrozenBN")  # the paper's setting


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["MODEL.TIMM.IMG_SIZE", "384"], "MODEL.TIMM.IMG_SIZE = 384: build_swin_backbone takes any input size"),
        (["MODEL.TIMM.NAME", "resnet18"], "MODEL.TIMM.NAME = 'resnet18' with MODEL.BACKBONE.NAME build_swin_backbone"),
    ],
)
def test_swin_builder_refuses_what_it_cannot_use_by_key(overrides, named):
    from di_maskdino.d2 import ConfigError

    swin = ["MODEL.BACKBONE.NAME", "build_swin_backbone", "MODEL.TIMM.NAME", "swin_tiny_patch4_window7_224"]
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        with torch.device("meta"):
            quick_model(False, *(swin + overrides))
