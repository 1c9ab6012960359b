"""glibc's mmap threshold, fixed when tlkit is imported (tlkit/allocator.py): freed blocks of a
few MB go back to the kernel instead of staying resident in the heap."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Allocates 100 blocks of 2 MB after one free of a 4 MB block (which, left to glibc, raises its
# threshold above 2 MB), frees all but the last (which pins the heap's top) and prints how much
# more is resident than before: about 200 MB where the blocks came from the heap, 2 where mapped.
RETAINED = """
import ctypes, sys
{setup}
def resident_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(4 << 20))
before = resident_mb()
blocks = []
for _ in range(100):
    block = libc.malloc(2 << 20)
    ctypes.memset(block, 1, 2 << 20)  # touched: resident
    blocks.append(block)
for block in blocks[:-1]:
    libc.free(block)
print(resident_mb() - before)
"""


def retained_mb(setup: str, env: dict | None = None) -> float:
    done = subprocess.run([sys.executable, "-c", RETAINED.format(setup=setup)], capture_output=True, text=True,
                          env=env, check=True)
    return float(done.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_importing_tlkit_hands_freed_blocks_of_a_few_mb_back_to_the_kernel():
    assert retained_mb("") > 100  # glibc left alone: the freed blocks stay resident (what the test can see)
    assert retained_mb("import tlkit") < 20
    assert retained_mb("import tlkit; assert not tlkit.allocator.fix_mmap_threshold()",
                       env={"MALLOC_MMAP_THRESHOLD_": "33554432", "PATH": "/usr/bin:/bin"}) > 100  # the user's own
