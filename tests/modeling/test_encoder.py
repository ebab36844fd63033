"""The MaskDINO encoder (feature tokens extractor): levels, strides, mask features."""

import pytest
import torch

from di_maskdino.layers import group_norm
from di_maskdino.modeling import MaskDINOEncoder

from .tiny import TinyBackbone, encoded, tiny_model


def test_levels_strides_and_mask_features():
    _, out, memory = encoded(tiny_model())  # images padded to 64 x 96
    assert [tuple(f.shape) for f in out.features] == [(2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3), (2, 32, 1, 2)]
    assert tuple(out.mask_features.shape) == (2, 32, 16, 24)  # stride 4
    assert all(f.dtype == torch.float32 for f in out.features)
    # the head reads the levels from the lowest resolution to the highest
    assert memory.shapes == [(1, 2), (2, 3), (4, 6), (8, 12)] and memory.finest_level() == 3


def test_backbone_maps():
    features = TinyBackbone()(torch.zeros(1, 3, 64, 96))
    shapes = {k: tuple(v.shape[-2:]) for k, v in features.items()}
    assert shapes == {"res2": (16, 24), "res3": (8, 12), "res4": (4, 6), "res5": (2, 3)}


def shapes_of(backbone):
    spec = backbone.output_shape()
    return {k: s.channels for k, s in spec.items()}, {k: s.stride for k, s in spec.items()}


def small_encoder(channels, strides, **kwargs):
    """A one-layer encoder of width 16 with 4-group GroupNorm."""
    sizes = dict(hidden_dim=16, mask_dim=16, num_layers=1, num_heads=2, ffn_dim=32, norm_layer=group_norm(4))
    return MaskDINOEncoder(channels, strides, **sizes, **kwargs)


def test_norm_layer_is_a_constructor_and_extra_levels_follow_the_widest_input():
    encoder = small_encoder(*shapes_of(TinyBackbone()), num_levels=5)
    assert isinstance(encoder.input_proj[0][1], torch.nn.GroupNorm) and encoder.input_proj[0][1].num_groups == 4
    assert len(encoder.input_proj) == 5 and encoder.extra_level_source == "res5"
    out = encoder(TinyBackbone()(torch.zeros(1, 3, 128, 128)))
    assert [tuple(f.shape[-2:]) for f in out.features] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_extra_levels_of_equally_wide_maps_start_from_the_coarsest():
    """A feature pyramid's maps (p2..p5, one width): the extra level is p5's stride-2
    neighbour, at stride 64, whatever order the maps are given in."""
    channels = {"p2": 16, "p3": 16, "p4": 16, "p5": 16}
    strides = {"p5": 32, "p3": 8, "p2": 4, "p4": 16}
    encoder = small_encoder(channels, strides, num_levels=4, transformer_in_features=("p4", "p3", "p5"))
    assert encoder.extra_level_source == "p5" and encoder.fpn_in_features == ["p2"]
    features = {name: torch.rand(1, 16, 256 // stride, 192 // stride) for name, stride in strides.items()}
    out = encoder(features)
    assert [tuple(f.shape[-2:]) for f in out.features] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    assert tuple(out.mask_features.shape[-2:]) == (64, 48)


def test_the_encoder_changes_the_tokens_with_attention_across_levels():
    """Changing only the coarsest backbone map changes the finest encoded level (deformable
    self-attention reads every level)."""
    torch.manual_seed(0)
    channels, strides = shapes_of(TinyBackbone())
    encoder = MaskDINOEncoder(
        channels, strides, hidden_dim=16, mask_dim=16, num_layers=1, num_heads=2, ffn_dim=32, norm_layer=group_norm(4)
    )
    features = TinyBackbone()(torch.rand(1, 3, 64, 64))
    first = encoder(features).features[0]
    features["res5"] = features["res5"] + 1.0
    assert not torch.allclose(encoder(features).features[0], first)


def test_bad_inputs_are_reported():
    channels, strides = shapes_of(TinyBackbone())
    with pytest.raises(ValueError, match="not backbone outputs"):
        MaskDINOEncoder(channels, strides, transformer_in_features=("res6",), norm_layer=group_norm(4))
    with pytest.raises(ValueError, match="num_levels"):
        MaskDINOEncoder(channels, strides, num_levels=2, norm_layer=group_norm(4))
