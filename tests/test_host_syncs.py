"""SyncCounter against hand-made functions whose synchronisations are known, line by line."""

import inspect
import os

import torch

from di_maskdino.host_syncs import SyncCounter

HERE = os.path.relpath(os.path.abspath(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def known(x: torch.Tensor):
    """Seven calls that read device values on the host, and some that do not."""
    total = x.sum().item()  # item
    values = x.tolist()  # tolist
    if x.max() > 0:  # bool
        total += 1
    where = x.nonzero()  # nonzero
    positive = x[x > 0]  # boolean index
    on_host = x.cpu()  # cpu
    first = int(x[0])  # int
    # none of these waits for the device
    y = (x * 2 + 1).relu().sum(0)
    z = torch.where(x > 0, x, torch.zeros_like(x))[:2]
    host = torch.arange(4)  # made on the host: reading it is free
    free = host.tolist() + [int(host.sum()), on_host.sum().item()]
    return total, values, where, positive, y, z, first, free


def line_of(function, text: str) -> int:
    source, start = inspect.getsourcelines(function)
    return start + next(i for i, line in enumerate(source) if text in line)


def test_counts_every_read_of_a_device_tensor_by_place():
    x = torch.tensor([1.0, -2.0, 3.0, 0.5])
    syncs = SyncCounter()
    syncs.mark_device(x)
    with syncs:
        known(x)
    expected = {
        f"{HERE}:{line_of(known, '.item()  # item')} (item)": 1,
        f"{HERE}:{line_of(known, '.tolist()  # tolist')} (tolist)": 1,
        f"{HERE}:{line_of(known, 'x.max() > 0')} (bool)": 1,
        f"{HERE}:{line_of(known, '.nonzero()')} (nonzero)": 1,
        f"{HERE}:{line_of(known, 'x[x > 0]')} (boolean index)": 1,
        f"{HERE}:{line_of(known, 'x.cpu()')} (cpu)": 1,
        f"{HERE}:{line_of(known, 'int(x[0])')} (int)": 1,
    }
    assert syncs.by_place() == expected
    assert syncs.total == 7


def moves(x: torch.Tensor, indices: torch.Tensor, optimizer):
    """Host indices moved to the device are device tensors; an optimizer's step is not counted."""
    on_device = indices.to(x.device)  # a copy to the device: no wait
    picked = x[on_device]
    count = torch.zeros(3, device=x.device)  # made on the device
    count.add_(1)
    optimizer.step()
    return picked.sum().item(), int(count.sum()), indices.sum().item()  # two reads of device values


def test_device_tensors_are_followed_through_moves_factories_and_in_place_writes():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    module = torch.nn.Module()
    module.weight = weight
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.sum().backward()
    with SyncCounter(module) as syncs:
        moves(weight.detach(), torch.tensor([0, 2]), optimizer)
    line = line_of(moves, "two reads")
    assert syncs.by_place() == {f"{HERE}:{line} (item)": 1, f"{HERE}:{line} (int)": 1}


def test_nested_code_is_attributed_to_its_own_line():
    def helper(t):
        return t.sum().item()

    device = torch.ones(2)
    syncs = SyncCounter()
    syncs.mark_device(device)
    with syncs:
        for _ in range(3):
            helper(device)
    ((place, count),) = syncs.by_place().items()
    assert count == 3 and place.endswith(f":{inspect.getsourcelines(helper)[1] + 1} (item)")


def test_moves_are_seen_when_a_harness_replaced_the_tensor_methods(monkeypatch):
    """dev/benchmark_training.py runs CUDA-only code on the CPU by replacing `Tensor.cuda` and
    `Tensor.to`; a move made through the replacements still makes a device tensor."""
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: to(self, *a, **k))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: to(self, torch.device("cpu")))
    with SyncCounter() as syncs:
        torch.ones(2).cuda().sum().item()
        torch.ones(2).to(torch.device("cpu")).sum().item()
        torch.ones(2).sum().item()  # a host tensor: free
    assert syncs.total == 2
