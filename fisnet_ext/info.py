"""`python -m fisnet_ext.info`: which fisnet backends are usable here, and why not the others."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys


def report() -> list[tuple[str, bool, str]]:
    import torch

    import fisnet_ext
    from fisnet_ext import ops

    rows = []
    rows.append(("reference", True, "pure PyTorch, every device"))
    if ops.HAVE_C:
        rows.append(("cpp", True, "C++ CPU kernels in fisnet_ext._C"))
    else:
        rows.append(("cpp", False, f"fisnet_ext._C not importable ({ops.C_ERROR}); reinstall with "
                                   "`pip install --no-build-isolation -e .`; the reference is used instead"))
    cuda_ok = torch.cuda.is_available()
    if ops.WITH_CUDA and cuda_ok:
        rows.append(("cuda", True, f"CUDA kernels built; device: {torch.cuda.get_device_name(0)}"))
    elif ops.WITH_CUDA:
        rows.append(("cuda", False, "CUDA kernels built but no CUDA device is visible"))
    else:
        why = []
        if torch.version.cuda is None:
            why.append(f"this torch ({torch.__version__}) is a CPU build")
        if shutil.which("nvcc") is None:
            why.append("nvcc is not on PATH")
        if not why:
            why.append("the extension was built without FISNET_CUDA=1")
        rows.append(("cuda", False, "; ".join(why) + " (build with FISNET_CUDA=1 pip install --no-build-isolation -e .)"))
    if not ops.HAVE_TRITON:
        rows.append(("triton", False, "triton is not installed (pip install triton)"))
    elif cuda_ok:
        rows.append(("triton", True, f"Triton kernels on {torch.cuda.get_device_name(0)}"))
    elif os.environ.get("TRITON_INTERPRET") == "1":
        rows.append(("triton", True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1; slow, for tests)"))
    else:
        rows.append(("triton", False, "no CUDA device (set TRITON_INTERPRET=1 before import to run the "
                                      "kernels on CPU tensors, slowly)"))
    return rows


def main() -> int:
    import torch

    import fisnet_ext
    from fisnet_ext import ops

    print(f"fisnet_ext on Python {sys.version.split()[0]}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or 'none'})")
    for name, ok, why in report():
        print(f"  {name:10s} {'yes' if ok else 'no ':4s} {why}")
    cpu = ops.family(torch.device("cpu")).name
    print(f"default on CPU tensors: {'cpp' if cpu == 'native' else cpu}", end="")
    if torch.cuda.is_available():
        fam = ops.family(torch.device("cuda"))
        print(f"; on CUDA tensors: {'cuda' if fam.name == 'native' else fam.name}", end="")
    print(f"; forced backend: {fisnet_ext.current_backend()} (FISNET_BACKEND)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
