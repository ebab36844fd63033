#!/usr/bin/env python
"""Reports what this installation has and checks the compiled operator against its
pure-PyTorch reference on every device it serves. Exits non-zero on a mismatch.

    python tools/check_install.py
"""

import importlib.util
import sys

import torch

from di_maskdino.ops import extension_status, kernel_available, ms_deform_attn, ms_deform_attn_reference


def _check_operator(device: torch.device) -> float:
    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[12, 17], [6, 9], [3, 5]])
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(2, int(sizes.sum()), 4, 8, generator=generator, dtype=torch.float64)
    locations = torch.rand(2, 50, 4, 3, 4, 2, generator=generator, dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(2, 50, 4, 3, 4, generator=generator, dtype=torch.float64)
    inputs = [t.to(device) for t in (value, shapes, starts, locations, weights)]
    return (ms_deform_attn(*inputs) - ms_deform_attn_reference(*inputs)).abs().max().item()


def main() -> int:
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA build {torch.version.cuda}), "
        f"GPU visible: {torch.cuda.is_available()}"
    )
    print(f"di_maskdino operators: {extension_status()}")
    if importlib.util.find_spec("detectron2") is None:
        print("detectron2: not installed (needed for training, evaluation and the demo)")
    else:
        import detectron2

        print(f"detectron2: {detectron2.__version__}")
    failed = False
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        if not kernel_available(device):
            print(f"ms_deform_attn on {device}: no compiled kernel, the reference is used")
            continue
        error = _check_operator(device)
        ok = error < 1e-10
        failed |= not ok
        print(
            f"ms_deform_attn on {device}: kernel vs reference max |diff| = {error:.2e} ({'ok' if ok else 'MISMATCH'})"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
