"""Process-level CPU performance settings for long fisnet runs.

`tune_cpu_malloc()` stops glibc's malloc from giving large blocks back to the OS.  By default
glibc serves every block over its mmap threshold (at most 32 MB) with a fresh `mmap` and unmaps
it on free, so each large tensor is page-faulted in anew: on the 2-core VM of the benchmarks an
element-wise kernel on an 80 MB tensor ran 6x slower per element than on a 2 MB one, and the
batched Original ISNet (K maps per image in one pass, tensors K times larger) lost to a per-class
loop because of it.  With mmap off and a high trim threshold, freed memory is reused without page
faults.  Measured side by side (`bench/scaling.py`, small_cnn width 16, batch 32, 2 threads,
docs/status.md): the batched Original went from slower than the loop to faster at every K; the
plain and Faster steps keep their ratios.

The cost: the process keeps its peak heap (as PyTorch's CUDA caching allocator keeps GPU
memory).  The `fisnet` commands call it (opt out with FISNET_MALLOC_TUNING=0); library users
may call it themselves.  A no-op returning False where malloc is not glibc's.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_malloc"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_done = False


def tune_cpu_malloc(trim_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Keep freed heap memory for reuse (glibc): no mmap for large blocks, trim only above
    `trim_threshold` bytes of free top memory, grow the heap `top_pad` bytes at a time.  Returns
    True when applied.  Honours FISNET_MALLOC_TUNING=0 (then does nothing)."""
    global _done
    if _done:
        return True
    if os.environ.get("FISNET_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)),
                                             (_M_TOP_PAD, min(top_pad, 2**31 - 1))))
    _done = ok
    return ok
