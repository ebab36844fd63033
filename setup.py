"""Builds the `di_maskdino` package and its compiled operators `di_maskdino._C`.

The C++ CPU kernels are always built. The CUDA kernels are added when a CUDA toolkit is
found and either a GPU is visible or FORCE_CUDA=1 is set (for building on a machine
without a GPU, e.g. a cluster login node). TORCH_CUDA_ARCH_LIST picks the GPU
architectures; without a visible GPU it defaults to DEFAULT_CUDA_ARCHS below.

    pip install --no-build-isolation -e .          # CPU kernels (+ CUDA if a GPU is visible)
    FORCE_CUDA=1 pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "di_maskdino: PyTorch must be installed before building this package "
        "(pip install -r requirements.txt), and pip must be run with --no-build-isolation "
        "so that the build sees it."
    )

# Turing (T4) to Blackwell; the trailing +PTX lets newer GPUs JIT-compile the kernels.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
HERE = os.path.dirname(os.path.abspath(__file__))


def _build_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if CUDA_HOME is None:
            sys.exit("di_maskdino: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME.")
        return True
    return CUDA_HOME is not None and torch.cuda.is_available()


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
    extension = CppExtension
    if _build_cuda():
        extension = CUDAExtension
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
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


setup(
    name="di_maskdino",
    version="0.1.0",
    description="DI-MaskDINO: joint object detection and instance segmentation (NeurIPS 2024)",
    python_requires=">=3.9",
    packages=find_packages(include=["di_maskdino", "di_maskdino.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
