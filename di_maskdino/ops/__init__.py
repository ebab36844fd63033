"""Compiled operators (with pure-PyTorch references) used by the model."""

from .flops import MS_DEFORM_ATTN_OP, flop_handles, ms_deform_attn_flop_jit
from .ms_deform_attn import extension_status, kernel_available, ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "kernel_available",
    "extension_status",
    "MS_DEFORM_ATTN_OP",
    "flop_handles",
    "ms_deform_attn_flop_jit",
]
