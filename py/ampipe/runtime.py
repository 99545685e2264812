"""Process-wide settings for ampipe's CPU processes (a rank, a benchmark).

`keep_freed_memory()`: glibc's malloc returns freed blocks above a threshold to the kernel
(`munmap`, or a trim of the heap top) and raises that threshold as it sees large frees, so
whether a 1-10 MB activation lands in pages it already owns or in fresh ones (a page fault
per 4 KiB, zero-filled) depends on the allocation history. A training step allocates and frees
the same sizes every step, so with the default the same step costs a different amount from run
to run, and the pipelined block (more, smaller tensors alive at once) pays more of it than the
baseline: `python -m ampipe.bench.pipeline` prints the one-chunk plan's overhead over the
baseline block with this setting, and with ``AMPIPE_MALLOC=default`` without it (docs/pipeline.md
has the figures). Both blocks run faster with it. This is what CPU training stacks do with tcmalloc or jemalloc
(e.g. Intel's extension for PyTorch); here it is two `mallopt` calls, no preload.

`AMPIPE_MALLOC=default` leaves glibc as it is (the environment variables `MALLOC_*_` win too).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "freed_memory_kept"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit
_done = False


def keep_freed_memory() -> bool:
    """Keep freed memory in the process (no trim) and fix glibc's mmap threshold at 32 MiB.
    Returns whether it was applied (Linux with glibc, not opted out, not set by MALLOC_*_)."""
    global _done
    if _done:
        return True
    if (not sys.platform.startswith("linux") or os.environ.get("AMPIPE_MALLOC") == "default"
            or "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` took effect in this process."""
    return _done
