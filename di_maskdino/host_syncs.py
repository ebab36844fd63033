"""Counting the host-device synchronisations of a piece of code, on the CPU as on a GPU.

On a GPU, every operation that needs the value of a tensor on the device - `.item()`,
`.tolist()`, `.cpu()` / `.numpy()`, `bool()` / `int()` / `float()`, `nonzero`, boolean-mask
indexing and other operations whose output size depends on the data - waits until the GPU
has finished everything queued before it, and the step stalls. On the CPU the same calls
cost nothing, so a CPU timing cannot show them; counting them can.

    from di_maskdino.host_syncs import SyncCounter
    with SyncCounter(model) as syncs:
        loss = training_step()
    print(syncs.total, syncs.by_place())     # {"di_maskdino/modeling/matcher.py:183 (cpu)": 24, ...}

To count on the CPU what a GPU run would do, the counter tells device tensors from host
tensors itself ("taint tracking"): the model's parameters and buffers are device tensors,
and so is every tensor computed from a device tensor, moved with `.to(device)` (a copy to
the device on a GPU run), or made by a factory with an explicit `device=`. Tensors made on
the host (indices from scipy, `torch.arange(n)` without a device, copies made by `.cpu()`)
are host tensors, and reading them is free. `SyncCounter` is a `TorchFunctionMode`: it sees
the calls that go through torch's Python dispatch (tensor methods and torch functions),
attributes each counted call to the first frame outside torch and this module, and lets the
call run unchanged. Operations in C++ (a custom operator, autograd's backward) are not seen;
an optimizer's own bookkeeping (its step counters live on the host) is not counted.
"""

import collections
import inspect
import os
import weakref
from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SyncCounter", "SYNCING"]

_T = torch.Tensor
# calls that bring a device tensor's value to the host (the name they are reported under)
SYNCING: Dict[Callable, str] = {
    _T.item: "item",
    _T.tolist: "tolist",
    _T.numpy: "numpy",
    _T.cpu: "cpu",
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
# calls whose result lives on the host whatever their input
_TO_HOST = {_T.cpu, _T.numpy, _T.tolist, _T.item}
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIPPED = (os.path.dirname(torch.__file__), os.path.abspath(__file__))
_OPTIMIZERS = os.path.join(os.path.dirname(torch.__file__), "optim")


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _boolean_index(func, args) -> bool:
    """x[mask] with a bool mask: the output's size is the mask's count."""
    if func is not _T.__getitem__ or len(args) < 2:
        return False
    items = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _moves_to_device(func, args, kwargs) -> bool:
    """`.to(device)` / `.cuda()` / a factory given `device=`: the result is a device tensor
    on a GPU run (`.to("cpu")` and `.to(dtype)` are not)."""
    if func is _T.to:
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        if isinstance(target, str):
            return torch.device(target).type != "cpu"
        return isinstance(target, torch.device)  # a tensor's device: the device on a GPU run
    return func is _T.cuda or kwargs.get("device") is not None


def _place() -> Optional[str]:
    """file:line of the innermost frame outside torch and this module, or None for a call
    made by an optimizer."""
    frame = inspect.currentframe()
    place = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(_OPTIMIZERS):
            return None
        if place is None and not path.startswith(_SKIPPED):
            shown = os.path.relpath(path, _PACKAGE_PARENT) if path.startswith(_PACKAGE_PARENT) else path
            place = f"{shown}:{frame.f_lineno}"
        frame = frame.f_back
    return place or "?"


class SyncCounter(TorchFunctionMode):
    """Counts, by place, the calls that read a device tensor on the host (see the module's
    docstring).

    model: its parameters and buffers are the first device tensors (others: inputs moved
        with `.to(device)`, and what is computed from device tensors).
    """

    def __init__(self, model: Optional[torch.nn.Module] = None):
        super().__init__()
        self.counts: "collections.Counter[str]" = collections.Counter()
        self._device: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
        if model is not None:
            for tensor in list(model.parameters()) + list(model.buffers()):
                self.mark_device(tensor)

    def mark_device(self, tensor: torch.Tensor) -> None:
        """Counts `tensor` as a device tensor."""
        self._device[id(tensor)] = tensor

    def on_device(self, tensor: torch.Tensor) -> bool:
        return self._device.get(id(tensor)) is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        from_device = any(self.on_device(t) for t in inputs)
        kind = SYNCING.get(func)
        if kind is None and _boolean_index(func, args):
            kind = "boolean index"
        if kind is not None and from_device:
            place = _place()
            if place is not None:
                self.counts[f"{place} ({kind})"] += 1
        result = func(*args, **kwargs)
        moved = _moves_to_device(func, args, kwargs)
        if func in (_T.cpu, _T.to) and args and result is args[0] and (moved or func is _T.cpu):
            # on a GPU run a move between host and device makes a new tensor; on the CPU the
            # same call returns its input, which must not carry the other side's label
            result = result.clone()
        if func not in _TO_HOST and (from_device or moved):
            for tensor in _tensors(result):
                self.mark_device(tensor)
            name = getattr(func, "__name__", "")
            in_place = name.endswith("_") or name == "__setitem__"
            if from_device and in_place and args and isinstance(args[0], torch.Tensor):
                self.mark_device(args[0])  # written in place with device values
        return result

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_place(self) -> Dict[str, int]:
        """{"file.py:line (kind)": count}, the most frequent first."""
        return dict(self.counts.most_common())
