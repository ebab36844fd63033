"""FLOP counting of the deformable attention operator for fvcore's `FlopCountAnalysis`,
which does not know custom operators (it would count them as zero), and of
`scaled_dot_product_attention` (what nn.MultiheadAttention runs), which fvcore skips too.

Convention (fvcore's): one fused multiply-add is one flop. Every sample of every channel
costs 5: four bilinear corner weights times values and one attention weight.

fvcore is imported when a handle runs, not with this module, so that the operator
(`di_maskdino.ops`) imports with torch alone.
"""

from typing import Any, List

__all__ = [
    "MS_DEFORM_ATTN_OP",
    "ms_deform_attn_flop_jit",
    "sdpa_flop_jit",
    "flop_handles",
]

MS_DEFORM_ATTN_OP = "di_maskdino::ms_deform_attn_forward"


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """value (B, S, H, C_h) and attention_weights (B, Q, H, L, P): B * Q * H * L * P * C_h * 5."""
    from fvcore.nn.jit_handles import get_shape

    channels = get_shape(inputs[0])[3]
    batch, queries, heads, levels, points = get_shape(inputs[4])
    return batch * queries * heads * levels * points * channels * 5


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """query (..., L_q, D), key (..., L_k, D), value (..., L_k, D_v): Q K^T and A V."""
    from fvcore.nn.jit_handles import get_shape

    query, key, value = (get_shape(v) for v in inputs[:3])
    leading = 1
    for size in query[:-2]:
        leading *= size
    return leading * query[-2] * key[-2] * (query[-1] + value[-1])


def flop_handles() -> dict:
    """Handles to pass to `FlopCountAnalysis(...).set_op_handle(**handles)`."""
    return {
        MS_DEFORM_ATTN_OP: ms_deform_attn_flop_jit,
        "aten::scaled_dot_product_attention": sdpa_flop_jit,
    }
