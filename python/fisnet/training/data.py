"""The training data of a run: a DistributedSampler (the order of epoch e is a function of
(seed, e) only, so resuming is exact) and its DataLoader of 1/N of each global batch."""
from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


def check_global_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} (global) must be divisible by the number of "
                         f"processes {world}")


def make_loader(train_set: Dataset, *, batch_size: int, seed: int, num_workers: int, rank: int, world: int,
                device: torch.device) -> Tuple[DistributedSampler, DataLoader]:
    """(sampler, loader); ``batch_size`` is the global batch (:func:`check_global_batch`)."""
    check_global_batch(batch_size, world)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    loader = DataLoader(train_set, batch_size=batch_size // world, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    return sampler, loader


def unpack_batch(b):
    """(images, masks, labels) of a training batch."""
    if isinstance(b, (list, tuple)) and len(b) >= 3:
        return b[0], b[1], b[2]
    raise ValueError("training batches must be (images, masks, labels)")


def to_device(batch, device: torch.device):
    return tuple(t.to(device, non_blocking=True) for t in unpack_batch(batch))
