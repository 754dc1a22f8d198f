"""Evaluation metrics: accuracy, the background relevance share and localisation.

``evaluate(model, data)`` — top-1 accuracy of a classifier (eval mode, no grad);
``background_share(model, data)`` — Σ|R| over the background / Σ|R| over the image, summed over
a test set, where R is the LRP-Flex heatmap (``fisnet.explain``) of each image's predicted
class. 0 means all relevance lies on the foreground (the masks' 1s), 1 all on the background.

Localisation (per image, then averaged over the images of a test set), on the pixel map
``r = Σ_{M,C} R`` (the LRP-ε map of the predicted class summed over channels):

* ``relevance_mass`` (relevance mass accuracy, Arras et al. 2022): Σ_{mask} r⁺ / Σ r⁺ with
  r⁺ = max(r, 0) — the share of the positive relevance that lies inside the mask; an image
  whose map has no positive value scores 0. 1 = all positive evidence on the foreground.
* ``pointing_game`` (Zhang et al. 2018): 1 when the map's maximum lies inside the mask, i.e.
  the largest foreground value is > 0 and strictly larger than every background value (a tie
  with a background pixel is a miss), else 0.

``relevance_metrics(model, data)`` computes the background share and both localisation
scores from one heatmap pass; ``relevance_mass(R, masks)`` / ``pointing_game(R, masks)`` score
given maps.

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

__all__ = ["evaluate", "background_share", "evaluate_all", "as_loader", "relevance_mass", "pointing_game",
           "relevance_metrics"]


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
                     batch_size: int = 256, device=None, max_images: Optional[int] = None, rules=None) -> float:
    """Σ|R| in the background / Σ|R| over ``data`` (docs/spec.md: the background relevance share).

    R = ``fisnet.explain(model, x)`` for the predicted class, eval mode, batched; no graph is
    kept. Masks (1 = foreground) of another size than the images are resized (a cell is
    foreground if any pixel in it is); several mask channels are reduced to one. ``rules``:
    overrides of the LRP rule table (fisnet.rules), as in ``explain``."""
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
            R = explain(model, x, None, eps=eps, zb=zb, bounds=bounds, rules=rules)  # (B, 1, C, H, W), detached
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


def _pixel_map(R: torch.Tensor) -> torch.Tensor:
    """(B, M, C, H, W) / (B, C, H, W) / (B, H, W) relevance → (B, H, W), summed over M and C."""
    if R.dim() < 3:
        raise ValueError(f"heatmaps must be (B, H, W), (B, C, H, W) or (B, M, C, H, W), got shape {tuple(R.shape)}")
    while R.dim() > 3:
        R = R.sum(1)
    return R


def _fg_mask(masks: torch.Tensor, size) -> torch.Tensor:
    """Masks (B, H', W') or (B, C', H', W'), 1 = foreground → bool (B, H, W) at ``size``."""
    m = masks
    if m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4:
        raise ValueError(f"masks must be (B, H, W) or (B, C, H, W), got shape {tuple(masks.shape)}")
    if m.shape[1] > 1:
        m = m.amax(dim=1, keepdim=True)
    if tuple(m.shape[-2:]) != tuple(size):
        m = resize_masks(m.float(), tuple(size))
    return m[:, 0] > 0.5


def relevance_mass(R: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image (B,) float64: Σ_{mask} r⁺ / Σ r⁺ of the pixel map r = Σ_{M,C} R (0 where r⁺ is all 0)."""
    r = _pixel_map(R.detach()).double().clamp_min(0)
    fg = _fg_mask(masks.to(r.device), r.shape[-2:])
    if fg.shape[0] != r.shape[0]:
        raise ValueError(f"{r.shape[0]} heatmaps but {fg.shape[0]} masks")
    tot = r.flatten(1).sum(1)
    inside = (r * fg).flatten(1).sum(1)
    return torch.where(tot > 0, inside / tot.clamp_min(1e-300), torch.zeros_like(tot))


def pointing_game(R: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image (B,) float64 in {0, 1}: 1 when the maximum of r = Σ_{M,C} R lies in the mask
    (largest foreground value > 0 and > every background value)."""
    r = _pixel_map(R.detach()).double()
    fg = _fg_mask(masks.to(r.device), r.shape[-2:])
    if fg.shape[0] != r.shape[0]:
        raise ValueError(f"{r.shape[0]} heatmaps but {fg.shape[0]} masks")
    ninf = torch.tensor(float("-inf"), dtype=r.dtype, device=r.device)
    fg_max = torch.where(fg, r, ninf).flatten(1).amax(1)
    bg_max = torch.where(fg, ninf, r).flatten(1).amax(1)
    return ((fg_max > 0) & (fg_max > bg_max)).double()


def relevance_metrics(model: nn.Module, data, eps: float = 1e-2, zb: bool = True, *, bounds=(0.0, 1.0),
                      batch_size: int = 256, device=None, max_images: Optional[int] = None,
                      rules=None) -> Dict[str, float]:
    """{"background_share", "relevance_mass", "pointing_game"} over ``data`` from one pass of
    LRP-ε maps of the predicted class (eval mode; see the module docstring). The share is the
    pooled ratio Σ|R|_bg / Σ|R| as in :func:`background_share`; the two localisation scores are
    means over images. ``rules``: overrides of the LRP rule table (fisnet.rules), as in ``explain``."""
    dev = _device(model, device)
    bg_sum = torch.zeros((), dtype=torch.float64, device=dev)
    all_sum = torch.zeros((), dtype=torch.float64, device=dev)
    mass_sum = torch.zeros((), dtype=torch.float64, device=dev)
    hit_sum = torch.zeros((), dtype=torch.float64, device=dev)
    seen = 0
    with _eval_mode(model):
        for batch in as_loader(data, batch_size):
            if max_images is not None and seen >= max_images:
                break
            x, m, _ = _unpack(batch)
            if m is None:
                raise ValueError("relevance_metrics needs masks: batches of (images, masks, labels)")
            x, m = x.to(dev, non_blocking=True), m.to(dev, non_blocking=True)
            R = explain(model, x, None, eps=eps, zb=zb, bounds=bounds, rules=rules)
            A = R.abs().sum(dim=(1, 2)).double()
            fg = _fg_mask(m, A.shape[-2:])
            bg_sum += (A * (~fg)).sum()
            all_sum += A.sum()
            mass_sum += relevance_mass(R, m).sum()
            hit_sum += pointing_game(R, m).sum()
            seen += x.shape[0]
    if seen == 0:
        raise ValueError("relevance_metrics: the data is empty")
    total = float(all_sum)
    return {"background_share": float(bg_sum) / total if total > 0 else float("nan"),
            "relevance_mass": float(mass_sum) / seen, "pointing_game": float(hit_sum) / seen}


def evaluate_all(model: nn.Module, test_sets: Dict[str, object], *, eps: float = 1e-2, zb: bool = True,
                 bounds=(0.0, 1.0), batch_size: int = 256, device=None, share: bool = True,
                 share_max_images: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """{name: {"accuracy": a, "background_share": s, "relevance_mass": m, "pointing_game": p}}
    for every test set (the last three when ``share``)."""
    res = {}
    for name, data in test_sets.items():
        r = {"accuracy": evaluate(model, data, batch_size=batch_size, device=device)}
        if share:
            r.update(relevance_metrics(model, data, eps, zb, bounds=bounds, batch_size=batch_size,
                                       device=device, max_images=share_max_images))
        res[name] = r
    return res
