"""SyncCounter against a hand-made function whose synchronisations are known, line by line."""

import inspect
import os

import torch

from di_maskdino.host_syncs import SyncCounter

HERE = os.path.relpath(os.path.abspath(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def known(x: torch.Tensor):
    """Seven calls that need values on the host, and some that do not."""
    total = x.sum().item()  # item
    values = x.tolist()  # tolist
    if x.max() > 0:  # bool
        total += 1
    where = x.nonzero()  # nonzero
    positive = x[x > 0]  # boolean index
    on_host = x.cpu()  # cpu (a copy a GPU run makes)
    first = int(x[0])  # int
    # none of these waits for the device
    y = (x * 2 + 1).relu().sum(0)
    z = torch.where(x > 0, x, torch.zeros_like(x))[:2]
    return total, values, where, positive, on_host, first, y, z


def line_of(text: str) -> int:
    source, start = inspect.getsourcelines(known)
    return start + next(i for i, line in enumerate(source) if text in line)


def test_counts_every_synchronisation_by_place():
    x = torch.tensor([1.0, -2.0, 3.0, 0.5])
    with SyncCounter() as syncs:
        known(x)
    expected = {
        f"{HERE}:{line_of('.item()')} (item)": 1,
        f"{HERE}:{line_of('.tolist()')} (tolist)": 1,
        f"{HERE}:{line_of('x.max() > 0')} (bool)": 1,
        f"{HERE}:{line_of('.nonzero()')} (nonzero)": 1,
        f"{HERE}:{line_of('x[x > 0]')} (boolean index)": 1,
        f"{HERE}:{line_of('x.cpu()')} (cpu)": 1,
        f"{HERE}:{line_of('int(x[0])')} (int)": 1,
    }
    assert syncs.by_place() == expected
    assert syncs.total == 7


def test_copies_of_cpu_tensors_can_be_left_out():
    x = torch.tensor([1.0, 2.0])
    with SyncCounter(count_cpu_copies=False) as syncs:
        x.cpu()
        x.to("cpu")
        x.to(torch.float64)  # a cast, not a copy to the host
        x.item() if x.numel() == 1 else x[0].item()
    assert syncs.total == 1 and list(syncs.by_place())[0].endswith("(item)")
    with SyncCounter() as syncs:
        x.to("cpu")
        x.to(device="cpu")
        x.to(torch.float64)
    assert syncs.total == 2


def test_nested_code_is_attributed_to_its_own_line():
    def helper(t):
        return t.sum().item()

    with SyncCounter() as syncs:
        for _ in range(3):
            helper(torch.ones(2))
    ((place, count),) = syncs.by_place().items()
    assert count == 3 and place.endswith(f":{inspect.getsourcelines(helper)[1] + 1} (item)")
