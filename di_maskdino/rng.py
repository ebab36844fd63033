"""The random number generators of a process as data: saved into checkpoints, restored on
resume, and kept unchanged around work that must not disturb them (evaluation during
training, data mapping in the training process)."""

import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["rng_states", "set_rng_states", "preserved_rng"]


def rng_states() -> Dict[str, Any]:
    """The RNG states of this process: torch (CPU and every CUDA device), numpy, python, in
    types a weights-only `torch.load` reads back."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Restores what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class preserved_rng:
    """Context manager: the RNG states of this process are the same after the block as
    before it (evaluation during training must not change what training draws next)."""

    def __enter__(self):
        self._states = rng_states()
        return self

    def __exit__(self, *exc):
        set_rng_states(self._states)
        return False
