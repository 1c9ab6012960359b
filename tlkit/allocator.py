"""glibc's malloc told to hand large blocks straight back to the kernel, so peak memory stays flat.

glibc serves a block above its mmap threshold (128 KB at start) with mmap and unmaps it on free,
but each such free raises the threshold to that block's size (up to 32 MB): blocks of that size
then come from the heap arenas, which keep their freed pages resident. tlkit's streaming
allocates blocks of a few MB a batch (feature reads of about 8 MB, decoded images) from several
tf.data threads, so with the moving threshold a frozen `tlkit train` over a 224-px folder of
20,000 images peaked at 1.17-1.27x the run over 2,000 (benchmarks/streaming.py --train,
docs/performance.md); with the threshold fixed at 1 MB, 1.03-1.10x. Fixing it (mallopt(3)'s
M_MMAP_THRESHOLD) also turns the moving threshold off. A MALLOC_MMAP_THRESHOLD_ in the
environment is the user's own choice and stands; other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
THRESHOLD_BYTES = 1 << 20  # blocks above this are mapped and unmapped: a batch's buffers, not small objects


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at THRESHOLD_BYTES for this process; True where it was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's, in the process's own symbols
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
