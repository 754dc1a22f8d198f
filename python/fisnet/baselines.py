"""Baselines that the ISNet is compared with (``fisnet compare``).

RRR — "Right for the Right Reasons" (Ross, Hughes & Doshi-Velez, IJCAI 2017)
    Cross-entropy plus an input-gradient penalty in the background:

        loss = CE(z, y) + λ · (1/B) Σ_b Σ_{c,h,w} (1 − m_{b,h,w}) · (∂ Σ_k log softmax(z_b)_k / ∂x_{b,c,h,w})²

    with masks m (1 = foreground; resized to the image as in the heatmap loss and broadcast
    over the image channels). The penalty is the per-image sum over background pixels, averaged
    over the batch (so λ does not depend on the batch size; Ross et al. sum over the batch).
    The gradient is of the batch sum Σ_b Σ_k log p_{b,k}, taken with ``create_graph=True`` so
    the penalty is differentiable in the weights (a double backward through the model). With
    training-mode BatchNorm an image's gradient also flows through the batch statistics, i.e.
    the penalty sees the batch as the network does in training.

    :class:`RRRLoss` is the loss; the :class:`~fisnet.train.Trainer` uses it when
    ``TrainConfig(method="rrr", rrr_lambda=λ)`` (``fisnet train --method rrr --rrr-lambda λ``).

Choosing λ (:func:`choose_rrr_lambda`): the rule used by ``fisnet compare``. The biased
    *training* data is split: the last ``val_fraction`` (default 1/8) of the training images is
    held out as biased validation data, and for each λ of a grid (default 10, 100, 1000) a
    short RRR run (``epochs``, default 2) is trained on the rest, from the same initial
    weights. The chosen λ is the LARGEST one whose accuracy on the biased validation data is
    within ``tolerance`` (default 2) points of the best accuracy over the grid — the strongest
    background penalty that does not cost in-distribution accuracy. The test sets are never
    used. (Ross et al. set λ so that the two terms have the same order of magnitude; the grid
    rule is the same idea made explicit and reproducible.)
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .loss import resize_masks

__all__ = ["METHODS", "RRRLoss", "rrr_input_gradients", "rrr_penalty", "make_loss", "choose_rrr_lambda",
           "pick_lambda", "split_validation"]

METHODS = ("isnet", "rrr")
RRR_LAMBDAS = (10.0, 100.0, 1000.0)


def _fp32_at_least(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def rrr_input_gradients(model: nn.Module, x: torch.Tensor, create_graph: bool = True
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K), ∂ Σ_b Σ_k log softmax(z_b)_k / ∂x (B, C, H, W)). ``create_graph`` keeps the
    gradient differentiable in the weights (for training)."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        if logits.dim() != 2:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; RRR expects (B, K)")
        s = F.log_softmax(_fp32_at_least(logits), dim=1).sum()
        (g,) = torch.autograd.grad(s, xg, create_graph=create_graph)
    return logits, g


def _background(masks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 − foreground, (B, 1 or C, H, W) at the size of ``like`` (B, C, H, W)."""
    m = masks
    if m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[0] != like.shape[0]:
        raise ValueError(f"masks must be (B, 1 or C, H, W) for {like.shape[0]} images, got shape {tuple(masks.shape)}")
    if m.shape[1] not in (1, like.shape[1]):
        m = m.amax(dim=1, keepdim=True)
    if tuple(m.shape[-2:]) != tuple(like.shape[-2:]):
        m = resize_masks(m.float(), tuple(like.shape[-2:]))
    return 1.0 - (m > 0.5).to(like.dtype)


def rrr_penalty(grads: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_b Σ_{c,h,w} background · grads² — the RRR "right reasons" term (module docstring)."""
    bg = _background(masks.to(grads.device), grads)
    return (grads.pow(2) * bg).flatten(1).sum(1).mean()


class RRRLoss:
    """``CE(z, y) + lam · rrr_penalty`` as a Trainer loss: ``loss_fn(model, x, labels, masks)``.

    After each call ``.last`` holds detached 0-d tensors ``"ce"``, ``"rrr"`` (the penalty,
    unweighted) and ``"loss"`` (plus ``"heatmap"``/``"background"``/``"foreground"`` = None,
    the keys of :class:`~fisnet.ISNetLoss`)."""

    def __init__(self, lam: float = 1.0):
        lam = float(lam)
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"the RRR weight lambda must be a finite number >= 0, got {lam}")
        self.lam = lam
        self.last: Dict[str, Any] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                 epoch: Optional[int] = None) -> torch.Tensor:
        logits, g = rrr_input_gradients(model, x, create_graph=torch.is_grad_enabled())
        ce = F.cross_entropy(_fp32_at_least(logits), labels)
        pen = rrr_penalty(_fp32_at_least(g), masks)
        loss = ce + self.lam * pen
        self.last = {"ce": ce.detach(), "rrr": pen.detach(), "loss": loss.detach(), "P": 0.0,
                     "heatmap": None, "background": None, "foreground": None}
        return loss

    def __repr__(self) -> str:
        return f"RRRLoss(lam={self.lam})"


def make_loss(cfg) -> Callable:
    """The Trainer's loss for ``cfg.method`` (a :class:`~fisnet.train.TrainConfig`)."""
    if cfg.method == "rrr":
        return RRRLoss(cfg.rrr_lambda)
    raise ValueError(f"unknown training method {cfg.method!r}; choose one of {', '.join(METHODS)}")


def split_validation(train_set: Dataset, val_fraction: float = 0.125) -> Tuple[Dataset, Dataset]:
    """(first part, last ``val_fraction``) of a training set, in order (deterministic)."""
    n = len(train_set)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"a training set of {n} images is too small to hold out {val_fraction:.0%} for validation")
    return Subset(train_set, range(n - n_val)), Subset(train_set, range(n - n_val, n))


def pick_lambda(val_accuracy: Dict[float, float], tolerance: float = 2.0) -> float:
    """The largest λ whose validation accuracy (in [0, 1]) is within ``tolerance`` points of the best."""
    if not val_accuracy:
        raise ValueError("pick_lambda needs at least one (lambda, accuracy) pair")
    best = max(val_accuracy.values())
    return max(lam for lam, a in val_accuracy.items() if 100.0 * (best - a) <= tolerance + 1e-9)


def choose_rrr_lambda(make_model: Callable[[], nn.Module], train_set: Dataset, config, *,
                      lambdas: Sequence[float] = RRR_LAMBDAS, epochs: int = 2, val_fraction: float = 0.125,
                      tolerance: float = 2.0, progress: bool = True) -> Dict[str, Any]:
    """The λ rule of the module docstring. ``make_model()`` returns the fresh (same-seed) model;
    ``config`` is the :class:`~fisnet.train.TrainConfig` of the final run (its optimiser, lr,
    batch size and seed are reused; epochs are set to ``epochs``). Returns
    ``{"lambda": λ, "val_accuracy": {λ: acc}, "rule": text, "epochs": epochs, "n_val": n}``."""
    from .metrics import evaluate
    from .train import Trainer
    if not lambdas:
        raise ValueError("choose_rrr_lambda needs at least one candidate lambda")
    fit_set, val_set = split_validation(train_set, val_fraction)
    accs: Dict[float, float] = {}
    for lam in lambdas:
        cfg = copy.deepcopy(config)
        cfg.method, cfg.rrr_lambda, cfg.epochs = "rrr", float(lam), int(epochs)
        cfg.progress = progress
        cfg.run_name = f"rrr lambda={lam:g} (choosing)"
        tr = Trainer(make_model(), fit_set, None, None, cfg)
        tr.fit()
        accs[float(lam)] = evaluate(tr.model, val_set, batch_size=cfg.eval_batch_size, device=tr.device)
        if progress:
            print(f"[rrr] lambda {lam:g}: biased validation accuracy {100 * accs[float(lam)]:.1f}%", flush=True)
    chosen = pick_lambda(accs, tolerance)
    return {"lambda": chosen, "val_accuracy": {f"{k:g}": v for k, v in accs.items()},
            "rule": f"largest lambda whose biased-validation accuracy is within {tolerance:g} points of the best "
                    f"over the grid ({epochs}-epoch runs on the first {1 - val_fraction:.1%} of the training set; "
                    f"validation = the last {val_fraction:.1%})",
            "epochs": int(epochs), "n_val": len(val_set)}
