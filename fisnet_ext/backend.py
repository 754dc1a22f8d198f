"""Which implementation runs each op.

Backends: "cpp" (C++ CPU kernels), "cuda" (C++/CUDA kernels, when built with FISNET_CUDA=1),
"triton" (Triton kernels: GPUs, or CPU tensors under TRITON_INTERPRET=1), "reference"
(pure PyTorch).  The default ("auto") picks, per call, the fastest correct one for the tensor's
device: cpp on CPU; cuda, else triton, else reference on a GPU.  Force one with the environment
variable FISNET_BACKEND or, scoped to a block, `with fisnet_ext.use_backend("triton"): ...`.
The forced choice is kept per thread and does not change results beyond rounding.
"""
from __future__ import annotations

import contextlib
import os
import threading

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")

_local = threading.local()


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fisnet backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def current_backend() -> str:
    name = getattr(_local, "name", None)
    if name is None:
        name = _check(os.environ.get("FISNET_BACKEND", "auto") or "auto")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block with one backend (for tests and benchmarks)."""
    _check(name)
    old = getattr(_local, "name", None)
    _local.name = name
    try:
        yield
    finally:
        _local.name = old
