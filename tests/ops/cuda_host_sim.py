"""Builds the host simulation of the CUDA kernels (csrc/host_sim/host_sim.cpp): the CUDA entry
points of csrc/cuda/ms_deform_attn_cuda.cu and their kernels compiled for the host, with every
launch run on simulated CUDA threads. Built once and cached under build/host_sim/ (ninja
rebuilds it when a source or header changes)."""

import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


@functools.lru_cache(maxsize=None)
def load_host_sim():
    from torch.utils.cpp_extension import load

    build_directory = ROOT / "build" / "host_sim"
    build_directory.mkdir(parents=True, exist_ok=True)
    return load(
        name="di_maskdino_cuda_host_sim",
        sources=[str(CSRC / "host_sim" / "host_sim.cpp"), str(CSRC / "checks.cpp")],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O2"],
        build_directory=str(build_directory),
        verbose=False,
    )
