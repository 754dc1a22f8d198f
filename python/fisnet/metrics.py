"""Evaluation metrics: accuracy and the background relevance share.

``evaluate(model, data)`` — top-1 accuracy of a classifier (eval mode, no grad);
``background_share(model, data)`` — Σ|R| over the background / Σ|R| over the image, summed over
a test set, where R is the LRP-Flex heatmap (``fisnet.explain``) of each image's predicted
class. 0 means all relevance lies on the foreground (the masks' 1s), 1 all on the background.

``data`` is a Dataset or a DataLoader yielding ``(images, masks, labels)`` (a Dataset is batched
here, in order). The model is put in eval mode for the measurement and restored afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .loss import resize_masks
from .lrp import explain

__all__ = ["evaluate", "background_share", "evaluate_all", "as_loader"]


def as_loader(data, batch_size: int = 256) -> Iterable:
    """A Dataset becomes an in-order DataLoader; anything else is returned as is."""
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _device(model: nn.Module, device=None):
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _unpack(batch):
    if isinstance(batch, (list, tuple)):
        if len(batch) >= 3:
            return batch[0], batch[1], batch[2]
        if len(batch) == 2:
            return batch[0], None, batch[1]
    raise ValueError("expected batches of (images, masks, labels) or (images, labels)")


def evaluate(model: nn.Module, data, *, batch_size: int = 256, device=None,
             max_images: Optional[int] = None) -> float:
    """Top-1 accuracy (in [0, 1]) of ``model`` on ``data`` (a Dataset or a loader of
    ``(images, masks, labels)``), eval mode, no gradients."""
    dev = _device(model, device)
    correct, total = 0, 0
    with _eval_mode(model), torch.no_grad():
        for batch in as_loader(data, batch_size):
            x, _, y = _unpack(batch)
            if max_images is not None and total >= max_images:
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            pred = model(x).argmax(1)
            if y.dim() > 1:  # one-hot / probabilities
                y = y.argmax(1)
            correct += int((pred == y).sum())
            total += y.shape[0]
    if total == 0:
        raise ValueError("evaluate: the data is empty")
    return correct / total


def background_share(model: nn.Module, data, eps: float = 1e-2, zb: bool = True, *, bounds=(0.0, 1.0),
                     batch_size: int = 256, device=None, max_images: Optional[int] = None) -> float:
    """Σ|R| in the background / Σ|R| over ``data`` (SPEC: the background relevance share).

    R = ``fisnet.explain(model, x)`` for the predicted class, eval mode, batched; no graph is
    kept. Masks (1 = foreground) of another size than the images are resized (a cell is
    foreground if any pixel in it is); several mask channels are reduced to one."""
    dev = _device(model, device)
    bg_sum = torch.zeros((), dtype=torch.float64, device=dev)
    all_sum = torch.zeros((), dtype=torch.float64, device=dev)
    seen = 0
    with _eval_mode(model):
        for batch in as_loader(data, batch_size):
            if max_images is not None and seen >= max_images:
                break
            x, m, _ = _unpack(batch)
            if m is None:
                raise ValueError("background_share needs masks: batches of (images, masks, labels)")
            x, m = x.to(dev, non_blocking=True), m.to(dev, non_blocking=True)
            R = explain(model, x, None, eps=eps, zb=zb, bounds=bounds)  # (B, 1, C, H, W), detached
            A = R.abs().sum(dim=(1, 2)).double()  # (B, H, W)
            if m.dim() == 3:
                m = m[:, None]
            if m.shape[1] > 1:
                m = m.amax(dim=1, keepdim=True)
            if tuple(m.shape[-2:]) != tuple(A.shape[-2:]):
                m = resize_masks(m.float(), tuple(A.shape[-2:]))
            bg = 1.0 - (m[:, 0] > 0.5).double()
            bg_sum += (A * bg).sum()
            all_sum += A.sum()
            seen += x.shape[0]
    total = float(all_sum)
    return float(bg_sum) / total if total > 0 else float("nan")


def evaluate_all(model: nn.Module, test_sets: Dict[str, object], *, eps: float = 1e-2, zb: bool = True,
                 bounds=(0.0, 1.0), batch_size: int = 256, device=None, share: bool = True,
                 share_max_images: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """{name: {"accuracy": a, "background_share": s}} for every test set."""
    res = {}
    for name, data in test_sets.items():
        r = {"accuracy": evaluate(model, data, batch_size=batch_size, device=device)}
        if share:
            r["background_share"] = background_share(model, data, eps, zb, bounds=bounds, batch_size=batch_size,
                                                     device=device, max_images=share_max_images)
        res[name] = r
    return res
