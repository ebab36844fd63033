"""Imports of dependencies that report on their own internals when first imported; the one
place where this project quiets anything a dependency prints.

- fvcore.nn and detectron2.modeling script functions with torch.jit at import time, which
  torch deprecates: a FutureWarning ("`torch.jit.script` is deprecated") about code that
  neither this project nor its user calls. `import_quietly` imports such a module with that
  one warning filtered, for the duration of the import only.
- torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when it is
  imported on a machine with a CUDA toolkit but no GPU (detectron2 imports it when it
  collects the environment, Inductor when it compiles): a note about building CUDA code, not
  about running a model. `import_build_helper_quietly` imports it with its logger at ERROR
  for the import only; any later message of the helper prints.

- DistributedDataParallel with `find_unused_parameters` (which the trainer sets for CPU
  processes, to keep the gradient buckets' layout and resume exactly) warns at the first
  backward that no parameter was unused and that the flag costs a walk of the autograd
  graph: expected, and quieted by `quiet_unused_parameter_hint` in those processes only.

Every other warning and log message shows as its source writes it.
"""

import importlib
import logging
import sys
import warnings
from types import ModuleType

__all__ = ["import_quietly", "import_build_helper_quietly", "quiet_unused_parameter_hint"]

JIT_SCRIPT_DEPRECATION = r".*`torch\.jit\.script` is deprecated.*"


def import_quietly(name: str) -> ModuleType:
    """`importlib.import_module(name)` without torch's deprecation warning of torch.jit.script."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_SCRIPT_DEPRECATION, category=FutureWarning)
        return importlib.import_module(name)


def import_build_helper_quietly() -> None:
    """Imports torch.utils.cpp_extension with its import-time log line muted, on a machine
    without CUDA (where that line concerns building CUDA code only)."""
    import torch

    if torch.cuda.is_available() or "torch.utils.cpp_extension" in sys.modules:
        return
    helper = logging.getLogger("torch.utils.cpp_extension")
    level = helper.level
    helper.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        helper.setLevel(level)


def quiet_unused_parameter_hint() -> None:
    """Ignores DDP's hint that find_unused_parameters found no unused parameter (in this
    process, which chose the flag on purpose)."""
    warnings.filterwarnings("ignore", message=r"find_unused_parameters=True was specified in DDP constructor")
