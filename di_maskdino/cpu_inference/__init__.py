"""Speed-ups for inference on the CPU, turned on explicitly.

The model (`di_maskdino.modeling`) is the plain, readable reference: its forward pass uses
PyTorch's own operators and changes nothing outside itself. The speed-ups below are
separate, and each caller chooses them: the tools that profit (`tools/demo.py`,
`tools/train_net.py`'s evaluation, `tools/analyze_imbalance.py`, the benchmarks under
`dev/`) turn them on through the config key TEST.CPU_SPEEDUPS; a script does it the same
way, or hands a `CPUInference` to `Predictor.from_model`.

- Winograd convolutions (`winograd.py`): inside `CPUInference.context(...)`, around one
  forward pass, the eligible 3x3 stride-1 convolutions run by NNPACK's Winograd transform;
  results differ from the direct convolution by rounding only. Scoped to the context.
- Freed memory kept in the process (`memory.py`): glibc's malloc keeps large freed blocks
  for reuse instead of unmapping them. This one is PROCESS-WIDE and stays in force, so it is
  applied once, by the program that wants it (`CPUInference.apply_process_settings()`).
- `profiling.py`: where the CPU time of a forward pass goes (the benchmarks' breakdown).

    from di_maskdino import Predictor
    from di_maskdino.cpu_inference import CPUInference

    speedups = CPUInference()
    speedups.apply_process_settings()      # once: glibc keeps freed memory (process-wide)
    predictor = Predictor.from_model(model, cpu_inference=speedups)

Measured effects (R50 at 800 x 1333 and the quick-start model) are in docs/benchmarks.md.
"""

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Sequence, Union

import torch

from . import winograd
from .memory import retain_freed_memory

__all__ = ["CPUInference", "retain_freed_memory", "speedups_context"]


@dataclass(frozen=True)
class CPUInference:
    """Which CPU speed-ups a caller uses.

    winograd: 3x3 convolutions of large enough inputs by the Winograd transform, inside
        `context`.
    retain_freed_memory: `apply_process_settings` makes glibc keep freed memory.
    """

    winograd: bool = True
    retain_freed_memory: bool = True

    def runs_winograd(self, batch_shape: Sequence[int], device: Union[str, torch.device]) -> bool:
        """Whether `context` swaps convolutions for a preprocessed batch of shape
        (B, 3, H, W) on `device`: Winograd is chosen, the batch is on the CPU, NNPACK runs
        here, and the images are large enough for some convolution to qualify - eligible ones
        have `winograd.MIN_OUTPUT_PIXELS` output pixels per image, and the largest maps of
        the network are at 1/4 of the input (the backbone's first stage, the mask features),
        so smaller inputs skip the context and its cost per torch call."""
        height, width = batch_shape[-2:]
        large = (height // 4) * (width // 4) >= winograd.MIN_OUTPUT_PIXELS
        on_cpu = torch.device(device).type == "cpu"
        return self.winograd and large and on_cpu and winograd.winograd_available()

    def context(self, batch_shape: Sequence[int], device: Union[str, torch.device]) -> ContextManager:
        """The context one forward pass on a batch of shape (B, 3, H, W) runs in: Winograd
        convolutions when `runs_winograd`, otherwise none. Training and anything that records
        gradients are unaffected (the swap happens only without autograd)."""
        if self.runs_winograd(batch_shape, device):
            return winograd.winograd_convolutions()
        return contextlib.nullcontext()

    def apply_process_settings(self) -> bool:
        """Applies the process-wide setting (glibc keeps freed memory) when chosen; True when
        it is in force afterwards. Call it once, at the start of a program that runs many
        forward passes on the CPU."""
        return self.retain_freed_memory and retain_freed_memory()


def speedups_context(
    cpu_inference: "CPUInference | None", batch_shape: Sequence[int], device: Union[str, torch.device]
) -> ContextManager:
    """`cpu_inference.context(batch_shape, device)`, or no context when `cpu_inference` is None
    (the caller chose no speed-ups)."""
    return contextlib.nullcontext() if cpu_inference is None else cpu_inference.context(batch_shape, device)
