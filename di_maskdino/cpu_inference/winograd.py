"""3x3 convolutions by the Winograd transform on the CPU (NNPACK), for inference.

oneDNN computes every convolution of a batch-1 forward directly. For a 3x3 kernel with stride
1, NNPACK's Winograd transform (its choice for 3x3 kernels: 8 x 8 input tiles give 6 x 6
outputs) needs about 5x fewer multiplications, paid for by extra passes over memory for the
transforms; in float32 it differs from the direct result by rounding only (about 1e-5 of
the output's largest value per convolution, tests/ops/test_winograd.py). PyTorch ships NNPACK
but, with oneDNN enabled, does not use it for these convolutions. NNPACK applies Winograd to
one image at a time (for a batch it chooses among other algorithms, FFT among them), so the
operator runs the images of a batch one by one: every image gets the same algorithm as
alone.

Measured on the 2-core development CPU (2 threads, the convolutions of R50 at 800 x 1333):
the two 256-channel 3x3 convolutions at 1/4 resolution (the mask features) take 0.17 s each
instead of 0.43 s, the ResNet's sixteen 3x3 convolutions 0.30 s instead of 0.44 s together.

    from di_maskdino.cpu_inference.winograd import winograd_convolutions
    with torch.inference_mode(), winograd_convolutions():
        detections = model.detect(batch)          # eager, or a torch.compile'd function

Inside the context every eligible `torch.nn.functional.conv2d` call (so every `nn.Conv2d` and
detectron2 `Conv2d`) runs the operator `torch.ops.di_maskdino.winograd_conv2d_3x3`; all others
run unchanged. Eligible: float32 CPU tensors, a 4-D input, a 3 x 3 kernel, stride 1, dilation
1, one group, zero padding of 0, 1 or 2 pixels, at least `MIN_CHANNELS` input and output
channels and `MIN_OUTPUT_PIXELS` output pixels per image (height x width), and no gradient
wanted (the operator has no backward) nor autocast active (autocast's convolutions run in its
lower precision).

The size limits are where NNPACK starts to win on the development CPU: it transforms the
kernel at every call, a cost that small maps do not repay (64 -> 64 channels: 4.3x the direct
time at 8 x 8, 1.2x at 32 x 32, 0.95x at 64 x 64, 0.55x at 128 x 128; 3 -> 64 channels at 128
x 128: 1.4x). The context itself costs about 5 us per torch call (8 ms of the quick-start
model's 35 ms at 128 x 128), so callers enter it only for inputs large enough to have eligible
convolutions (`CPUInference.context`).

The operator has a fake kernel, so `torch.compile` traces it (the compiled graph calls it),
but `torch.export` / ONNX archives should be made outside the context: they would need this
module to run. NNPACK keeps its own thread pool, sized by `torch.get_num_threads()` at its
first convolution in the process: set the thread count before the first call.
"""

import contextlib
import functools
from typing import Any, List, Optional

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "WINOGRAD_OP",
    "winograd_available",
    "winograd_conv2d_3x3",
    "winograd_convolutions",
    "winograd_conv_flop_jit",
    "MIN_CHANNELS",
    "MIN_OUTPUT_PIXELS",
]

WINOGRAD_OP = "di_maskdino::winograd_conv2d_3x3"
MIN_CHANNELS = 64
MIN_OUTPUT_PIXELS = 64 * 64


@functools.lru_cache(maxsize=None)
def winograd_available() -> bool:
    """Whether this PyTorch has NNPACK and it runs on this CPU (x86 with AVX2, or ARM with
    NEON). The first call also initialises NNPACK, which its convolution needs."""
    return hasattr(torch, "_nnpack_spatial_convolution") and bool(torch.backends.nnpack.is_available())


@torch.library.custom_op(WINOGRAD_OP, mutates_args=(), device_types="cpu")
def winograd_conv2d_3x3(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: List[int]
) -> torch.Tensor:
    """conv2d(input, weight, bias, stride=1, padding=padding) of float32 CPU tensors with a
    3 x 3 kernel, computed by NNPACK's Winograd transform one image at a time. No autograd."""
    if not winograd_available():
        raise RuntimeError(
            "winograd_conv2d_3x3: NNPACK is not available in this PyTorch build or on this CPU "
            "(check torch.backends.nnpack.is_available()); use torch.nn.functional.conv2d"
        )
    weight = weight.contiguous()
    images = [
        torch._nnpack_spatial_convolution(image.contiguous(), weight, bias, list(padding)) for image in input.split(1)
    ]
    return images[0] if len(images) == 1 else torch.cat(images)


@winograd_conv2d_3x3.register_fake
def _winograd_conv2d_3x3_fake(input, weight, bias, padding):
    batch, _, height, width = input.shape
    out_height = height + 2 * padding[0] - 2
    out_width = width + 2 * padding[1] - 2
    return input.new_empty((batch, weight.shape[0], out_height, out_width))


def _pair(value) -> Optional[tuple]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None  # "same" / "valid" strings and anything unexpected: not rerouted


def _conv2d_arguments(args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    values = dict(zip(names, defaults))
    values.update(zip(names, args))
    values.update(kwargs)
    return values


def _winograd_eligible(call) -> bool:
    input, weight, bias = call["input"], call["weight"], call["bias"]
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    padding = _pair(call["padding"])
    if not (
        input.dim() == 4
        and tuple(weight.shape[-2:]) == (3, 3)
        and _pair(call["stride"]) == (1, 1)
        and _pair(call["dilation"]) == (1, 1)
        and call["groups"] == 1
        and padding is not None
        and all(0 <= p <= 2 for p in padding)
    ):
        return False
    _, in_channels, height, width = input.shape
    out_height, out_width = height + 2 * padding[0] - 2, width + 2 * padding[1] - 2
    large = out_height >= 1 and out_width >= 1 and out_height * out_width >= MIN_OUTPUT_PIXELS
    return min(in_channels, weight.shape[0]) >= MIN_CHANNELS and large


class _WinogradConvolutions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:  # torch.conv2d too: the same function
            call = _conv2d_arguments(args, kwargs)
            if _winograd_eligible(call):
                return winograd_conv2d_3x3(call["input"], call["weight"], call["bias"], list(_pair(call["padding"])))
        return func(*args, **kwargs)


def winograd_conv_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore FLOP handle (`FlopCountAnalysis(...).set_op_handle(**{WINOGRAD_OP: ...})`): the
    Winograd convolution counted as the direct convolution it computes (as fvcore counts
    `conv`), so that a count does not depend on the algorithm."""
    from fvcore.nn.jit_handles import conv_flop_count, get_shape

    return conv_flop_count(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0]))


def winograd_convolutions(enabled: bool = True):
    """A context in which eligible 3x3 convolutions (see the module's docstring) run by
    NNPACK's Winograd transform. A no-op context when `enabled` is False or NNPACK is not
    available here."""
    if not enabled or not winograd_available():
        return contextlib.nullcontext()
    return _WinogradConvolutions()
