"""Multi-process set-up under ``torchrun`` (``WORLD_SIZE > 1``): the process group, the launcher
watchdog, the initial weights, the gradient all-reduce and the epoch sums."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Tuple

import torch
import torch.nn as nn


def dist():
    import torch.distributed as d
    return d


def world_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


_WATCHDOG = []


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """Under torchrun: end this worker when the launcher dies (kill -9 of torchrun otherwise leaves
    the workers running, blocked in a collective). A daemon thread polls the parent pid."""
    if _WATCHDOG or not os.environ.get("TORCHELASTIC_RUN_ID") or os.name != "posix":
        return
    import signal
    import threading
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"fisnet: rank {os.environ.get('RANK', '?')}: the torchrun launcher (pid {parent}) is gone; "
                      f"exiting", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                os._exit(143)
    t = threading.Thread(target=watch, name="fisnet-launcher-watchdog", daemon=True)
    t.start()
    _WATCHDOG.append(t)


def init_distributed(device: Optional[str]) -> Tuple[int, int]:
    """(rank, world size). With ``WORLD_SIZE > 1``: joins (or reuses) the process group, NCCL when
    CUDA is available and ``device`` is not "cpu", else gloo."""
    world = world_from_env()
    if world <= 1:
        return 0, world
    exit_with_launcher()
    d = dist()
    if not d.is_initialized():
        d.init_process_group("nccl" if (torch.cuda.is_available() and device != "cpu") else "gloo")
    return d.get_rank(), d.get_world_size()


def broadcast_initial_state(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (the same initial weights everywhere)."""
    d = dist()
    for t in list(model.parameters()) + list(model.buffers()):
        d.broadcast(t.data, src=0)


def allreduce_gradients(model: nn.Module, world: int) -> None:
    """The manual path: sum every gradient over the ranks (one flat all-reduce) and divide by N."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist().all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g))
        off += n


def allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place; returned)."""
    dist().all_reduce(t)
    return t


def barrier() -> None:
    dist().barrier()
