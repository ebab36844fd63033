"""timm's Swin computing as MaskDINO's released Swin: blocks checked against a direct
computation of the release's windowed attention (pad, then shift), written here from its
definition."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from di_maskdino.modeling.swin import SwinBackbone
from tests.layers.test_activation_checkpointing import saved_bytes
from tests.modeling.test_backbone import assert_checkpointing_keeps_features_and_gradients

SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.0)


def small_swin(**kwargs):
    torch.manual_seed(0)
    backbone = SwinBackbone("swin_tiny_patch4_window7_224", **{**SMALL, **kwargs}).double().eval()
    with torch.no_grad():  # no parameter at a value that hides a mistake (zero biases, unit norms)
        for p in backbone.parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype) * 0.1)
    return backbone


def window_attention_by_definition(block, x):
    """The release's shifted-window attention on (B, H, W, C), image by image and one window
    at a time: zero-pad
    to whole windows, roll by -shift, attend within each window (relative-position bias;
    -100 between positions from different regions of the padded, rolled map), roll back,
    crop."""
    if x.shape[0] > 1:
        return torch.cat([window_attention_by_definition(block, image[None]) for image in x])
    window, shift = block.window_size[0], block.shift_size[0]
    _, height, width, channels = x.shape
    padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
    x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
    x = torch.roll(x, (-shift, -shift), (1, 2))

    def region(position, size):  # which of the three bands of the rolled map a row/column is in
        if shift == 0:
            return 0
        return 0 if position < size - window else (1 if position < size - shift else 2)

    attn = block.attn
    heads = attn.num_heads
    table = attn.relative_position_bias_table
    out = torch.zeros_like(x)
    for top in range(0, padded_h, window):
        for left in range(0, padded_w, window):
            cells = [(top + i, left + j) for i in range(window) for j in range(window)]
            tokens = torch.stack([x[0, r, c] for r, c in cells])  # (w*w, C)
            q, k, v = attn.qkv(tokens).view(len(cells), 3, heads, -1).unbind(1)
            logits = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
            for a, (ra, ca) in enumerate(cells):
                for b, (rb, cb) in enumerate(cells):
                    dr, dc = (ra - top) - (rb - top) + window - 1, (ca - left) - (cb - left) + window - 1
                    logits[:, a, b] += table[dr * (2 * window - 1) + dc]
                    same = (region(ra, padded_h), region(ca, padded_w)) == (region(rb, padded_h), region(cb, padded_w))
                    if not same:
                        logits[:, a, b] -= 100.0
            mixed = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(len(cells), -1)
            for index, (r, c) in enumerate(cells):
                out[0, r, c] = attn.proj(mixed[index])
    out = torch.roll(out, (shift, shift), (1, 2))
    return out[:, :height, :width]


def block_by_definition(block, x):
    x = x + window_attention_by_definition(block, block.norm1(x))
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("size", [(7, 7), (9, 12), (5, 3)])
def test_blocks_pad_before_shifting_as_the_release(size):
    backbone = small_swin()
    shifted = backbone.body.layers_0.blocks[1]
    plain = backbone.body.layers_0.blocks[0]
    assert shifted.shift_size == (3, 3) and plain.shift_size == (0, 0)
    x = torch.randn(2, *size, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for block in (plain, shifted):
            torch.testing.assert_close(block(x), block_by_definition(block, x), rtol=0, atol=1e-12)


def test_timm_order_differs_where_a_map_is_not_whole_windows():
    """The check above can fail: timm's own order (shift, then pad) gives other values."""
    from timm.models.swin_transformer import SwinTransformerBlock

    block = small_swin().body.layers_0.blocks[1]
    x = torch.randn(1, 9, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = block_by_definition(block, x)
        block.__class__ = SwinTransformerBlock
        assert (block(x) - expected).abs().max() > 1e-3


def test_every_stage_shifts_and_keeps_its_window_at_any_size():
    """The release shifts every second block at every stage; timm would drop the shift (and
    shrink the window) where a stage built for img_size is at most one window."""
    backbone = small_swin()
    for stage in range(4):
        blocks = getattr(backbone.body, f"layers_{stage}").blocks
        assert [b.window_size for b in blocks] == [(7, 7), (7, 7)]
        assert [b.shift_size for b in blocks] == [(0, 0), (3, 3)]


@pytest.mark.parametrize("size", [(64, 96), (96, 64), (160, 224), (66, 70)])
def test_maps_are_named_by_stride_and_normalised(size):
    backbone = small_swin()
    backbone.output_norms.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, *size, dtype=torch.float64))
    shapes = backbone.output_shape()
    assert list(features) == ["res2", "res3", "res4", "res5"]
    for name, feature in features.items():
        stride, channels = shapes[name].stride, shapes[name].channels
        # an image that is not whole patches is padded to them, as the release pads it
        assert feature.shape == (2, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        # a LayerNorm over channels at its initial affine: mean 0, variance 1 at every position
        torch.testing.assert_close(feature.mean(1), torch.zeros_like(feature.mean(1)), atol=1e-9, rtol=0)
        torch.testing.assert_close(feature.var(1, unbiased=False), torch.ones_like(feature[:, 0]), atol=1e-4, rtol=0)
    assert [s.channels for s in shapes.values()] == [16, 32, 64, 128]


def test_only_swin_models_are_accepted():
    with pytest.raises(ValueError, match="not a timm Swin Transformer"):
        SwinBackbone("resnet18")


def test_checkpointing_keeps_features_and_gradients():
    """Activation checkpointing of every pad-then-shift block, float64: the same features and
    gradients, and less kept for the backward than without it."""
    x = torch.rand(1, 3, 72, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    backbone = assert_checkpointing_keeps_features_and_gradients(lambda: small_swin().train(), x)
    # block by block inside every stage, not stage by stage
    assert all(getattr(backbone.body, f"layers_{i}").grad_checkpointing for i in range(4))
    assert not backbone.body.grad_checkpointing
    plain = small_swin().train()
    kept = [saved_bytes(functools.partial(b, x))[0] for b in (plain, backbone)]
    assert kept[1] < kept[0] / 2, kept


def test_patch_merging_concatenates_as_the_release():
    """The converter moves the release's patch merging (end of stage i) to timm's (start of
    stage i + 1) unchanged: both concatenate the 2 x 2 neighbours in the order (0, 0), (1, 0),
    (0, 1), (1, 1) (row, column offsets) before their norm and reduction."""
    merging = small_swin().body.layers_1.downsample
    x = torch.randn(2, 6, 10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gathered = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    with torch.no_grad():
        expected = merging.reduction(merging.norm(gathered))
        torch.testing.assert_close(merging(x), expected, rtol=0, atol=1e-12)
