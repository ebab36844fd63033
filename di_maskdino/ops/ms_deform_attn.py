"""Multi-scale deformable attention (MSDeformAttn) as a PyTorch custom operator.

Shape glossary:
    B   batch size
    S   value tokens of all levels, sum over levels of H_l * W_l
    Q   queries
    L   feature levels
    P   sampling points per level and head
    C_h channels per head

The compiled kernels of ``di_maskdino._C`` (``csrc/``) register the operators
``torch.ops.di_maskdino.ms_deform_attn_forward`` / ``..._backward`` for CPU and CUDA. This
module adds what PyTorch needs around them - the autograd formula and fake (meta) kernels
for ``torch.compile`` - and the public function :func:`ms_deform_attn`. Where no kernel is
available (extension not built, or built without CUDA and called on a GPU) the pure-PyTorch
reference runs instead, and says so once.

Precision: the kernels read ``value`` in its own dtype (float64, float32, float16 or
bfloat16) and accumulate in float32 (float64 for float64 values); sampling locations and
attention weights are passed in that accumulation type. There is no autocast policy: under
autocast, ``value`` arrives in the autocast dtype from its linear projection and stays so,
which is what halves the memory of the tensor saved for the backward.
"""

import warnings
from typing import Optional, Tuple

import torch

from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "kernel_available", "extension_status"]


def _load_extension() -> Tuple[Optional[object], str]:
    try:
        import di_maskdino._C as _C
    except ModuleNotFoundError as error:
        if error.name != "di_maskdino._C":
            raise
        return None, (
            "the compiled extension di_maskdino._C is not built; build it from the repository "
            "root with `pip install --no-build-isolation -e .`"
        )
    except ImportError as error:
        return None, (
            f"the compiled extension di_maskdino._C failed to load ({error}); it was probably "
            "built against another PyTorch: rebuild it with `pip install --no-build-isolation -e .`"
        )
    return _C, ""


_C, _UNAVAILABLE = _load_extension()
# Decided once here: kernel_available runs inside torch.compile'd code, where a call into the
# extension (a pybind function) would break the graph at every attention layer.
_CUDA_COMPILED = _C is not None and bool(_C.compiled_with_cuda())
_KERNEL_DEVICE_TYPES = frozenset(() if _C is None else (("cpu", "cuda") if _CUDA_COMPILED else ("cpu",)))
_fallback_announced = False


def extension_status() -> str:
    """A one-line description of which kernels this installation has."""
    if _C is None:
        return "pure-PyTorch reference only: " + _UNAVAILABLE
    return "compiled kernels: CPU" + (" and CUDA" if _CUDA_COMPILED else " (CUDA not compiled)")


def kernel_available(device: torch.device) -> bool:
    """Whether a compiled kernel serves tensors on `device`."""
    return device.type in _KERNEL_DEVICE_TYPES


def _announce_fallback(device: torch.device) -> None:
    global _fallback_announced
    if _fallback_announced:
        return
    _fallback_announced = True
    reason = _UNAVAILABLE if _C is None else f"di_maskdino._C has no kernel for {device.type} tensors"
    if _C is not None and device.type == "cuda":
        reason += "; rebuild with a visible GPU or FORCE_CUDA=1"
    warnings.warn(
        f"ms_deform_attn falls back to the slower pure-PyTorch reference: {reason}.",
        RuntimeWarning,
        stacklevel=3,
    )


if _C is not None:
    _OP = "di_maskdino::ms_deform_attn_forward"
    _BACKWARD_OP = "di_maskdino::ms_deform_attn_backward"

    @torch.library.register_fake(_OP)
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, _, heads, channels = value.shape
        return value.new_empty((batch, sampling_locations.shape[1], heads * channels))

    @torch.library.register_fake(_BACKWARD_OP)
    def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        # The kernels return contiguous gradients, whatever the strides of their inputs.
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape),
        )

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.di_maskdino.ms_deform_attn_backward(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (B, S, heads, C_h), got shape {tuple(value.shape)}")
    batch, _, heads, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be (B, Q, heads, L, P, 2), "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    _, queries, loc_heads, levels, points, _ = sampling_locations.shape
    if sampling_locations.shape[0] != batch or loc_heads != heads:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} and value "
            f"{tuple(value.shape)} disagree on batch size or number of heads"
        )
    expected = (batch, queries, heads, levels, points)
    if tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"ms_deform_attn: attention_weights must have shape (B, Q, heads, L, P) = {expected}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (levels, 2) or tuple(level_start_index.shape) != (levels,):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be ({levels}, 2) and level_start_index ({levels},) "
            f"for {levels} levels, got {tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}"
        )
    for name, tensor in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not tensor.is_floating_point():
            raise TypeError(f"ms_deform_attn: {name} must be a floating-point tensor, got {tensor.dtype}")


def _kernel_dtypes(value, sampling_locations, attention_weights) -> Tuple[torch.dtype, torch.dtype]:
    """(dtype of value, dtype of locations and weights) for the kernels: float64 throughout if
    any input is float64; otherwise value keeps its dtype and the others are float32."""
    if torch.float64 in (value.dtype, sampling_locations.dtype, attention_weights.dtype):
        return torch.float64, torch.float64
    return value.dtype, torch.float32


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention: every query takes, per head, a weighted sum of
    values bilinearly sampled at L * P locations.

    Args:
        value: (B, S, heads, C_h) values of all levels, flattened level by level.
        spatial_shapes: (L, 2) integer (H_l, W_l) of every level.
        level_start_index: (L,) first token of every level in S.
        sampling_locations: (B, Q, heads, L, P, 2) (x, y) locations; [0, 1] spans the map,
            pixel centres at (i + 0.5) / W_l; samples falling outside read zeros.
        attention_weights: (B, Q, heads, L, P) weight of every sample (normally softmaxed
            over L * P).

    Returns:
        (B, Q, heads * C_h) tensor in the dtype of `value`. float16 and bfloat16 values are
        read as they are and summed in float32; locations and weights are converted to
        float32 (float64 if any input is float64).
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    value_dtype, location_dtype = _kernel_dtypes(value, sampling_locations, attention_weights)
    device = value.device
    spatial_shapes = spatial_shapes.to(device=device, dtype=torch.long)
    level_start_index = level_start_index.to(device=device, dtype=torch.long)
    sampling_locations = sampling_locations.to(location_dtype)
    attention_weights = attention_weights.to(location_dtype)
    if kernel_available(device):
        output = torch.ops.di_maskdino.ms_deform_attn_forward(
            value.to(value_dtype), spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    else:
        _announce_fallback(device)
        output = ms_deform_attn_reference(
            value.to(location_dtype), spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return output.to(value.dtype)
