"""Counting the host-device synchronisations of a piece of code, on any device.

On a GPU, every operation that needs a tensor's value on the host - `.item()`, `.tolist()`,
`.cpu()` / `.numpy()`, `bool()` / `int()` / `float()` of a tensor, `nonzero`, boolean-mask
indexing and other operations whose output shape depends on the data - waits until the
GPU has finished everything queued before it, and the step stalls. On the CPU the same
calls cost nothing, so a CPU timing cannot show them; counting them can, and does so on the
CPU as well as on the GPU.

    from di_maskdino.host_syncs import SyncCounter
    with SyncCounter() as syncs:
        loss = training_step()
    print(syncs.total, syncs.by_place())          # {"criterion.py:123 (item)": 6, ...}

`SyncCounter` is a `TorchFunctionMode`: it sees the calls that go through torch's Python
dispatch (tensor methods and torch functions), attributes each to the first frame outside
torch and this module, and lets the call run unchanged. Operations inside C++ code (a custom
operator, an autograd backward) are not seen.
"""

import collections
import inspect
import os
from typing import Callable, Dict

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SyncCounter", "SYNCING"]

_T = torch.Tensor
# calls that always bring a value to the host (the name they are reported under)
SYNCING: Dict[Callable, str] = {
    _T.item: "item",
    _T.tolist: "tolist",
    _T.numpy: "numpy",
    _T.__bool__: "bool",
    _T.__int__: "int",
    _T.__float__: "float",
    _T.__index__: "index",
    torch.nonzero: "nonzero",
    _T.nonzero: "nonzero",
    torch.argwhere: "nonzero",
    torch.masked_select: "masked_select",
    _T.masked_select: "masked_select",
    torch.unique: "unique",
    _T.unique: "unique",
    torch.unique_consecutive: "unique",
    torch.repeat_interleave: "repeat_interleave",
    torch.bincount: "bincount",
    _T.bincount: "bincount",
}
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIPPED = (os.path.dirname(torch.__file__), os.path.abspath(__file__))


def _host_copy(func, args, kwargs, count_cpu_copies: bool) -> bool:
    """`.cpu()` / `.to("cpu")` of a tensor on another device (or, with `count_cpu_copies`,
    of one on the CPU already: on a CPU run it stands for the copy a GPU run makes)."""
    if func not in (_T.cpu, _T.to) or not args or not isinstance(args[0], torch.Tensor):
        return False
    if func is _T.to:
        target = kwargs.get("device")
        if target is None:
            target = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
        if target is None or torch.device(target).type != "cpu":
            return False
    return args[0].device.type != "cpu" or count_cpu_copies


def _boolean_index(func, args) -> bool:
    """x[mask] with a bool mask: the output's size is the mask's count."""
    if func is not _T.__getitem__ or len(args) < 2:
        return False
    items = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _place() -> str:
    """file:line of the innermost frame outside torch and this module."""
    frame = inspect.currentframe()
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_SKIPPED):
            shown = os.path.relpath(path, _PACKAGE_PARENT) if path.startswith(_PACKAGE_PARENT) else path
            return f"{shown}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class SyncCounter(TorchFunctionMode):
    """Counts, by place, the calls that synchronise the host with the device (see the
    module's docstring).

    count_cpu_copies: also count `.cpu()` / `.to("cpu")` of tensors already on the CPU (on a
        CPU run they stand for the copies a GPU run makes).
    """

    def __init__(self, count_cpu_copies: bool = True):
        super().__init__()
        self.count_cpu_copies = count_cpu_copies
        self.counts: "collections.Counter[str]" = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = SYNCING.get(func)
        if kind is None and _boolean_index(func, args):
            kind = "boolean index"
        if kind is None and _host_copy(func, args, kwargs, self.count_cpu_copies):
            kind = "cpu"
        if kind is not None:
            self.counts[f"{_place()} ({kind})"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_place(self) -> Dict[str, int]:
        """{"file.py:line (kind)": count}, the most frequent first."""
        return dict(self.counts.most_common())
