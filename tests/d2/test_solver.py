"""The optimizer of the paper's recipe: every parameter's learning rate and weight decay."""

import os

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.modeling import build_model  # noqa: E402

from di_maskdino.d2 import build_optimizer, load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_paper_config_gives_each_parameter_the_release_lr_and_weight_decay():
    """configs/coco/dimaskdino_r50_12ep.yaml: lr 1e-4 (backbone 1e-5), weight decay 0.05 except
    normalisation layers and embeddings (0.0, the release's WEIGHT_DECAY_NORM / _EMBED)."""
    cfg = load_config(os.path.join(ROOT, "configs", "coco", "dimaskdino_r50_12ep.yaml"), ["MODEL.DEVICE", "cpu"])
    cfg.MODEL.DI_MASKDINO.ENCODER.NUM_LAYERS = 1  # a smaller model of the same kinds of parameters
    cfg.MODEL.DI_MASKDINO.DEC_LAYERS = 2
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    setting = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in setting, "a parameter in two groups"
            setting[id(p)] = (group["lr"], group["weight_decay"])
    modules = dict(model.named_modules())
    checked = 0
    for name, p in model.named_parameters():
        owner = modules[name.rsplit(".", 1)[0]]
        kind = type(owner).__name__
        lr = 1e-5 if name.startswith("backbone.") else 1e-4
        decay = 0.0 if kind in ("GroupNorm", "LayerNorm", "BatchNorm2d", "FrozenBatchNorm2d", "Embedding") else 0.05
        assert setting[id(p)] == pytest.approx((lr, decay)), (name, kind)
        checked += 1
    assert checked == len(list(model.parameters()))
    # the parameter the issue names, and its neighbours of other kinds
    named = dict(model.named_parameters())
    assert setting[id(named["head.denoising.label_embed.weight"])] == pytest.approx((1e-4, 0.0))
    assert setting[id(named["head.heads.class_embed.weight"])] == pytest.approx((1e-4, 0.05))
    assert setting[id(named["encoder.level_embed"])] == pytest.approx((1e-4, 0.05))
    assert setting[id(named["backbone.res2.0.conv1.weight"])] == pytest.approx((1e-5, 0.05))
    assert isinstance(optimizer, torch.optim.AdamW)
