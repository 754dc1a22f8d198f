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

The library itself never calls it: it is a process-wide choice (memory not given back to the
OS) that belongs to the application, and since the CPU seed chunks (fisnet.lrp,
CPU_SEED_CHUNK_BYTES: every block stays under glibc's 32 MB mmap ceiling) it no longer decides
the batched Original against the loop.  Measured without it (issue 11, `FISNET_MALLOC_TUNING=0
python bench/scaling.py --classes 2,10,40,100 --variants original,original_loop --threads 1
--repeats 3 --no-memory`, shared 2-core VM under load): batched 1,346 / 5,711 / 14,416 ms against
the loop's 1,870 / 7,979 / 18,260 ms at K = 10 / 40 / 100 (28 / 28 / 21 % faster); at K = 2 the
two tie within the noise with or without the tuning (466 vs 474 ms untuned; 15 repeats: 563 vs
512 untuned, 551 vs 560 tuned).
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
