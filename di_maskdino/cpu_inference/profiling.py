"""Where the CPU time of a forward pass goes, by kind of operator (torch's profiler).

The question it answers is how fast a CPU backend could possibly be: convolutions, GEMMs and
attention products are already run by oneDNN / MKL at close to the machine's peak, so a
compiler or runtime that keeps float32 can mainly remove the rest. Their share of the eager
time is therefore a floor for any such backend (`dev/benchmark_model.py --breakdown`). The
same split of a `torch.compile`d forward shows what Inductor left: its kernels for frozen
weights are the `mkldnn::` / `mkl::` operators below; its generated C++ code counts as other.
"""

from typing import Callable, Dict

from torch.profiler import ProfilerActivity, profile

__all__ = ["MATRIX_OPERATORS", "MATRIX_FLOP_OPERATORS", "DEFORMABLE_ATTENTION_OPERATORS", "time_by_kind"]

# operators whose own time is a matrix product (after dispatch: the convolution and GEMM
# kernels themselves, not their wrappers, which would count their callees twice)
MATRIX_OPERATORS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::_addmm_activation",
        "aten::bmm",
        "aten::baddbmm",
        "aten::mkldnn_convolution",
        "aten::_slow_conv2d_forward",
        "aten::slow_conv_transpose2d",
        "aten::_nnpack_spatial_convolution",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        # Inductor's CPU kernels for frozen weights
        "mkldnn::_linear_pointwise",
        "mkldnn::_convolution_pointwise",
        "mkldnn::_convolution_pointwise_",  # with an addition fused in place
        "mkl::_mkl_linear",
    }
)
# the same products under fvcore's names, for their FLOPs (`FlopCountAnalysis.by_operator()`)
MATRIX_FLOP_OPERATORS = frozenset(
    {"conv", "linear", "einsum", "matmul", "bmm", "addmm", "mm", "scaled_dot_product_attention"}
)
DEFORMABLE_ATTENTION_OPERATORS = frozenset({"di_maskdino::ms_deform_attn_forward"})
KINDS = ("matrix products", "deformable attention", "other")


def time_by_kind(function: Callable, *args, **kwargs) -> Dict[str, float]:
    """CPU self time (seconds) of the operators of one call `function(*args, **kwargs)`,
    summed by kind: "matrix products" (`MATRIX_OPERATORS`), "deformable attention" and
    "other" (elementwise, normalisation, copies, indexing, ...). Profiling adds a little
    overhead per operator, counted in "other"."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        function(*args, **kwargs)
    totals = dict.fromkeys(KINDS, 0.0)
    for event in prof.key_averages():
        if event.key in MATRIX_OPERATORS:
            kind = "matrix products"
        elif event.key in DEFORMABLE_ATTENTION_OPERATORS:
            kind = "deformable attention"
        else:
            kind = "other"
        totals[kind] += event.self_cpu_time_total / 1e6
    return totals
