"""Multi-process set-up under ``torchrun`` (``WORLD_SIZE > 1``): the process group, the launcher
watchdog, the initial weights, DistributedDataParallel (or the manual gradient all-reduce) and the
epoch sums."""
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


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel``: its reducer all-reduces (and averages) the gradients
    in buckets during the final backward, overlapping it. The heatmap backward
    (``autograd.grad(create_graph=True)`` inside the ISNet forward) differentiates with respect to
    activations, so no AccumulateGrad node runs there and the reducer's hooks fire once per step,
    in ``loss.backward()``. No buffer broadcast before each forward (``broadcast_buffers=False`` /
    ``forward_sync_buffers=False``): each rank keeps its own BatchNorm running statistics, as with
    the manual all-reduce (only rank 0's are saved and evaluated)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    # newer PyTorch names it forward_sync_buffers (broadcast_buffers is deprecated there); both still
    # broadcast rank 0's buffers once at construction, as broadcast_initial_state already did
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None, **no_sync)


def unwrapped_names(out):
    """An ISNet output of the DDP-wrapped model with its LDS heatmaps renamed from the wrapper's
    ``module.<layer>`` to the model's own ``<layer>``."""
    maps = out.heatmaps
    if not isinstance(maps, dict):
        return out
    import dataclasses
    return dataclasses.replace(out, heatmaps={(k[len("module."):] if k.startswith("module.") else k): v
                                              for k, v in maps.items()})


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
