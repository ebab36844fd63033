"""Conversion of MaskDINO's Swin-L releases (instance and panoptic) and of ImageNet Swin
classification checkpoints, checked on the manifests of the released models (tests/data/)."""

import os
import pickle
import re

import numpy as np
import pytest
import torch

from di_maskdino import release_conversion as conversion
from di_maskdino.modeling.swin import SwinBackbone
from tests.test_release_conversion import (
    DATA,
    HAS_DETECTRON2,
    ROOT,
    convert_tool,
    module_of,
    our_model,
    read_manifest,
)

MANIFESTS = {
    "swinl": os.path.join(DATA, "official_maskdino_swinl_state_dict.txt"),
    # read from the model MaskDINO's code builds with its config
    # configs/coco/panoptic-segmentation/swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml
    "swinl_panoptic": os.path.join(DATA, "official_maskdino_swinl_panoptic_state_dict.txt"),
}
SWIN_L = {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "window_size": 12}


def relative_position_index(window):
    """Index into a (2w - 1)^2 bias table of every pair of positions of a w x w window,
    from the definition: (row offset + w - 1) * (2w - 1) + column offset + w - 1."""
    rows, columns = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, columns = rows.flatten(), columns.flatten()
    dr = rows[:, None] - rows[None, :] + window - 1
    dc = columns[:, None] - columns[None, :] + window - 1
    return dr * (2 * window - 1) + dc


def release_state_dict(kind):
    """Random values (copies of a shared module alike); the Swin blocks' relative-position
    indices as the release computes them."""
    state = {}
    for name, shape in read_manifest(MANIFESTS[kind]).items():
        if name.endswith("relative_position_index"):
            state[name] = relative_position_index(12)
            continue
        seed = sum(ord(c) * (i + 1) for i, c in enumerate(module_of(name))) % (2**31)
        state[name] = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return state


def meta_model(converted):
    architecture, maps = conversion.infer_architecture(converted)
    with torch.device("meta"):
        backbone = SwinBackbone("swin_large_patch4_window12_384", **conversion.infer_swin(converted))
        return our_model(architecture, maps, backbone)


@pytest.mark.parametrize("kind", ["swinl", "swinl_panoptic"])
def test_every_released_swin_parameter_lands_in_our_model(kind):
    release = release_state_dict(kind)
    converted = conversion.convert_release_state_dict(release)
    indices = [n for n in release if n.endswith("relative_position_index")]
    assert len(indices) == 24  # one per block: 2 + 2 + 18 + 2
    # one parameter per distinct release module, minus the criterion buffer and the indices
    assert len(converted) == len({module_of(n) for n in release}) - 1 - len(indices)
    assert conversion.release_backbone(converted) == "swin" and conversion.infer_swin(converted) == SWIN_L
    model = meta_model(converted)
    conversion.check_against_model(converted, {k: v.shape for k, v in model.state_dict().items()})
    pairs = [
        ("backbone.body.patch_embed.proj.weight", "backbone.patch_embed.proj.weight"),
        ("backbone.body.layers_2.blocks.17.attn.qkv.weight", "backbone.layers.2.blocks.17.attn.qkv.weight"),
        (
            "backbone.body.layers_3.blocks.1.attn.relative_position_bias_table",
            "backbone.layers.3.blocks.1.attn.relative_position_bias_table",
        ),
        # the release merges patches at the end of a stage, timm at the start of the next
        ("backbone.body.layers_1.downsample.reduction.weight", "backbone.layers.0.downsample.reduction.weight"),
        ("backbone.body.layers_3.downsample.norm.bias", "backbone.layers.2.downsample.norm.bias"),
        ("backbone.output_norms.0.weight", "backbone.norm0.weight"),
        ("backbone.output_norms.3.bias", "backbone.norm3.bias"),
        ("encoder.input_proj.0.0.weight", "sem_seg_head.pixel_decoder.input_proj.0.0.weight"),
        ("encoder.input_proj.4.0.weight", "sem_seg_head.pixel_decoder.input_proj.4.0.weight"),
    ]
    for mine, theirs in pairs:
        assert torch.equal(converted[mine], release[theirs]), mine


def test_swin_architecture_is_read_from_the_weights():
    convert = conversion.convert_release_state_dict
    instance, maps = conversion.infer_architecture(convert(release_state_dict("swinl")))
    panoptic, _ = conversion.infer_architecture(convert(release_state_dict("swinl_panoptic")))
    assert instance.encoder.in_features == ("res2", "res3", "res4", "res5")  # "4 scales"
    assert (instance.num_levels, instance.num_decoder_layers, instance.de_imbalance) == (5, 9, None)
    assert {k: (s.channels, s.stride) for k, s in maps.items()} == {
        "res2": (192, 4),
        "res3": (384, 8),
        "res4": (768, 16),
        "res5": (1536, 32),
    }
    # the instance release initialises boxes from masks with BitMasks' extent, the panoptic from boxes
    assert (instance.mask_enhanced_boxes, instance.mask_box_edges) == (True, "pixels")
    assert (panoptic.num_classes, panoptic.mask_enhanced_boxes) == (133, False)
    release = conversion.matching_release
    assert release(instance, "swin")["configs"][0] == "configs/release/maskdino_swinl_4s_50ep.yaml"
    assert release(panoptic, "swin")["configs"] == ["configs/release/maskdino_swinl_4s_50ep_panoptic.yaml"]
    assert conversion.matching_release(instance, "resnet") is None


def test_a_wrong_relative_position_index_is_reported():
    release = release_state_dict("swinl")
    release["backbone.layers.1.blocks.0.attn.relative_position_index"] = relative_position_index(12).flip(0)
    with pytest.raises(conversion.ConversionError, match=r"layers\.1\.blocks\.0\.attn\.relative_position_index is not"):
        conversion.convert_release_state_dict(release)


@pytest.mark.parametrize("kind", ["swinl", "swinl_panoptic"])
def test_shipped_swin_release_configs_fit_the_released_weights(kind):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")
    from detectron2.modeling import build_model

    from di_maskdino.d2 import load_config

    converted = conversion.convert_release_state_dict(release_state_dict(kind))
    architecture, _ = conversion.infer_architecture(converted)
    for config in conversion.matching_release(architecture, "swin")["configs"]:
        cfg = load_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "meta"])
        with torch.device("meta"):
            model = build_model(cfg)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in converted.items()}, config
        assert model.head.query_selection.mask_box_edges == architecture.mask_box_edges


# --- ImageNet Swin classification checkpoints -> backbone weights ---


def microsoft_swin_large():
    """An ImageNet Swin-L classification checkpoint in Microsoft's layout (the names of the
    release's backbone, a final norm, a head, the shifted blocks' attention masks)."""
    state = {}
    for name, tensor in release_state_dict("swinl").items():
        match = re.match(r"backbone\.(.+)", name)
        if match and not re.match(r"norm\d\.", match.group(1)):
            state[match.group(1)] = tensor
    state.update({"norm.weight": torch.rand(1536), "norm.bias": torch.rand(1536)})
    state.update({"head.weight": torch.rand(10, 1536), "head.bias": torch.rand(10)})
    for stage, depth in enumerate(SWIN_L["depths"]):
        for block in range(1, depth, 2):
            state[f"layers.{stage}.blocks.{block}.attn_mask"] = torch.zeros(4, 144, 144)
    return state


def timm_layout(state):
    """The oracle: timm's own filter for Microsoft's checkpoints, with timm's Swin-L."""
    import timm
    from timm.models.swin_transformer import checkpoint_filter_fn

    with torch.device("meta"):
        model = timm.create_model("swin_large_patch4_window12_384")
    return checkpoint_filter_fn(dict(state), model)


@pytest.mark.parametrize("layout", ["microsoft", "timm"])
def test_imagenet_swin_converts_to_the_backbone(layout):
    state = microsoft_swin_large()
    expected = timm_layout(state)  # timm names; head and final norm included
    source = state if layout == "microsoft" else expected
    converted, dropped = conversion.convert_swin_classification_state_dict(source)
    body = {k: v for k, v in expected.items() if not k.startswith(("head.", "norm."))}
    assert len(converted) == len(body) + 8  # and the 4 output norms' weights and biases
    for name, tensor in body.items():
        ours = "backbone.body." + re.sub(r"^layers\.(\d+)\.", r"layers_\1.", name)
        assert torch.equal(converted[ours], tensor), name
    for stage, channels in enumerate((192, 384, 768, 1536)):  # a LayerNorm's initialisation
        assert torch.equal(converted[f"backbone.output_norms.{stage}.weight"], torch.ones(channels))
        assert torch.equal(converted[f"backbone.output_norms.{stage}.bias"], torch.zeros(channels))
    with torch.device("meta"):
        backbone = SwinBackbone("swin_large_patch4_window12_384")
    conversion.check_against_model(converted, {f"backbone.{k}": v.shape for k, v in backbone.state_dict().items()})
    classification_only = {k for k in source if k.startswith(("head", "norm"))}
    assert {k for k in dropped if k.startswith(("head", "norm"))} == classification_only
    if layout == "microsoft":
        assert sum(k.endswith("attn_mask") for k in dropped) == 12
        assert sum(k.endswith("relative_position_index") for k in dropped) == 24


def test_an_unknown_classification_entry_is_reported():
    state = microsoft_swin_large()
    state["absolute_pos_embed"] = torch.zeros(1, 9216, 192)
    with pytest.raises(conversion.ConversionError, match="unmapped: absolute_pos_embed"):
        conversion.convert_swin_classification_state_dict(state)


@pytest.mark.slow
def test_conversion_tool_on_swin_files(tmp_path):
    # MaskDINO's .pkl of the ImageNet-22k Swin-L: a pickle of numpy arrays, read only when trusted
    state = microsoft_swin_large()
    pkl = tmp_path / "swin_large_patch4_window12_384_22k.pkl"
    with open(pkl, "wb") as file:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "third party"}, file)
    target = tmp_path / "backbone.pth"
    refused = convert_tool("--input", pkl, "--output", target)
    assert refused.returncode != 0 and "--trust-pickle" in refused.stderr and not target.exists()
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pkl.read_bytes()[:100000])
    broken = convert_tool("--input", truncated, "--output", target, "--trust-pickle")
    assert broken.returncode != 0 and "is corrupt or truncated" in broken.stderr and "Traceback" not in broken.stderr
    run = convert_tool("--input", pkl, "--output", target, "--trust-pickle")
    assert run.returncode == 0, run.stderr
    assert "These are Swin-L backbone weights" in run.stdout and "12 x the shifted-window mask" in run.stdout
    written = torch.load(target, weights_only=True)["model"]
    assert torch.equal(
        written["backbone.body.layers_1.downsample.reduction.weight"],
        torch.from_numpy(np.asarray(state["layers.0.downsample.reduction.weight"])),
    )
    # the released detection models name their configs: the two instance releases by file name
    state = {"model": release_state_dict("swinl")}
    for name, config in [
        ("maskdino_swinl_50ep_300q_hid2048_3sd1_instance_maskenhanced_mask52.3ap_box59.0ap.pth", "4s_50ep.yaml"),
        ("maskdino_swinl_50ep_300q_hid2048_3sd1_instance_mask52.1ap_box58.3ap.pth", "4s_50ep_no_mask_enhance.yaml"),
    ]:
        torch.save(state, tmp_path / name)
        run = convert_tool("--input", tmp_path / name, "--output", tmp_path / "converted.pth")
        assert run.returncode == 0, run.stderr
        assert f"--config-file configs/release/maskdino_swinl_{config} --eval-only" in run.stdout
        assert " or: " not in run.stdout
    assert HAS_DETECTRON2 or "not installed" not in run.stdout  # the Swin backbone is checked with timm alone


@pytest.mark.slow
def test_converted_imagenet_swin_initialises_a_swin_config(tmp_path):
    """End to end: timm's Swin-T checkpoint (random weights, timm's layout) converted by the
    tool initialises every backbone parameter of a build_swin_backbone model through
    MODEL.WEIGHTS (the d2 checkpointer's "init" mode), the output norms included."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")
    import timm
    from detectron2.modeling import build_model

    from di_maskdino.d2 import load_config
    from di_maskdino.d2.checkpointer import Checkpointer

    torch.manual_seed(0)
    classifier = timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    source, target = tmp_path / "swin_tiny.pth", tmp_path / "backbone.pth"
    torch.save(classifier, source)
    assert convert_tool("--input", source, "--output", target).returncode == 0
    overrides = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "build_swin_backbone"]
    overrides += ["MODEL.TIMM.NAME", "swin_tiny_patch4_window7_224", "MODEL.WEIGHTS", str(target)]
    cfg = load_config(os.path.join(ROOT, "configs", "quick_start.yaml"), overrides)
    model = build_model(cfg)
    Checkpointer(model, mode="init", what="MODEL.WEIGHTS").load(cfg.MODEL.WEIGHTS)
    loaded = model.backbone.state_dict()
    for name, tensor in classifier.items():
        if name.startswith(("head.", "norm.")) or name.endswith(("relative_position_index", "attn_mask")):
            continue
        ours = "body." + re.sub(r"^layers\.(\d+)\.", r"layers_\1.", name)
        assert torch.equal(loaded[ours], tensor), name
    assert all(torch.equal(loaded[f"output_norms.{i}.weight"], torch.ones(96 << i)) for i in range(4))
