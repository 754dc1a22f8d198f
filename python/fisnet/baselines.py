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

segment_then_classify — a segmenter trained on the masks, then the classifier on its output
    :class:`SmallSegmenter` is a small fully-convolutional net (3×3 convolutions of width 16 with
    dilations 1, 2, 4, 8, 1 — a receptive field of 33 pixels, enough to tell a digit from a small
    background marker — then a 1×1 convolution to one channel of foreground logits).
    :func:`train_segmenter` fits it to a dataset's masks (binary cross-entropy with logits;
    foreground = mask > 0.5, several mask channels reduced with a max, masks of another size
    resized as in the heatmap loss), with Adam and its own seeded random state (the caller's
    global random state is left as it was). :func:`predict_masks` thresholds its sigmoid
    (foreground where σ(logit) > ``threshold``, default 0.5); :func:`mask_iou` scores predicted
    masks against true ones.

    The classifier is then trained as a plain classifier (P = 0, cross-entropy only) on
    :class:`PredictedBackgroundZeroed` (each image times its *predicted* foreground; the items
    keep the TRUE masks, so the background share and the localisation scores of an evaluation
    are measured against the real foreground). :class:`SegmentThenClassify` is the pipeline
    at test time: ``pipe(x) = classifier(x · [σ(segmenter(x)) > threshold])``; its heatmaps are
    those of the classifier on the masked input, ``fisnet.explain(pipe.classifier,
    pipe.mask_input(x))`` (the segmenter is not explained: its mask is a hard gate).
    ``fisnet train --method segment_then_classify`` and ``fisnet compare`` use it
    (docs/compare.md).
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .loss import resize_masks

__all__ = ["METHODS", "RRRLoss", "rrr_input_gradients", "rrr_penalty", "make_loss", "choose_rrr_lambda",
           "pick_lambda", "split_validation", "SmallSegmenter", "train_segmenter", "predict_masks", "mask_iou",
           "PredictedBackgroundZeroed", "SegmentThenClassify"]

METHODS = ("isnet", "rrr", "segment_then_classify")
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
    if cfg.method == "segment_then_classify":
        raise ValueError("segment_then_classify has no loss of its own: train the segmenter with train_segmenter(), "
                         "then the classifier with method='isnet', P=0 on PredictedBackgroundZeroed(train_set, "
                         "segmenter) (fisnet.baselines)")
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


# ----------------------------------------------------------------------------- segment_then_classify

class SmallSegmenter(nn.Module):
    """Foreground logits of an image: (B, C, H, W) → (B, 1, H, W) (module docstring).

    3×3 convolutions of ``width`` channels with dilations ``dilations`` (padding = dilation, so
    the size is kept), each followed by BatchNorm (when ``batchnorm``) and ReLU, then a 1×1
    convolution to one channel. The receptive field is 1 + 2 Σ dilations (33 pixels by default)."""

    def __init__(self, in_channels: int = 1, width: int = 16, dilations: Sequence[int] = (1, 2, 4, 8, 1),
                 batchnorm: bool = True):
        super().__init__()
        if in_channels < 1 or width < 1 or not dilations or min(dilations) < 1:
            raise ValueError(f"SmallSegmenter needs in_channels >= 1, width >= 1 and dilations >= 1, got "
                             f"in_channels={in_channels}, width={width}, dilations={tuple(dilations)}")
        layers: List[nn.Module] = []
        c = int(in_channels)
        for d in dilations:
            layers.append(nn.Conv2d(c, width, 3, padding=int(d), dilation=int(d), bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            c = width
        layers.append(nn.Conv2d(c, 1, 1))
        self.body = nn.Sequential(*layers)
        self.in_channels, self.width, self.dilations = int(in_channels), int(width), tuple(int(d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _foreground_targets(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Masks (B, H', W') or (B, C', H', W') → float (B, 1, H, W) in {0, 1}: foreground = mask > 0.5,
    channels reduced with a max, resized to ``size`` as in the heatmap loss (``resize_masks``)."""
    m = masks
    if m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4:
        raise ValueError(f"masks must be (B, H, W) or (B, C, H, W), got shape {tuple(masks.shape)}")
    m = m.float()
    if m.shape[1] > 1:
        m = m.amax(dim=1, keepdim=True)
    if tuple(m.shape[-2:]) != tuple(size):
        m = resize_masks(m, tuple(size))
    return (m > 0.5).float()


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _default_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _foreground(segmenter: nn.Module, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool (B, 1, H, W): σ(segmenter(x)) > threshold, eval mode, no gradients."""
    with torch.no_grad(), _eval_mode(segmenter):
        return torch.sigmoid(segmenter(x).float()) > threshold


def _batches(data: Dataset, batch_size: int, shuffle: bool = False,
             generator: Optional[torch.Generator] = None) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)


def train_segmenter(train_set: Dataset, *, epochs: int = 3, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                    device: Optional[Union[str, torch.device]] = None, progress: bool = True, width: int = 16,
                    batchnorm: bool = True, name: str = "segmenter") -> SmallSegmenter:
    """A :class:`SmallSegmenter` fitted to the masks of ``train_set`` (items ``(image, mask, label)``).

    Binary cross-entropy with logits against foreground = mask > 0.5 (module docstring), Adam
    with ``lr``, batches of ``batch_size`` in an order drawn from ``seed``, ``epochs`` passes.
    Deterministic given ``seed`` (on the CPU): the weights are initialised and the batches
    shuffled under a forked, seeded random state, so the caller's global random state is left
    as it was. ``progress``: a progress bar (on a terminal) and one printed line per epoch.
    Returns the segmenter in eval mode on ``device`` (default: cuda if available), with
    ``.history`` = one ``{"epoch", "loss", "time_s"}`` per epoch (loss = mean batch loss)."""
    from .training.logs import progress_bar
    epochs, batch_size = int(epochs), int(batch_size)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"train_segmenter needs epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
    if len(train_set) == 0:
        raise ValueError("train_segmenter: the training set is empty")
    dev = _default_device(device)
    in_ch = int(train_set[0][0].shape[0])
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    history: List[Dict[str, float]] = []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        seg = SmallSegmenter(in_ch, width=width, batchnorm=batchnorm).to(dev)
        opt = torch.optim.Adam(seg.parameters(), lr=lr)
        loader = _batches(train_set, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        seg.train()
        for epoch in range(1, epochs + 1):
            t = time.perf_counter()
            bar = progress_bar(loader, f"{name} epoch {epoch}/{epochs}", progress)
            total = torch.zeros((), dtype=torch.float64, device=dev)
            steps = 0
            for batch in (bar if bar is not None else loader):
                x, m = batch[0].to(dev), batch[1].to(dev)
                target = _foreground_targets(m, x.shape[-2:])
                loss = F.binary_cross_entropy_with_logits(seg(x).float(), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().double()
                steps += 1
            if bar is not None:
                bar.close()
            row = {"epoch": epoch, "loss": float(total) / steps, "time_s": time.perf_counter() - t}
            history.append(row)
            if progress:
                print(f"[{name}] epoch {epoch}/{epochs}: BCE {row['loss']:.4f} ({row['time_s']:.1f} s)",
                      file=sys.stdout, flush=True)
    seg.eval()
    seg.history = history
    return seg


def predict_masks(segmenter: nn.Module, images: torch.Tensor, threshold: float = 0.5, batch_size: int = 256,
                  device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Predicted foreground, bool (N, 1, H, W) on the CPU: σ(segmenter(x)) > ``threshold`` for
    images (N, C, H, W), in batches, eval mode (the module's mode is restored), no gradients."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    dev = torch.device(device) if device is not None else _module_device(segmenter)
    out = [_foreground(segmenter, images[i:i + batch_size].to(dev), threshold).cpu()
           for i in range(0, images.shape[0], batch_size)]
    if not out:
        return torch.zeros((0, 1) + tuple(images.shape[-2:]), dtype=torch.bool)
    return torch.cat(out)


def mask_iou(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over images of |pred ∩ true| / |pred ∪ true| (1 for an image where both are empty).

    Masks (N, H, W) or (N, C, H, W), bool or numbers (foreground = value > 0.5; several channels
    reduced with a max); true masks of another size are resized to the predicted ones' as in the
    heatmap loss."""
    p = _foreground_targets(pred, pred.shape[-2:]).bool()
    t = _foreground_targets(true, p.shape[-2:]).bool()
    if p.shape != t.shape:
        raise ValueError(f"mask_iou: predicted masks {tuple(p.shape)} and true masks {tuple(t.shape)} differ in shape")
    if p.shape[0] == 0:
        raise ValueError("mask_iou: no masks")
    inter = (p & t).flatten(1).sum(1).double()
    union = (p | t).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return float(iou.mean())


class PredictedBackgroundZeroed(Dataset):
    """``base`` with every image multiplied by its predicted foreground: items are
    ``(image · predicted mask, TRUE mask, label)``.

    The predicted masks (``.pred_masks``, bool (N, 1, H, W)) are computed once, here. A base with
    ``.images``/``.masks``/``.labels`` tensors (a :class:`~fisnet.data.MaskedImageDataset`) gives
    the same attributes (the masked images precomputed; masks and labels shared with the base);
    any other base is read once to predict its masks and again per item (the image is masked
    then)."""

    def __init__(self, base: Dataset, segmenter: nn.Module, threshold: float = 0.5, batch_size: int = 256,
                 device: Optional[Union[str, torch.device]] = None):
        self.base, self.threshold = base, float(threshold)
        tensors = all(isinstance(getattr(base, a, None), torch.Tensor) for a in ("images", "masks", "labels"))
        if tensors:
            self.pred_masks = predict_masks(segmenter, base.images, self.threshold, batch_size, device)
            self.images = base.images * self.pred_masks.to(base.images.dtype)
            self.masks, self.labels = base.masks, base.labels
        else:
            dev = torch.device(device) if device is not None else _module_device(segmenter)
            parts = [_foreground(segmenter, b[0].to(dev), self.threshold).cpu() for b in _batches(base, batch_size)]
            self.pred_masks = torch.cat(parts) if parts else torch.zeros((0, 1, 1, 1), dtype=torch.bool)
        self._tensors = tensors
        for a in ("name", "config", "markers", "classes"):
            if hasattr(base, a):
                setattr(self, a, getattr(base, a))

    def __len__(self) -> int:
        return int(self.pred_masks.shape[0])

    def __getitem__(self, i):
        if self._tensors:
            return self.images[i], self.masks[i], self.labels[i]
        item = self.base[i]
        x = item[0]
        return (x * self.pred_masks[i].to(x.dtype),) + tuple(item[1:])


class SegmentThenClassify(nn.Module):
    """The segment_then_classify pipeline: ``forward(x) = classifier(mask_input(x))``.

    ``mask_input(x) = x · [σ(segmenter(x)) > threshold]`` runs the segmenter in eval mode without
    gradients (its mask is a hard gate, not trained through). Heatmaps of the pipeline are those
    of the classifier on the masked input: ``fisnet.explain(pipe.classifier, pipe.mask_input(x))``."""

    def __init__(self, segmenter: nn.Module, classifier: nn.Module, threshold: float = 0.5):
        super().__init__()
        self.segmenter, self.classifier, self.threshold = segmenter, classifier, float(threshold)

    def mask_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * _foreground(self.segmenter, x, self.threshold).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.mask_input(x))
