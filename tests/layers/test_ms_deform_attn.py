"""The MSDeformAttn layer: initialisation, reference-point conventions, padding, compile."""

import math

import pytest
import torch

pytest.importorskip("fvcore")  # di_maskdino.layers imports it (a GPU check machine may lack it)

from di_maskdino.layers import MSDeformAttn  # noqa: E402

LEVELS = [(8, 12), (4, 6), (2, 3)]


def level_layout(levels=LEVELS):
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), int(sizes.sum())


def make_inputs(batch=2, queries=5, embed_dim=32, levels=LEVELS, box=False, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes, starts, tokens = level_layout(levels)
    query = torch.randn(batch, queries, embed_dim, generator=generator, dtype=dtype)
    value = torch.randn(batch, tokens, embed_dim, generator=generator, dtype=dtype)
    reference = torch.rand(batch, queries, len(levels), 4 if box else 2, generator=generator, dtype=dtype)
    if box:
        reference[..., 2:] = reference[..., 2:] * 0.5
    return query, reference, value, shapes, starts


def coordinate_layer(offset_xy, levels):
    """One head, one point per level; value channel 0 holds the pixel column index j and
    channel 1 the row index i of its token; projections are identities; the only sampling
    offset is `offset_xy`. The output is then the bilinearly interpolated pixel position."""
    layer = MSDeformAttn(embed_dim=2, num_levels=len(levels), num_heads=1, num_points=1).double()
    with torch.no_grad():
        layer.sampling_offsets.bias.copy_(torch.tensor(offset_xy, dtype=torch.float64).repeat(len(levels)))
        for projection in (layer.value_proj, layer.output_proj):
            projection.weight.copy_(torch.eye(2))
    rows = []
    for height, width in levels:
        i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        rows.append(torch.stack([j, i], -1).reshape(-1, 2))
    return layer, torch.cat(rows).double()[None]


def test_point_reference_offsets_count_in_pixels_of_each_level():
    levels = [(10, 16)]
    shapes, starts, _ = level_layout(levels)
    layer, value = coordinate_layer([1.5, -2.0], levels)
    reference = torch.tensor([[[[0.25, 0.5]]], [[[0.6, 0.45]]]], dtype=torch.float64)  # (B=2, Q=1, L=1, 2)
    query = torch.zeros(2, 1, 2, dtype=torch.float64)
    output = layer(query, reference, value.expand(2, -1, -1), shapes, starts)
    # pixel x = ref_x * W + dx - 0.5, pixel y = ref_y * H + dy - 0.5 (interior, so exact)
    expected = torch.tensor(
        [[[0.25 * 16 + 1.5 - 0.5, 0.5 * 10 - 2.0 - 0.5]], [[0.6 * 16 + 1.0, 0.45 * 10 - 2.5]]], dtype=torch.float64
    )
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_point_locations_equal_the_broadcast_formula_bit_for_bit(dtype):
    # Deformable-DETR's form: reference[:, :, None, :, None, :] + offsets / (W_l, H_l) broadcast
    # over (B, Q, heads, L, P, 2); the layer computes it on flat rows, with the same roundings
    generator = torch.Generator().manual_seed(3)
    shapes, _, _ = level_layout()
    reference = torch.rand(2, 7, 3, 2, generator=generator).to(dtype)[:, :, None, :, None, :]
    offsets = (torch.randn(2, 7, 4, 3, 5, 2, generator=generator) * 9).to(dtype)
    # the encoder's reference points: one point per token, expanded over batch and levels
    expanded = reference[:1, :, :, :1].expand(2, 7, 1, 3, 1, 2)
    for ref in (reference, expanded):
        expected = ref + offsets / shapes.flip(-1).to(dtype)[None, None, None, :, None, :]
        for level_sizes in (shapes.flip(-1), shapes.flip(-1).float()):
            assert torch.equal(MSDeformAttn.point_locations(ref, offsets, level_sizes), expected)


def test_given_level_sizes_change_nothing():
    query, reference, value, shapes, starts = make_inputs()
    layer = MSDeformAttn(embed_dim=32, num_levels=3, num_heads=4, num_points=2)
    with torch.no_grad():
        layer.sampling_offsets.weight.normal_(0, 0.5)
    without = layer(query, reference, value, shapes, starts)
    given = layer(query, reference, value, shapes, starts, level_sizes=shapes.flip(-1).float())
    assert torch.equal(without, given)
    halved = layer(query, reference, value, shapes, starts, level_sizes=shapes.flip(-1).float() * 2)
    assert not torch.allclose(halved, without)  # the given sizes are the ones used


def test_box_reference_offsets_scale_with_box_size():
    levels = [(10, 16), (5, 8)]
    shapes, starts, _ = level_layout(levels)
    layer, value = coordinate_layer([1.0, -0.5], levels)
    with torch.no_grad():  # look at the second level only
        layer.attention_weights.bias.copy_(torch.tensor([-50.0, 50.0]))
    box = torch.tensor([0.5, 0.4, 0.2, 0.3], dtype=torch.float64)
    reference = box.view(1, 1, 1, 4).expand(1, 1, 2, 4)
    output = layer(torch.zeros(1, 1, 2, dtype=torch.float64), reference, value, shapes, starts)
    # location = centre + offset / P * size / 2, on the 5 x 8 level
    x = (0.5 + 1.0 * 0.2 / 2) * 8 - 0.5
    y = (0.4 - 0.5 * 0.3 / 2) * 5 - 0.5
    torch.testing.assert_close(output, torch.tensor([[[x, y]]], dtype=torch.float64), rtol=0, atol=1e-9)


def test_initial_offsets_point_each_head_in_its_own_direction():
    heads, levels, points = 8, 3, 4
    layer = MSDeformAttn(embed_dim=64, num_levels=levels, num_heads=heads, num_points=points)
    bias = layer.sampling_offsets.bias.view(heads, levels, points, 2)
    # head h looks at angle 2 pi h / 8, scaled onto the unit square: (1, 0), (1, 1), (0, 1), ...
    unit = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    for h in range(heads):
        for p in range(points):
            torch.testing.assert_close(bias[h, :, p], (unit[h] * (p + 1)).expand(levels, 2), rtol=0, atol=1e-6)
    assert layer.sampling_offsets.weight.abs().sum() == 0
    assert layer.attention_weights.weight.abs().sum() == 0 and layer.attention_weights.bias.abs().sum() == 0
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert layer.value_proj.weight.abs().max() <= math.sqrt(6 / 128) and layer.value_proj.bias.abs().sum() == 0


def test_parameter_names_and_shapes_match_released_encoder_layer():
    layer = MSDeformAttn(embed_dim=256, num_levels=4, num_heads=8, num_points=4)
    shapes = {name: tuple(p.shape) for name, p in layer.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256),
        "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256),
        "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }


def test_padding_mask_removes_padded_values():
    torch.manual_seed(0)
    layer = MSDeformAttn(embed_dim=32, num_levels=3, num_heads=4, num_points=2)
    query, reference, value, shapes, starts = make_inputs()
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[0, 40:] = True
    mask[1, ::3] = True
    zeroed = value.masked_fill(mask[..., None], 0.0)  # value_proj has no bias at init
    masked = layer(query, reference, value, shapes, starts, value_padding_mask=mask)
    torch.testing.assert_close(masked, layer(query, reference, zeroed, shapes, starts), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(masked, layer(query, reference, value, shapes, starts))


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(embed_dim=30, num_heads=8)
    layer = MSDeformAttn(embed_dim=32, num_levels=3, num_heads=4, num_points=2)
    query, reference, value, shapes, starts = make_inputs()
    with pytest.raises(ValueError, match="reference_points"):
        layer(query, reference[:, :, :2], value, shapes, starts)


@pytest.mark.parametrize("box", [False, True])
def test_compiled_layer_matches_eager(box):
    torch.manual_seed(0)
    layer = MSDeformAttn(embed_dim=32, num_levels=3, num_heads=4, num_points=2)
    inputs = make_inputs(box=box)
    eager = layer(*inputs)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), eager, rtol=1e-5, atol=1e-5)
    # gradients through the compiled graph (the registered autograd formula)
    query = inputs[0].clone().requires_grad_(True)
    (grad_compiled,) = torch.autograd.grad(compiled(query, *inputs[1:]).sum(), query)
    (grad_eager,) = torch.autograd.grad(layer(query, *inputs[1:]).sum(), query)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer(dtype):
    torch.manual_seed(0)
    layer = MSDeformAttn(embed_dim=32, num_levels=3, num_heads=4, num_points=2)
    inputs = make_inputs()
    expected = layer(*inputs)
    low_layer = MSDeformAttn(embed_dim=32, num_levels=3, num_heads=4, num_points=2).to(dtype)
    low_layer.load_state_dict(layer.state_dict())
    low_inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    output = low_layer(*low_inputs)
    assert output.dtype == dtype
    output.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in low_layer.parameters())
    torch.testing.assert_close(output.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_under_autocast(dtype):
    torch.manual_seed(0)
    layer = MSDeformAttn(embed_dim=32, num_levels=3, num_heads=4, num_points=2)
    inputs = make_inputs()
    expected = layer(*inputs)
    with torch.autocast("cpu", dtype=dtype):
        output = layer(*inputs)
    assert output.dtype == dtype  # output_proj is a linear layer, which autocast runs in `dtype`
    torch.testing.assert_close(output.float(), expected, rtol=0.05, atol=0.05)
