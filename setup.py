"""Builds the `di_maskdino` package and its compiled operators `di_maskdino._C`.

The C++ CPU kernels are always built. The CUDA kernels are added when a GPU is visible or
FORCE_CUDA=1 is set (for building on a machine without a GPU, e.g. a cluster login node),
and a CUDA toolkit is found:

    pip install --no-build-isolation -e .          # CPU kernels (+ CUDA if a GPU is visible)
    FORCE_CUDA=1 pip install --no-build-isolation -e .

The toolkit is CUDA_HOME (or CUDA_PATH) if set, else the root the `nvcc` on PATH reports
(`nvcc --dryrun` prints it; `nvcc` itself may be a wrapper script elsewhere), else
/usr/local/cuda. TORCH_CUDA_ARCH_LIST picks the GPU architectures; when it is unset the
visible GPUs' are used, and without a GPU DEFAULT_CUDA_ARCHS, less those the toolkit's nvcc
is too old for.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Mapping, Optional, Sequence, Tuple

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "di_maskdino: PyTorch must be installed before building this package "
        "(pip install -r requirements.txt), and pip must be run with --no-build-isolation "
        "so that the build sees it."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
# Turing (T4) to Blackwell; the newest kept gets +PTX, so that newer GPUs JIT-compile it.
DEFAULT_CUDA_ARCHS = ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")
# The first nvcc release that compiles for each architecture (CUDA toolkit release notes).
FIRST_NVCC_FOR_ARCH = {
    "7.5": (10, 0),
    "8.0": (11, 0),
    "8.6": (11, 1),
    "8.9": (11, 8),
    "9.0": (11, 8),
    "10.0": (12, 8),
    "12.0": (12, 8),
}
CUDA_HOME_HINT = (
    "set CUDA_HOME to the root of the CUDA toolkit, the directory that holds bin/nvcc and "
    "lib64/libcudart.so (for example CUDA_HOME=/usr/local/cuda-12.4)"
)


def _has_any(root: str, patterns: Sequence[str]) -> bool:
    return any(glob.glob(os.path.join(root, pattern)) for pattern in patterns)


def toolkit_problem(root: str) -> Optional[str]:
    """Why `root` is not a usable CUDA toolkit root, or None if it is."""
    if not os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return f"{root} has no bin/nvcc"
    if not _has_any(root, ["lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*"]):
        return f"{root} has no libcudart.so (in lib64/, lib/ or targets/*/lib/)"
    if not _has_any(root, ["include/cuda_runtime.h", "targets/*/include/cuda_runtime.h"]):
        return f"{root} has no include/cuda_runtime.h"
    return None


def _root_reported_by(nvcc: str) -> Optional[str]:
    """The toolkit root an nvcc works from: `nvcc --dryrun` prints it as TOP=<root>/bin/.."""
    try:
        completed = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", completed.stdout + completed.stderr, re.MULTILINE)
    if match is None:
        return None
    return os.path.realpath(match.group(1).strip().strip('"'))  # TOP is <root>/bin/..


def find_cuda_home(
    env: Mapping[str, str] = os.environ, fallbacks: Sequence[str] = ("/usr/local/cuda",)
) -> Tuple[Optional[str], str]:
    """(toolkit root, how it was found) or (None, why none was found)."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            problem = toolkit_problem(env[name])
            if problem is None:
                return env[name], f"{name}"
            return None, f"{name}={env[name]} is not a CUDA toolkit root: {problem}"
    reasons = []
    nvcc = shutil.which("nvcc", path=env.get("PATH", ""))
    if nvcc is None:
        reasons.append("no nvcc on PATH")
    else:
        candidates = [_root_reported_by(nvcc), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
        for root in candidates:
            if root is not None and toolkit_problem(root) is None:
                return root, f"the toolkit of {nvcc}"
        reasons.append(f"cannot tell the toolkit of {nvcc} ({toolkit_problem(candidates[-1])})")
    for root in fallbacks:
        if os.path.isdir(root):
            problem = toolkit_problem(root)
            if problem is None:
                return os.path.realpath(root), root
            reasons.append(problem)
    return None, "; ".join(reasons)


def nvcc_version(root: str) -> Optional[Tuple[int, int]]:
    try:
        completed = subprocess.run(
            [os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", completed.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else None


def default_arch_list(version: Optional[Tuple[int, int]]) -> str:
    """DEFAULT_CUDA_ARCHS that nvcc `version` compiles (an unknown version: those of CUDA
    11.8, the oldest toolkit PyTorch 2 builds with), the newest with +PTX."""
    known = version if version is not None else (11, 8)
    archs = [a for a in DEFAULT_CUDA_ARCHS if known >= FIRST_NVCC_FOR_ARCH[a]]
    if not archs:
        sys.exit(f"di_maskdino: nvcc {known[0]}.{known[1]} is too old for every architecture in {DEFAULT_CUDA_ARCHS}")
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def _build_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if not (force or torch.cuda.is_available()):
        return False
    if torch.version.cuda is None:
        if force:
            sys.exit(f"di_maskdino: FORCE_CUDA=1 but this PyTorch ({torch.__version__}) is built without CUDA.")
        return False
    root, how = find_cuda_home()
    if root is None:
        message = f"di_maskdino: no CUDA toolkit found ({how}); {CUDA_HOME_HINT}"
        if force:
            sys.exit(message)
        print(message + ". Building the CPU kernels only.", file=sys.stderr)
        return False
    # torch.utils.cpp_extension read CUDA_HOME when it was imported (from `which nvcc`, which
    # may be a wrapper outside the toolkit): give it the root found here.
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    version = nvcc_version(root)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(version)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "those of the visible GPUs")
    shown = "unknown" if version is None else f"{version[0]}.{version[1]}"
    print(f"di_maskdino: CUDA kernels with the toolkit at {root} ({how}, nvcc {shown}) for architectures {archs}")
    return True


def _openmp_flags() -> list:
    # ATen's parallel_for is an inline OpenMP region when torch uses the OpenMP backend;
    # without -fopenmp our kernels would silently run on one thread.
    if "OpenMP" in torch.__config__.parallel_info() and sys.platform != "darwin":
        return ["-fopenmp"]
    return []


def get_extensions() -> list:
    csrc = os.path.join(HERE, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    openmp = _openmp_flags()
    extra_compile_args = {"cxx": ["-O3"] + openmp}
    extra_link_args = list(openmp)
    define_macros = []
    extension = cpp_extension.CppExtension
    if _build_cuda():
        extension = cpp_extension.CUDAExtension
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3"]
    return [
        extension(
            "di_maskdino._C",
            [os.path.relpath(s, HERE) for s in sources],
            include_dirs=[csrc],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


if __name__ == "__main__":  # also true under pip (setuptools runs this file as __main__)
    setup(
        name="di_maskdino",
        version="0.1.0",
        description="DI-MaskDINO: joint object detection and instance segmentation (NeurIPS 2024)",
        python_requires=">=3.9",
        packages=find_packages(include=["di_maskdino", "di_maskdino.*"]),
        ext_modules=get_extensions(),
        cmdclass={"build_ext": cpp_extension.BuildExtension},
        zip_safe=False,
    )
