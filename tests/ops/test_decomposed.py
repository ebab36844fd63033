"""The gather-based deformable attention (for ONNX export) against a brute-force loop over
samples and against the grid_sample reference."""

import math

import pytest
import torch

from di_maskdino.ops import ms_deform_attn_reference
from di_maskdino.ops.decomposed import ms_deform_attn_gather

from .test_ms_deform_attn import CASES, make_problem


def brute_force(value, shapes, starts, locations, weights):
    """One bilinear sample at a time, pixel centres at integers, zero outside."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, channels, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                for level in range(levels):
                    height, width = shapes[level].tolist()
                    for p in range(points):
                        x = locations[b, q, h, level, p, 0].item() * width - 0.5
                        y = locations[b, q, h, level, p, 1].item() * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= xi < width and 0 <= yi < height:
                                    row = starts[level].item() + yi * width + xi
                                    out[b, q, h] += weights[b, q, h, level, p] * wy * wx * value[b, row, h]
    return out.view(batch, queries, heads * channels)


def test_gather_matches_brute_force():
    inputs = make_problem(batch=2, heads=2, channels=3, queries=4, points=2)
    torch.testing.assert_close(ms_deform_attn_gather(*inputs), brute_force(*inputs), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_gather_matches_reference_float64(case):
    inputs = make_problem(**case)
    torch.testing.assert_close(ms_deform_attn_gather(*inputs), ms_deform_attn_reference(*inputs), rtol=0, atol=1e-12)


def test_gather_float32_and_export_with_dynamic_levels():
    """float32 agrees with float64, and torch.export keeps the level sizes as tensors (the
    exported function works on other level sizes)."""
    inputs = make_problem(batch=2, heads=4, channels=8, queries=7, points=3, dtype=torch.float32)
    expected = ms_deform_attn_reference(*(t.double() if t.is_floating_point() else t for t in inputs))
    torch.testing.assert_close(ms_deform_attn_gather(*inputs).double(), expected, rtol=1e-5, atol=1e-5)

    class Attention(torch.nn.Module):
        def forward(self, value, shapes, starts, locations, weights):
            return ms_deform_attn_gather(value, shapes, starts, locations, weights)

    tokens = torch.export.Dim("tokens", min=2, max=10000)
    program = torch.export.export(Attention(), inputs, dynamic_shapes=({1: tokens}, None, None, None, None))
    other = make_problem(batch=2, heads=4, channels=8, queries=7, points=3, levels=[(6, 5), (3, 3), (2, 2), (1, 1)])
    other = tuple(t.float() if t.is_floating_point() else t for t in other)
    torch.testing.assert_close(program.module()(*other), ms_deform_attn_gather(*other))
