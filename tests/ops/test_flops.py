"""The FLOP count of the deformable attention operator under fvcore's counter."""

import pytest
import torch

from di_maskdino.ops import MS_DEFORM_ATTN_OP, flop_handles, kernel_available, ms_deform_attn

from .test_ms_deform_attn import make_problem

FlopCountAnalysis = pytest.importorskip("fvcore.nn").FlopCountAnalysis

pytestmark = pytest.mark.skipif(
    not kernel_available(torch.device("cpu")), reason="needs the compiled operator (the fallback is plain PyTorch ops)"
)


class Attention(torch.nn.Module):
    def forward(self, value, shapes, starts, locations, weights):
        return ms_deform_attn(value, shapes, starts, locations, weights)


def count(queries):
    inputs = make_problem(2, 4, 8, queries, 3, dtype=torch.float32)
    analysis = FlopCountAnalysis(Attention(), inputs).set_op_handle(**flop_handles())
    analysis.unsupported_ops_warnings(False)
    return analysis.by_operator().get(MS_DEFORM_ATTN_OP.split("::")[1], 0)


def test_counts_five_multiply_adds_per_sample_and_channel():
    # batch 2, 10 queries, 4 heads, 4 levels, 3 points, 8 channels
    assert count(10) == 2 * 10 * 4 * 4 * 3 * 8 * 5


def test_scales_with_the_number_of_queries():
    assert count(20) == 2 * count(10) > 0
