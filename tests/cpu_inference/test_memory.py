"""retain_freed_memory: freed large blocks are reused without page faults (Linux, glibc)."""

import platform
import resource
import subprocess
import sys

import pytest

# 64 MiB blocks, allocated, written and freed in turn; prints the minor page faults of the
# last eight blocks, after eight which fault their pages in either way (with freed memory
# retained, the heap settles over the first few: how many depends on what the process
# allocated before, e.g. the modules it imported)
PROGRAM = """
import resource, sys
import torch
from di_maskdino.cpu_inference.memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory() is True
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(2**24).fill_(1.0)
before = faults()
for _ in range(8):
    torch.empty(2**24).fill_(1.0)
print(faults() - before)
"""


def _faults_of_eight_blocks(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (Linux); other C libraries are left alone"
)
def test_freed_blocks_are_reused_without_page_faults():
    pages = 2**26 // resource.getpagesize()  # of one block
    system = _faults_of_eight_blocks("system")
    if system < 0.9 * 8 * pages:
        pytest.skip(f"the system allocator faulted {system:.0f} pages for eight blocks of {pages} (huge pages?)")
    retained = _faults_of_eight_blocks("retain")
    # malloc's own mmap faults every page of every block in; the retained heap at most one
    # block's more as it settles (a block placed past the first), then none
    assert retained <= 1.1 * pages, (system, retained)
