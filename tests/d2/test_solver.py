"""The optimizer of the paper's recipe: every parameter's learning rate and weight decay.
MODEL.FREEZE: frozen parameters get requires_grad False, no optimizer state and do not
change; the rest trains; the log says how many parameters train; bad prefixes are errors."""

import logging
import os
import re

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402

from di_maskdino.d2 import ConfigError, build_optimizer, load_config  # noqa: E402
from di_maskdino.d2.solver import layer_decay_factor  # noqa: E402
from tests.tooling import QUICK, SMALL_BOX_MASK_HEAD  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DETECTOR = ["backbone.", "encoder.", "head."]


def quick_model(freeze, box_mask_head=True):
    cfg = load_config(
        QUICK,
        SMALL_BOX_MASK_HEAD
        + [
            "MODEL.DI_MASKDINO.BOX_MASK_HEAD.ENABLED",
            str(box_mask_head),
            "MODEL.DI_MASKDINO.BOX_MASK_HEAD.NUM_POINTS",
            "196",
            "MODEL.DI_MASKDINO.ENCODER.NUM_LAYERS",
            "1",
            "MODEL.WEIGHTS",
            "trained.pth",  # not loaded here; freezing needs a checkpoint named
        ],
    )
    cfg.MODEL.FREEZE = freeze
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def batched_inputs():
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(2):
        image = (torch.rand(3, 64, 64, generator=generator) * 255).to(torch.uint8)
        masks = torch.zeros(2, 64, 64, dtype=torch.bool)
        masks[0, 10:30, 20:50] = True
        masks[1, 35:60, 5:40] = True
        instances = Instances((64, 64))
        instances.gt_classes = torch.tensor([0, 2])
        instances.gt_boxes = Boxes(torch.tensor([[20.0, 10.0, 50.0, 30.0], [5.0, 35.0, 40.0, 60.0]]))
        instances.gt_masks = BitMasks(masks)
        inputs.append({"image": image, "instances": instances})
    return inputs


def train_step(model, optimizer):
    model.train()
    losses = model(batched_inputs())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    return losses


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_frozen_detector_trains_only_the_head(caplog):
    cfg, model = quick_model(DETECTOR)
    with caplog.at_level(logging.INFO, logger="di_maskdino"):
        optimizer = build_optimizer(cfg, model)
    head = sum(p.numel() for p in model.box_mask_head.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert f"training {head:,} of {total:,} parameters" in caplog.text
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.box_mask_head.parameters()}

    before = snapshot(model)
    losses = train_step(model, optimizer)
    assert set(losses) == {"loss_box_mask", "loss_box_dice", "loss_box_quality"}  # no detector loss computed
    for name, parameter in model.named_parameters():
        if name.startswith("box_mask_head."):
            continue
        assert not parameter.requires_grad and parameter.grad is None, name
        assert parameter not in optimizer.state, name
        assert torch.equal(parameter, before[name]), name
    changed = [n for n, p in model.box_mask_head.named_parameters() if not torch.equal(p, before["box_mask_head." + n])]
    assert changed and all(p in optimizer.state for p in model.box_mask_head.parameters())


@pytest.mark.slow  # a full training step
def test_frozen_backbone_fine_tuning():
    cfg, model = quick_model(["backbone."], box_mask_head=False)
    optimizer = build_optimizer(cfg, model)
    before = snapshot(model)
    losses = train_step(model, optimizer)
    assert "loss_ce" in losses and "loss_mask" in losses
    for name, parameter in model.named_parameters():
        if name.startswith("backbone."):
            assert torch.equal(parameter, before[name]) and parameter not in optimizer.state, name
    assert not torch.equal(model.encoder.mask_features.weight, before["encoder.mask_features.weight"])


def test_bad_freeze_lists_are_errors():
    cfg, model = quick_model(["backbone.", "decoder.", "no_such_part"])
    with pytest.raises(ValueError, match=r"\['decoder\.', 'no_such_part'\] match no parameter"):
        build_optimizer(cfg, model)
    cfg, model = quick_model(DETECTOR + ["box_mask_head."])
    with pytest.raises(ValueError, match="freezes every parameter"):
        build_optimizer(cfg, model)
    cfg, model = quick_model(DETECTOR)
    cfg.MODEL.WEIGHTS = ""
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        build_optimizer(cfg, model)


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


def test_the_norm_layers_taking_the_norm_weight_decay():
    """NORM_TYPES names torch's private base of batch and instance norms: every such layer of
    torch and detectron2 must still be covered, and no other kind of layer."""
    from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, get_norm

    from di_maskdino.d2.solver import NORM_TYPES

    norms = [
        torch.nn.BatchNorm1d(4),
        torch.nn.BatchNorm2d(4),
        torch.nn.BatchNorm3d(4),
        torch.nn.SyncBatchNorm(4),
        NaiveSyncBatchNorm(4),
        torch.nn.InstanceNorm1d(4, affine=True),
        torch.nn.InstanceNorm2d(4, affine=True),
        torch.nn.InstanceNorm3d(4, affine=True),
        torch.nn.GroupNorm(2, 4),
        torch.nn.LayerNorm(4),
        get_norm("LN", 4),  # detectron2's LayerNorm over channels (ViTDet's pyramid)
        torch.nn.LocalResponseNorm(2),
    ]
    others = [torch.nn.Linear(4, 4), torch.nn.Conv2d(4, 4, 1), torch.nn.Embedding(3, 4), FrozenBatchNorm2d(4)]
    assert all(isinstance(m, NORM_TYPES) for m in norms)
    assert not any(isinstance(m, NORM_TYPES) for m in others)  # FrozenBatchNorm2d has buffers only


QUICK_VIT = os.path.join(ROOT, "configs", "quick_start_vit.yaml")


def parameter_settings(optimizer):
    setting = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in setting, "a parameter in two groups"
            setting[id(p)] = (group["lr"], group["weight_decay"])
    return setting


def test_layer_decay_gives_each_vit_block_its_rate():
    """SOLVER.LAYER_DECAY 0.8 on the 6 blocks of configs/quick_start_vit.yaml, with
    BACKBONE_MULTIPLIER 0.5: block i (1..6) at lr x 0.5 x 0.8 ** (7 - i); the patch and position
    embeddings and the class token at lr x 0.5 x 0.8 ** 7; the ViT's final norm and the
    pyramid at lr x 0.5; the rest of the model at lr. Position embeddings and tokens take no
    weight decay, norm layers (the pyramid's channel LayerNorms too) WEIGHT_DECAY_NORM."""
    opts = ["SOLVER.LAYER_DECAY", "0.8", "SOLVER.BACKBONE_MULTIPLIER", "0.5", "SOLVER.BASE_LR", "0.001"]
    cfg = load_config(QUICK_VIT, opts + ["SOLVER.WEIGHT_DECAY", "0.05", "SOLVER.WEIGHT_DECAY_NORM", "0.01"])
    torch.manual_seed(0)
    model = build_model(cfg)
    setting = parameter_settings(build_optimizer(cfg, model))
    modules = dict(model.named_modules())
    blocks = 6
    layers = set()
    for name, p in model.named_parameters():
        block = re.match(r"backbone\.net\.body\.blocks\.(\d+)\.", name)
        if block:
            layer = int(block.group(1)) + 1
        elif name.split(".")[3:4] in (["cls_token"], ["pos_embed"], ["patch_embed"]):
            layer = 0
        else:
            layer = blocks + 1
        layers.add(layer)
        lr = 0.001 * (0.5 if name.startswith("backbone.") else 1.0) * 0.8 ** (blocks + 1 - layer)
        owner = type(modules[name.rsplit(".", 1)[0]]).__name__
        if name.endswith(("pos_embed", "cls_token")):
            decay = 0.0
        elif owner in ("LayerNorm", "GroupNorm", "Embedding"):
            decay = 0.0 if owner == "Embedding" else 0.01
        else:
            decay = 0.05
        assert setting[id(p)] == pytest.approx((lr, decay)), (name, owner)
    assert layers == set(range(blocks + 2))  # every layer has parameters
    named = dict(model.named_parameters())
    assert setting[id(named["backbone.net.body.blocks.5.mlp.fc2.weight"])][0] == pytest.approx(0.001 * 0.5 * 0.8)
    assert setting[id(named["backbone.simfp_2.0.weight"])][0] == pytest.approx(0.0005)
    assert setting[id(named["head.heads.class_embed.weight"])][0] == pytest.approx(0.001)


def test_register_tokens_decay_with_the_embeddings():
    assert layer_decay_factor("backbone.net.body.reg_token", 0.8, 12) == pytest.approx(0.8**13)
    assert layer_decay_factor("backbone.net.body.cls_token", 0.8, 12) == pytest.approx(0.8**13)
    assert layer_decay_factor("backbone.net.body.blocks.11.ls1.gamma", 0.8, 12) == pytest.approx(0.8)
    assert layer_decay_factor("encoder.cls_token", 0.8, 12) == 1.0  # outside the backbone: no decay


def test_layer_decay_without_a_vit_backbone_is_refused():
    cfg, model = quick_model([])
    cfg.SOLVER.LAYER_DECAY = 0.8
    with pytest.raises(ValueError, match=r"SOLVER.LAYER_DECAY 0.8 .* no numbered blocks.*build_vit_backbone.*1.0"):
        build_optimizer(cfg, model)


def test_layer_decay_needs_the_number_of_blocks():
    """Without the blocks' count detectron2's rule would raise block i's rate (decay ** -i)."""
    with pytest.raises(ValueError, match="number of blocks must be at least 1"):
        layer_decay_factor("backbone.net.body.blocks.3.attn.qkv.weight", 0.8, 0)


@pytest.mark.parametrize("value", ["0.0", "1.5"])
def test_layer_decay_outside_0_1_is_refused_when_the_config_is_loaded(value):
    with pytest.raises(ConfigError, match=rf"SOLVER.LAYER_DECAY = {value}: must be in \(0, 1\]"):
        load_config(QUICK_VIT, ["SOLVER.LAYER_DECAY", value])
