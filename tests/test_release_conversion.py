"""Conversion of the released checkpoints, checked on the manifests of the released models
(names and shapes, tests/data/, copied from shared/reference)."""

import argparse
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from di_maskdino.modeling import DIMaskDINO, build_encoder, build_head
from di_maskdino.release_conversion import (
    ConversionError,
    check_against_model,
    convert_release_state_dict,
    infer_architecture,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFESTS = {
    "dimaskdino": os.path.join(DATA, "official_dimaskdino_r50_state_dict.txt"),
    "maskdino": os.path.join(DATA, "official_maskdino_r50_state_dict.txt"),
    # MaskDINO's panoptic R50 (release config configs/coco/panoptic-segmentation/
    # maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml), read from the model its code builds
    "maskdino_panoptic": os.path.join(DATA, "official_maskdino_r50_panoptic_state_dict.txt"),
}
HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None

# The release registers these modules under several names (independent of the converter's
# rules): each pattern maps a release name to the name of the one module it copies.
SHARED = [
    (r"predictor\.(decoder\.|oldm\.)?class_embed\.", "predictor.class_embed."),
    (r"predictor\.(_bbox_embed|bbox_embed\.\d+|decoder\.bbox_embed\.\d+)\.", "predictor._bbox_embed."),
    (r"predictor\.(decoder\.)?mask_embed\.", "predictor.mask_embed."),
    (r"predictor\.(decoder_norm|decoder\.norm)\.", "predictor.decoder_norm."),
    (r"predictor\.(oldm_norm|oldm\.norm)\.", "predictor.oldm_norm."),
    (r"predictor\.(_oldm_bbox_embed|oldm_bbox_embed\.\d+|oldm\.bbox_embed\.\d+)\.", "predictor._oldm_bbox_embed."),
    (r"predictor\.(decoder\.)?query_guide_feature_update\.", "predictor.query_guide_feature_update."),
]


def read_manifest(path):
    shapes = {}
    for line in open(path):
        name, shape = line.split(" ", 1)
        shapes[name] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return shapes


def module_of(name):
    for pattern, canonical in SHARED:
        name = re.sub(pattern, canonical, name)
    return name


def release_state_dict(kind):
    """Random values; copies of one shared module get the same values."""
    state = {}
    for name, shape in read_manifest(MANIFESTS[kind]).items():
        seed = sum(ord(c) * (i + 1) for i, c in enumerate(module_of(name))) % (2**31)
        state[name] = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return state


def our_model(architecture, backbone_shapes, backbone=None):
    encoder = build_encoder(architecture, backbone_shapes)
    return DIMaskDINO(backbone if backbone is not None else torch.nn.Identity(), encoder, build_head(architecture))


def detectron2_resnet50():
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


@pytest.mark.parametrize("kind", ["dimaskdino", "maskdino", "maskdino_panoptic"])
def test_every_released_parameter_lands_in_our_model(kind):
    release = release_state_dict(kind)
    converted = convert_release_state_dict(release)
    # one parameter per distinct release module, minus the dropped criterion buffer
    assert len(converted) == len({module_of(n) for n in release}) - 1
    architecture, backbone_shapes = infer_architecture(converted)
    if HAS_DETECTRON2:
        model = our_model(architecture, backbone_shapes, detectron2_resnet50())
        model.load_state_dict(converted, strict=True)
    else:
        model = our_model(architecture, backbone_shapes)
        check_against_model(
            converted, {k: v.shape for k, v in model.state_dict().items()}, skip_prefixes=("backbone.",)
        )
        model.load_state_dict(converted, strict=False)
    ours = dict(model.state_dict())
    p = "sem_seg_head.predictor."
    pairs = [
        ("head.heads.class_embed.weight", p + "class_embed.weight"),
        ("head.heads.box_embed.layers.2.bias", p + "_bbox_embed.layers.2.bias"),
        ("head.heads.norm.weight", p + "decoder_norm.weight"),
        (
            "head.decoder.layers.3.cross_attn.attn.sampling_offsets.weight",
            p + "decoder.layers.3.cross_attn.sampling_offsets.weight",
        ),
        ("head.decoder.layers.1.self_attn.norm.bias", p + "decoder.layers.1.norm2.bias"),
        ("head.decoder.layers.1.cross_attn.norm.bias", p + "decoder.layers.1.norm1.bias"),
        (
            "encoder.layers.5.ffn.linear2.weight",
            "sem_seg_head.pixel_decoder.transformer.encoder.layers.5.linear2.weight",
        ),
        ("encoder.input_proj.3.0.weight", "sem_seg_head.pixel_decoder.input_proj.3.0.weight"),
        ("encoder.lateral_convs.0.norm.weight", "sem_seg_head.pixel_decoder.adapter_1.norm.weight"),
        ("head.query_selection.memory_proj.weight", p + "enc_output.weight"),
    ]
    if kind == "dimaskdino":
        pairs += [
            (
                "head.de_imbalance.stages.0.layers.1.self_attn.attn.in_proj_weight",
                p + "oldm.layers.1.self_attn.in_proj_weight",
            ),
            ("head.de_imbalance.stages.0.box_embed.layers.0.weight", p + "_oldm_bbox_embed.layers.0.weight"),
            (
                "head.bato.cross_attn.attn.in_proj_weight",
                p + "query_guide_feature_update.multihead_attn.in_proj_weight",
            ),
            ("head.bato.mask_feature_conv.conv.weight", p + "decoder.mask_output_conv.weight"),
        ]
    for mine, theirs in pairs:
        assert torch.equal(ours[mine], release[theirs]), mine


def test_architecture_is_read_from_the_weights():
    di, di_maps = infer_architecture(convert_release_state_dict(release_state_dict("dimaskdino")))
    md, md_maps = infer_architecture(convert_release_state_dict(release_state_dict("maskdino")))
    assert (di.num_decoder_layers, di.de_imbalance.token_interaction_layers, di.bato is not None) == (6, 2, True)
    assert di.de_imbalance.selection_sizes == (600, 300)
    assert (md.num_decoder_layers, md.de_imbalance, md.bato) == (9, None, None)
    assert di.num_classes == md.num_classes == 80
    assert {k: (s.channels, s.stride) for k, s in di_maps.items()} == {
        "res2": (256, 4),
        "res3": (512, 8),
        "res4": (1024, 16),
        "res5": (2048, 32),
    }
    assert di.encoder.in_features == md.encoder.in_features == ("res3", "res4", "res5")


def test_differing_shared_copies_are_reported():
    release = release_state_dict("dimaskdino")
    release["sem_seg_head.predictor.decoder.class_embed.bias"] = (
        release["sem_seg_head.predictor.decoder.class_embed.bias"] + 1
    )
    with pytest.raises(ConversionError, match="decoder.class_embed.bias differs"):
        convert_release_state_dict(release)


def test_unknown_entries_are_reported():
    release = release_state_dict("maskdino")
    release["sem_seg_head.predictor.mystery.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="unmapped: sem_seg_head.predictor.mystery.weight"):
        convert_release_state_dict(release)


def test_missing_and_misshapen_parameters_are_reported():
    converted = convert_release_state_dict(release_state_dict("maskdino"))
    expected = {k: v.shape for k, v in converted.items()}
    del converted["head.heads.norm.bias"]
    converted["head.heads.norm.weight"] = torch.zeros(3)
    with pytest.raises(
        ConversionError, match=r"missing from the checkpoint: head.heads.norm.bias[\s\S]*shape mismatch"
    ):
        check_against_model(converted, expected)


@pytest.mark.slow
def test_conversion_tool(tmp_path):
    release = release_state_dict("dimaskdino")
    source = tmp_path / "release.pth"
    torch.save({"model": release, "iteration": 7, "scheduler": {"last_epoch": 7}}, source)
    target = tmp_path / "converted.pth"
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "convert_official_checkpoint.py"),
            "--input",
            str(source),
            "--output",
            str(target),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "DI-MaskDINO: 717 released entries -> 594 parameters" in run.stdout
    converted = torch.load(target, weights_only=True)["model"]
    assert torch.equal(converted["head.heads.class_embed.weight"], release["sem_seg_head.predictor.class_embed.weight"])

    del release["sem_seg_head.predictor.decoder.layers.0.norm3.bias"]
    torch.save({"model": release}, source)
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "convert_official_checkpoint.py"),
            "--input",
            str(source),
            "--output",
            str(target),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "missing from the checkpoint: head.decoder.layers.0.ffn.norm.bias" in run.stderr


RELEASES = [
    ("DIMASKDINO_RELEASE_SOURCE", "configs/dimaskdino_r50_4scale_bs16_12ep.yaml"),
    ("MASKDINO_RELEASE_SOURCE", "configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml"),
    # panoptic, semantic and thing-instance outputs (panoptic_on, semantic_on, instance_on)
    ("MASKDINO_RELEASE_SOURCE", "configs/coco/panoptic-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml"),
]


# MaskDINO's Swin-L releases (instance, panoptic): our timm-based Swin beside the release's own
# (inference only: the two backbones draw their drop-path masks independently in training)
SWIN_RELEASES = [
    ("MASKDINO_RELEASE_SOURCE", f"configs/coco/{task}/swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048{variant}.yaml")
    for task, variant in [
        ("instance-segmentation", ""),
        ("instance-segmentation", "_no_maskEnhance"),
        ("panoptic-segmentation", ""),
    ]
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "variable,config,mode",
    [(v, c, m) for v, c in RELEASES for m in ("inference", "train")] + [(v, c, "inference") for v, c in SWIN_RELEASES],
)
def test_outputs_equal_the_release(variable, config, mode):
    """Runs the authors' code (from a local checkout named by the environment variable) and
    ours on the same weights and images - predictions, or with --train the losses, Hungarian
    assignments and gradients of one training step; see dev/compare_with_release.py."""
    source = os.environ.get(variable)
    if not source:
        pytest.skip(f"set {variable} to a checkout of the release to compare against it")
    if not HAS_DETECTRON2:
        pytest.skip("the release needs detectron2, which is not installed")
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "dev", "compare_with_release.py"),
            "--release-source",
            source,
            "--config",
            config,
        ]
        + (["--train"] if mode == "train" else []),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert ("all losses and gradients agree" if mode == "train" else "all predictions agree") in run.stdout


def convert_tool(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_official_checkpoint.py"), *map(str, args)],
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_conversion_tool_names_the_config_and_recognises_files(tmp_path):
    source, target = tmp_path / "release.pth", tmp_path / "converted.pth"
    torch.save({"model": release_state_dict("maskdino")}, source)
    run = convert_tool("--input", source, "--output", target)
    assert run.returncode == 0, run.stderr
    assert "--config-file configs/release/maskdino_r50_3s_hid2048_50ep.yaml --eval-only" in run.stdout
    # a file already converted: recognised, nothing written
    again = convert_tool("--input", target, "--output", tmp_path / "twice.pth")
    assert again.returncode == 1 and "already in this project's format" in again.stderr
    assert not (tmp_path / "twice.pth").exists()
    # a truncated file is corrupt, whether or not --trust-pickle was given
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(source.read_bytes()[:200000])
    for extra in ([], ["--trust-pickle"]):
        run = convert_tool("--input", truncated, "--output", target, *extra)
        assert run.returncode != 0 and "is corrupt or truncated" in run.stderr
        assert "--trust-pickle" not in run.stderr
    # a file with pickled objects: --trust-pickle is the advice, and works
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": release_state_dict("maskdino"), "cfg": argparse.Namespace(x=1)}, pickled)
    run = convert_tool("--input", pickled, "--output", target)
    assert run.returncode != 0 and "rerun with --trust-pickle" in run.stderr
    assert convert_tool("--input", pickled, "--output", target, "--trust-pickle").returncode == 0


@pytest.mark.parametrize("kind", ["dimaskdino", "maskdino"])
def test_shipped_release_configs_fit_the_released_weights(kind):
    """Every config the converter names builds exactly the network of the released weights."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")
    from detectron2.modeling import build_model

    from di_maskdino.d2 import load_config
    from di_maskdino.release_conversion import matching_release

    converted = convert_release_state_dict(release_state_dict(kind))
    architecture, _ = infer_architecture(converted)
    release = matching_release(architecture)
    assert release is not None
    for config in release["configs"]:
        cfg = load_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "meta"])
        with torch.device("meta"):
            model = build_model(cfg)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in converted.items()}, config


def test_the_panoptic_release_converts_to_the_panoptic_config():
    """MaskDINO's released panoptic R50 converts, and the architecture its weights describe is
    the one configs/coco/panoptic/maskdino_r50_50ep.yaml builds."""
    converted = convert_release_state_dict(release_state_dict("maskdino_panoptic"))
    architecture, _ = infer_architecture(converted)
    assert architecture.num_classes == 133 and not architecture.mask_enhanced_boxes
    if not HAS_DETECTRON2:
        pytest.skip("reading the config needs detectron2, which is not installed")
    from di_maskdino.d2 import load_config
    from di_maskdino.d2.config import architecture_from_config

    configured = architecture_from_config(
        load_config(os.path.join(ROOT, "configs/coco/panoptic/maskdino_r50_50ep.yaml"))
    )
    assert configured == architecture
