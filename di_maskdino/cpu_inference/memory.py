"""Keeping freed CPU memory in the process, for inference on the CPU.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh
`mmap` and gives it back to the kernel when the block is freed. A forward pass of DI-MaskDINO
at detection resolution allocates and frees such blocks all the time (R50 at 800 x 1333: the
encoder's feed-forward activations on ~22k tokens are 183 MB each, the 1/4-resolution mask
features 69 MB), so every pass faults all of them in again, page by page: about a million
page faults per image, measured with `dev/benchmark_model.py` (it prints them).
`retain_freed_memory()` tells malloc to take large blocks from its heap instead and to keep
what is freed there, so the next pass reuses pages already mapped.

It changes no result, only where memory comes from; it is process-wide and stays in force
(the process keeps what its heap once held instead of returning it, more than the peak if
images of varying sizes fragment it). Training, whose tensors are mostly small or held across
the step, is not measurably faster with it; CPU inference is (docs/benchmarks.md).

NOTE: it covers the main thread, where a forward pass normally runs. glibc gives each other
thread its own arena of at most 64 MiB heaps and still maps larger blocks there afresh. An
allocator preloaded in glibc's place (tcmalloc, jemalloc) answers mallopt as it sees fit;
those allocators keep freed memory by themselves.
"""

import ctypes
import sys

__all__ = ["retain_freed_memory"]

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: the largest free top of the heap that is kept rather than trimmed
_LARGEST_KEPT_TOP = 2**31 - 1


def retain_freed_memory() -> bool:
    """Makes glibc malloc keep freed memory for reuse (no mmap, no trimming of the heap).

    Returns True when applied; False where the C library is not glibc - macOS, Windows,
    musl - whose allocators need no such setting or offer none (nothing is changed), or
    where glibc refused a setting.
    Same effect as starting the process with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:
        return False
    # gnu_get_libc_version is glibc's own: musl also has a mallopt, which ignores these settings
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _LARGEST_KEPT_TOP) == 1
