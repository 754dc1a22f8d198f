"""Where a run computes: the device (with clear errors), determinism, mixed precision."""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch


def resolve_device(name: Optional[str]) -> torch.device:
    """``torch.device(name)``, with a clear error when CUDA is asked for but not available."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise ValueError(f"device {name!r}: this PyTorch build ({torch.__version__}) has no CUDA support; "
                             f"use --device cpu or install a CUDA build of PyTorch")
        raise ValueError(f"device {name!r}: PyTorch {torch.__version__} was built with CUDA but sees no GPU "
                         f"(driver, CUDA_VISIBLE_DEVICES?); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def choose_device(name: Optional[str], world: int) -> torch.device:
    """The run's device: ``name``, else the GPU of this rank (LOCAL_RANK) when there is one, else
    the CPU; a bare "cuda" becomes this rank's GPU. Makes a GPU the current CUDA device."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if name is not None:
        dev = resolve_device(name)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def make_deterministic() -> None:
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def mixed_precision(amp: bool, device: torch.device) -> Tuple[Optional[torch.dtype], Optional[object]]:
    """(autocast dtype, GradScaler): bfloat16 where the GPU supports it, else float16 with a
    scaler; (None, None) without ``amp`` or off CUDA."""
    if not (amp and device.type == "cuda"):
        return None, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dtype, (torch.amp.GradScaler("cuda") if dtype == torch.float16 else None)


def autocast(dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)
