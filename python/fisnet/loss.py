"""The ISNet heatmap loss (docs/spec.md §4): GWRP, mask resizing, and the training criterion.

Pure PyTorch, no custom kernels; everything is differentiable twice, so the loss can be
back-propagated through an LRP-Flex heatmap that was itself built with ``create_graph=True``.

Public functions
----------------
``gwrp(x, d, dim=-1)``
    Global weighted rank pooling (docs/spec.md §4.1).
``resize_masks(masks, size)``
    Resize foreground masks; a cell is foreground if any pixel in it is.
``heatmap_loss_parts(heatmaps, masks, cuts, ...)`` / ``heatmap_loss(...)``
    The per-image heatmap loss of docs/spec.md §4.2 (parts: background, foreground, total).
``ISNetLoss``
    ``(1 - P)·CE + P·heatmap loss``, with P schedules, multi-label BCE, Dual-ISNet cuts and
    LRP deep supervision (a dict of per-layer heatmaps).

Errors
------
Malformed inputs raise ``ValueError`` whose message names the problem and the fix.
NaN/inf inside a heatmap raises :class:`NonFiniteHeatmapError`, which subclasses both
``FloatingPointError`` and ``ValueError`` (catch either).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "gwrp",
    "gwrp_topk",
    "resize_masks",
    "heatmap_loss",
    "heatmap_loss_parts",
    "ISNetLoss",
    "NonFiniteHeatmapError",
    "FOREGROUND_MODES",
]

#: High-side foreground penalties understood by :func:`heatmap_loss` (docs/spec.md §4.2 step 3).
FOREGROUND_MODES = ("hybrid", "L2")

#: GWRP drops sorted values whose weight d^i (relative to the first weight, 1) is below this.
GWRP_TAIL_TOL = 1e-7

#: Stabiliser of the foreground-mean normaliser (docs/spec.md §4.2 step 1).
NORM_EPS = 1e-10


class NonFiniteHeatmapError(FloatingPointError, ValueError):
    """A heatmap holds NaN or inf (usually: the model diverged). Subclasses both
    ``FloatingPointError`` and ``ValueError``."""


# ----------------------------------------------------------------------------------------
# small cached constants
# ----------------------------------------------------------------------------------------

_CACHE_MAX = 128
_CONST_CACHE: Dict[tuple, Tensor] = {}


def _cached(key: tuple, build) -> Tensor:
    """A tiny bounded cache of constant tensors (rank weights, cut vectors).

    Built outside inference mode and autograd so a cached tensor can be used later in a
    graph that needs gradients. Skipped while torch.compile traces (fake tensors must not
    leak into the cache)."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    if compiling:
        return build()
    t = _CONST_CACHE.get(key)
    if t is None:
        with torch.inference_mode(False), torch.no_grad():
            t = build()
        if len(_CONST_CACHE) >= _CACHE_MAX:
            _CONST_CACHE.pop(next(iter(_CONST_CACHE)))
        _CONST_CACHE[key] = t
    return t


def _rank_weights(d: float, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Un-normalised GWRP weights ``[d^0, d^1, ..., d^(k-1)]`` (0^0 = 1), cached."""

    def build():
        i = torch.arange(k, dtype=torch.float64)
        return torch.pow(torch.tensor(d, dtype=torch.float64), i).to(dtype=dtype, device=device)

    return _cached(("rank", float(d), int(k), dtype, torch.device(device)), build)


def _const_vector(values: Tuple[float, ...], dtype, device) -> Tensor:
    return _cached(("const", values, dtype, torch.device(device)),
                   lambda: torch.tensor(values, dtype=dtype, device=device))


# ----------------------------------------------------------------------------------------
# GWRP
# ----------------------------------------------------------------------------------------


def _check_decay(d, name: str = "d") -> float:
    try:
        d = float(d)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {d!r}") from None
    if not (0.0 <= d <= 1.0):
        raise ValueError(f"{name} must be in [0, 1] (1 = mean, 0 = max), got {d}")
    return d


def gwrp_topk(d: float, n: int, tol: float = GWRP_TAIL_TOL) -> int:
    """How many sorted values :func:`gwrp` keeps for decay ``d`` over ``n`` values:
    the smallest k with ``d^k <= tol`` (clamped to [1, n]); n when d = 1."""
    d = float(d)
    if d <= 0.0:
        return 1 if n > 0 else 0
    if d >= 1.0:
        return n
    k = math.ceil(math.log(tol) / math.log(d))
    return max(1, min(int(k), n))


def gwrp(x: Tensor, d: float, dim: int = -1, *, exact: bool = False) -> Tensor:
    """Global weighted rank pooling along ``dim`` (docs/spec.md §4.1).

    With the values sorted in descending order ``v_0 >= v_1 >= ... >= v_{N-1}``::

        GWRP_d(x) = sum_i d^i v_i / sum_i d^i        (i = 0 .. N-1, 0^0 = 1)

    ``d = 1`` is the mean (no sort), ``d = 0`` the max. ``dim`` is reduced away.

    Top-k: for ``0 < d < 1`` only the ``k = ceil(log(1e-7) / log d)`` largest values are
    ranked (``torch.topk``; k = 153 for d = 0.9, 1604 for d = 0.99) when ``k < N``. The
    normaliser stays exact (closed form ``(1 - d^N) / (1 - d)``), so only the tail *values*
    are dropped, and the absolute error is at most::

        max_{i>=k} |v_i| * (d^k - d^N) / (1 - d^N)  <=  1e-7 * max |x|

    (for non-negative inputs the result is under-estimated by at most that). ``exact=True``
    sorts all N values instead. The weight vectors are cached per (d, k, dtype, device).
    Differentiable (twice): the gradient flows to the selected values through sort/topk.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"gwrp expects a Tensor, got {type(x).__name__}")
    d = _check_decay(d)
    if x.dim() == 0:
        raise ValueError("gwrp needs at least one dimension to pool over, got a 0-d tensor")
    n = x.shape[dim]
    if n == 0:
        raise ValueError(f"gwrp over an empty dimension (dim={dim}, shape {tuple(x.shape)})")
    if d == 1.0:
        return x.mean(dim)
    if d == 0.0:
        return x.amax(dim)
    if dim != -1 and dim != x.dim() - 1:
        x = x.movedim(dim, -1)
    k = n if exact else gwrp_topk(d, n)
    if k < n:
        v = torch.topk(x, k, dim=-1, largest=True, sorted=True).values
    else:
        v = torch.sort(x, dim=-1, descending=True).values
    w = _rank_weights(d, k, x.dtype, x.device)
    norm = (1.0 - d ** n) / (1.0 - d)  # sum_{i<n} d^i, closed form, float64
    return torch.matmul(v, w) * (1.0 / norm)


# ----------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------


def resize_masks(masks: Tensor, size: Union[int, Sequence[int]]) -> Tensor:
    """Resize foreground masks ``(B, Cm, H', W') -> (B, Cm, H, W)``.

    Rule: **a cell is foreground if any input pixel it overlaps is foreground** —
    equivalently, a cell is background only if it contains no foreground pixel (the LDS rule of
    docs/spec.md §2.2; one rule serves both). Implemented as ``adaptive_max_pool2d``, whose window for
    output cell i spans input pixels ``floor(i·H'/H) .. ceil((i+1)·H'/H) - 1``:

    - integer down-sampling: max over each block;
    - non-integer ratios: windows overlap, a cell straddling a foreground pixel is foreground;
    - up-sampling: each cell takes the pixel(s) it lies on (nearest for integer factors).

    Binary masks stay binary. Integer/bool masks are returned as float32; float masks keep
    their dtype. A mask already of the requested size is returned unchanged (as float).
    """
    if not isinstance(masks, Tensor):
        raise ValueError(f"masks must be a Tensor, got {type(masks).__name__}")
    if masks.dim() != 4:
        raise ValueError(
            f"masks must be 4-D (B, 1 or C, H, W), got shape {tuple(masks.shape)}"
            + ("; add the channel axis with masks.unsqueeze(1)" if masks.dim() == 3 else ""))
    if isinstance(size, numbers.Integral):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be a positive int or an (H, W) pair, got {size}")
    if not masks.is_floating_point():
        masks = masks.float()
    if tuple(masks.shape[-2:]) == size:
        return masks
    return F.adaptive_max_pool2d(masks, size)


# ----------------------------------------------------------------------------------------
# heatmap loss
# ----------------------------------------------------------------------------------------


def _is_scalar(v) -> bool:
    if isinstance(v, Tensor):
        return v.numel() == 1
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_MISSING_CUTS = ("cuts (C1, C2) are missing: run fisnet.tune_cuts(...) on a briefly trained "
                 "classifier (docs/spec.md §4.3) and pass its result, or pass cuts=(C1, C2) yourself")


def _parse_cuts(cuts, M: int, where: str = "") -> List[Tuple[float, float]]:
    """Normalise ``cuts`` to a list of (C1, C2) float pairs, of length 1 or M."""
    if cuts is None:
        raise ValueError(_MISSING_CUTS + where)
    if isinstance(cuts, Mapping):
        raise ValueError("a dict of cuts (keyed by layer name) is only meaningful in ISNetLoss "
                         "with a dict of heatmaps (LDS); heatmap_loss takes a (C1, C2) pair or "
                         "a list of pairs, one per heatmap" + where)
    if isinstance(cuts, Tensor):
        cuts = cuts.detach().tolist()
    try:
        items = list(cuts)
    except TypeError:
        raise ValueError(f"cuts must be a (C1, C2) pair or a list of pairs, got {cuts!r}{where}") from None
    if len(items) == 2 and all(_is_scalar(v) for v in items):
        pairs = [items]
    else:
        pairs = []
        for p in items:
            if isinstance(p, Tensor):
                p = p.detach().tolist()
            if not (isinstance(p, Sequence) and len(p) == 2 and all(_is_scalar(v) for v in p)):
                raise ValueError(f"cuts must be a (C1, C2) pair or a list of (C1, C2) pairs, "
                                 f"got {cuts!r}{where}")
            pairs.append(p)
    if len(pairs) not in (1, M):
        raise ValueError(f"cuts holds {len(pairs)} (C1, C2) pairs but the heatmaps have M={M} "
                         f"maps per image; give one pair for all maps or one per map{where}")
    out = []
    for c1, c2 in pairs:
        c1, c2 = float(c1), float(c2)
        if not (math.isfinite(c1) and math.isfinite(c2)):
            raise ValueError(f"cuts must be finite, got C1={c1}, C2={c2}{where}")
        if c1 <= 0:
            raise ValueError(f"C1 must be > 0, got C1={c1}{where}; re-run fisnet.tune_cuts or "
                             f"choose a positive lower target")
        if c1 >= c2:
            raise ValueError(f"C1 must be < C2, got C1={c1} >= C2={c2}{where}; "
                             f"pass cuts=(C1, C2) with C1 < C2")
        out.append((c1, c2))
    return out


def _check_shapes(heatmaps, masks, name: str = "") -> None:
    where = f" (layer {name!r})" if name else ""
    if not isinstance(heatmaps, Tensor):
        raise ValueError(f"heatmaps must be a Tensor (B, M, C, H, W), got {type(heatmaps).__name__}{where}")
    if heatmaps.dim() != 5:
        raise ValueError(f"heatmaps must be 5-D (B, M, C, H, W), got shape {tuple(heatmaps.shape)}"
                         f"{where}" + ("; for a single map per image use heatmaps.unsqueeze(1)"
                                        if heatmaps.dim() == 4 else ""))
    if not heatmaps.is_floating_point():
        raise ValueError(f"heatmaps must be a floating-point tensor, got {heatmaps.dtype}{where}")
    if not isinstance(masks, Tensor):
        raise ValueError(f"masks must be a Tensor (B, 1 or C, H, W), got {type(masks).__name__}")
    if masks.dim() != 4:
        raise ValueError(
            f"masks must be 4-D (B, 1 or C, H, W), got shape {tuple(masks.shape)}"
            + ("; add the channel axis with masks.unsqueeze(1)" if masks.dim() == 3 else ""))
    if masks.shape[0] != heatmaps.shape[0]:
        raise ValueError(f"batch size mismatch: masks have shape {tuple(masks.shape)} but heatmaps "
                         f"have shape {tuple(heatmaps.shape)}{where}; pass one mask per image")
    C = heatmaps.shape[2]
    if masks.shape[1] not in (1, C):
        raise ValueError(f"masks have {masks.shape[1]} channels but heatmaps have C={C}{where}: a "
                         f"mask needs 1 channel (shared by all channels) or C channels")


def _check_values(named_heatmaps: Sequence[Tuple[str, Tensor]], masks: Tensor) -> None:
    """NaN/inf per image and non-binary mask values, with one host synchronisation."""
    parts = [(~torch.isfinite(h.detach())).flatten(1).any(1).long() for _, h in named_heatmaps]
    if masks.dtype != torch.bool:
        m = masks.detach()
        parts.append(((m != 0) & (m != 1)).sum().reshape(1).long())
    else:
        parts.append(torch.zeros(1, dtype=torch.long, device=named_heatmaps[0][1].device))
    vals = torch.cat([p.to(named_heatmaps[0][1].device) for p in parts]).tolist()
    n_bad = vals[-1]
    if n_bad:
        raise ValueError(f"masks must be binary (1 = foreground, 0 = background) but {n_bad} of "
                         f"{masks.numel()} values are neither 0 nor 1; threshold them, e.g. "
                         f"(mask > 0.5).float()")
    B = masks.shape[0]
    for j, (name, _) in enumerate(named_heatmaps):
        bad = [i for i, v in enumerate(vals[j * B:(j + 1) * B]) if v]
        if bad:
            where = f" (layer {name!r})" if name else ""
            raise NonFiniteHeatmapError(
                f"heatmaps of images {bad} contain NaN/inf{where}: the model may have diverged; "
                f"lower the learning rate (or clip gradients) or check the inputs")


def _autocast_off(device_type: str):
    avail = getattr(torch.amp, "is_autocast_available", None)
    if avail is not None and avail(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _check_options(d, E, foreground, weights, reduction=None):
    d = _check_decay(d)
    try:
        E = float(E)
    except (TypeError, ValueError):
        raise ValueError(f"E must be a positive number, got {E!r}") from None
    if not E > 0:
        raise ValueError(f"E must be > 0, got {E}")
    if foreground not in FOREGROUND_MODES:
        raise ValueError(f"unknown foreground mode {foreground!r}; choose one of {FOREGROUND_MODES}")
    try:
        wa, wb = (float(w) for w in weights)
    except (TypeError, ValueError):
        raise ValueError(f"weights must be a pair (background weight, foreground weight), "
                         f"got {weights!r}") from None
    if reduction is not None and reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return d, E, (wa, wb)


def heatmap_loss_parts(heatmaps: Tensor, masks: Tensor, cuts=None, d: float = 0.9,
                       E: float = 1.0, foreground: str = "hybrid",
                       weights: Sequence[float] = (1.0, 1.0), *,
                       check: bool = True) -> Dict[str, Tensor]:
    """Per-image parts of the ISNet heatmap loss (docs/spec.md §4.2).

    Args:
        heatmaps: ``R`` of shape (B, M, C, H, W).
        masks: (B, 1 or C, H', W'), 1 = foreground; resized with :func:`resize_masks` when
            (H', W') != (H, W). One channel is shared by all C channels.
        cuts: (C1, C2) with 0 < C1 < C2, or a list of M pairs (one per heatmap index m, e.g.
            the two maps of the Dual ISNet).
        d: GWRP decay of the background term. E: background scale.
        foreground: high-side penalty, ``"hybrid"`` or ``"L2"``.
        weights: (A_w, B_w), the background and foreground weights.
        check: verify mask binarity and heatmap finiteness (costs one host sync).

    Computed in float32 (float64 stays float64), with autocast disabled. Per image b and map m::

        A   = |R|
        N   = A / (sum_{CHW}(A·fg) / max(count_fg, 1) + 1e-10)          count over C, H, W
        g_c = GWRP_d over H·W of N·(1 - fg), per channel c
        l_bg = mean_{m, c} log(1 + g_c / E)
        F   = sum_{CHW} A·fg                                           (not normalised)
        l_lo = (min(F/C1, 1) - 1)^2
        l_hi = ((F - C2)/C1)^2 if F > C2 else 0                        ("L2")
        l_hi = ((F - C2)/C1)^2 if F <= C1 + C2 else (F - C1 - C2) + 1  ("hybrid", plus 0 below C2)
        l_fg = mean_m (l_lo + l_hi)
        total = A_w·l_bg + B_w·l_fg

    An image without foreground gets a finite loss (the normaliser is 1e-10, F = 0, so
    l_fg = 1 with zero gradient); an image without background gets l_bg = 0.

    Returns:
        ``{"background": l_bg, "foreground": l_fg, "total": total}``, each of shape (B,).
        ``background``/``foreground`` are unweighted.

    Raises:
        ValueError: malformed shapes, cuts or options, non-binary masks.
        NonFiniteHeatmapError: NaN/inf in a heatmap (also a FloatingPointError).
    """
    _check_shapes(heatmaps, masks)
    B, M, C, H, W = heatmaps.shape
    pairs = _parse_cuts(cuts, M)
    d, E, (wa, wb) = _check_options(d, E, foreground, weights)
    if check:
        _check_values([("", heatmaps)], masks)
    return _parts(heatmaps, masks, pairs, d, E, foreground, wa, wb)


def _parts(heatmaps, masks, pairs, d, E, foreground, wa, wb) -> Dict[str, Tensor]:
    B, M, C, H, W = heatmaps.shape
    dt = torch.float64 if heatmaps.dtype == torch.float64 else torch.float32
    with _autocast_off(heatmaps.device.type):
        A = heatmaps.to(dt).abs()
        m = masks.to(device=heatmaps.device, dtype=dt)
        if tuple(m.shape[-2:]) != (H, W):
            m = resize_masks(m, (H, W))
        Cm = m.shape[1]
        fg = m.unsqueeze(1)                                       # (B, 1, Cm, H, W)
        count = m.sum(dim=(1, 2, 3)) * (C if Cm == 1 else 1)      # (B,)
        Fsum = (A * fg).sum(dim=(2, 3, 4))                        # (B, M)
        mean_fg = Fsum / count.clamp(min=1.0).unsqueeze(1)        # (B, M)
        N = A / (mean_fg + NORM_EPS)[:, :, None, None, None]
        g = gwrp((N * (1.0 - fg)).flatten(3), d)                  # (B, M, C)
        l_bg = torch.log1p(g / E).mean(dim=(1, 2))                # (B,)

        if len(pairs) == 1:
            c1, c2 = pairs[0]
        else:
            c1 = _const_vector(tuple(p[0] for p in pairs), dt, heatmaps.device)  # (M,)
            c2 = _const_vector(tuple(p[1] for p in pairs), dt, heatmaps.device)
        l_lo = ((Fsum / c1).clamp(max=1.0) - 1.0) ** 2
        l_hi = ((Fsum - c2).clamp(min=0.0) / c1) ** 2
        if foreground == "hybrid":
            l_hi = torch.where(Fsum <= c1 + c2, l_hi, (Fsum - c1 - c2) + 1.0)
        l_fg = (l_lo + l_hi).mean(dim=1)                          # (B,)
        total = wa * l_bg + wb * l_fg
    return {"background": l_bg, "foreground": l_fg, "total": total}


def heatmap_loss(heatmaps: Tensor, masks: Tensor, cuts=None, d: float = 0.9, E: float = 1.0,
                 foreground: str = "hybrid", weights: Sequence[float] = (1.0, 1.0),
                 reduction: str = "mean", *, check: bool = True) -> Tensor:
    """The ISNet heatmap loss ``l_heat = A_w·l_bg + B_w·l_fg`` (docs/spec.md §4.2).

    See :func:`heatmap_loss_parts` for the formulas and arguments. ``reduction``: ``"mean"``
    (over the batch, default), ``"sum"``, or ``"none"`` (per image, shape (B,)).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    total = heatmap_loss_parts(heatmaps, masks, cuts, d, E, foreground, weights,
                               check=check)["total"]
    if reduction == "mean":
        return total.mean()
    if reduction == "sum":
        return total.sum()
    return total


# ----------------------------------------------------------------------------------------
# the training criterion
# ----------------------------------------------------------------------------------------


def _get(out, name):
    if isinstance(out, Mapping):
        return out.get(name)
    return getattr(out, name, None)


class ISNetLoss(nn.Module):
    """ISNet training loss: ``(1 - P)·CE(logits, labels) + P·l_heat`` (docs/spec.md §4.2).

    Args:
        P: heatmap-loss weight in [0, 1], or a schedule ``{epoch: P}``: at epoch e the value of
            the largest key <= e (before the first key, and when ``epoch`` is None, the value
            of the smallest key).
        d, E, foreground, weights: as in :func:`heatmap_loss`.
        cuts: (C1, C2); a list of pairs, one per heatmap (Dual ISNet: two); with LDS also a
            dict ``{layer name: pair or list of pairs}`` (a plain pair/list applies to every
            layer). May be set later (``crit.cuts = ...``); missing cuts raise at the call,
            unless P = 0 (a plain classifier, e.g. while tuning cuts).
        d_lds: decay of the 1-D GWRP combining LDS per-layer losses.
        multilabel: True → BCE-with-logits on float targets (B, K); False → cross-entropy
            (class indices, or class probabilities); None → BCE when the labels are floating
            point with the logits' shape, else cross-entropy.
        check: verify masks are binary and heatmaps finite (one host sync per call).

    Call: ``crit(out, labels, masks, epoch=None)`` → scalar. ``out`` has ``.logits`` (B, K) and
    ``.heatmaps`` (or is a mapping with those keys): a Tensor (B, M, C, H, W), or for LDS a
    dict ``{"input": Tensor, "<layer>": Tensor (B, M, C_l, H_l, W_l), ...}``. With a dict the
    heatmap loss is computed per layer (masks resized to each layer; masks with several
    channels are reduced to one — foreground if any channel is — for hidden layers whose
    channel count differs), each averaged over the batch, and the L per-layer losses are
    combined by a 1-D GWRP with decay ``d_lds``: sorted in descending order, so the layer
    with the largest loss gets weight 1/S, the next d_lds/S, ... (S = sum of the L weights).
    The background/foreground parts are combined with the same weights and order.

    After each call ``crit.last`` holds detached 0-d tensors (not Python floats, which would
    force a host sync every step; call ``.item()`` when logging): ``"ce"`` (the
    classification loss, CE or BCE), ``"heatmap"``, ``"background"``, ``"foreground"``,
    ``"loss"``, plus ``"P"`` (float) and, with LDS, ``"layers"`` (``{name: heatmap loss}``).
    The heatmap entries are None when P = 0 and no cuts are set. At P = 0 the heatmap loss is
    only logged (computed without a graph), so the backward pass skips the heatmap graph.
    """

    def __init__(self, P: Union[float, Mapping] = 0.7, d: float = 0.9, E: float = 1.0,
                 cuts=None, foreground: str = "hybrid",
                 weights: Sequence[float] = (1.0, 1.0), d_lds: float = 0.8,
                 multilabel: Optional[bool] = None, check: bool = True):
        super().__init__()
        self.d, self.E, self.weights = _check_options(d, E, foreground, weights)
        self.foreground = foreground
        self.d_lds = _check_decay(d_lds, "d_lds")
        self.P = self._check_P(P)
        self.cuts = cuts
        if multilabel not in (None, True, False):
            raise ValueError(f"multilabel must be None (auto), True or False, got {multilabel!r}")
        self.multilabel = multilabel
        self.check = bool(check)
        self.last: Dict[str, Any] = {}

    @staticmethod
    def _check_P(P):
        def one(p, where=""):
            try:
                p = float(p)
            except (TypeError, ValueError):
                raise ValueError(f"P must be a number in [0, 1]{where}, got {p!r}") from None
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"P must be in [0, 1]{where}, got {p}")
            return p

        if isinstance(P, Mapping):
            if not P:
                raise ValueError("the P schedule {epoch: P} is empty")
            return {int(k): one(v, f" (schedule entry for epoch {k})")
                    for k, v in sorted(P.items(), key=lambda kv: int(kv[0]))}
        return one(P)

    def p_at(self, epoch: Optional[int] = None) -> float:
        """P for ``epoch`` (see the class docstring)."""
        if not isinstance(self.P, Mapping):
            return self.P
        keys = list(self.P)  # sorted ascending in _check_P
        if epoch is None:
            return self.P[keys[0]]
        chosen = keys[0]
        for k in keys:
            if k <= epoch:
                chosen = k
        return self.P[chosen]

    # -- classification --------------------------------------------------------------------
    def _classification(self, logits: Tensor, labels: Tensor) -> Tensor:
        multilabel = self.multilabel
        if multilabel is None:
            multilabel = labels.is_floating_point() and labels.shape == logits.shape
        if multilabel:
            if labels.shape != logits.shape:
                raise ValueError(f"multi-label BCE needs labels of the logits' shape "
                                 f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    # -- heatmaps --------------------------------------------------------------------------
    def _layer_cuts(self, name: Optional[str]):
        cuts = self.cuts
        if isinstance(cuts, Mapping):
            key = "input" if name is None else name
            if key not in cuts:
                raise ValueError(f"cuts has no entry for layer {key!r} (it has {sorted(cuts)}); "
                                 f"run fisnet.tune_cuts for that layer or add cuts[{key!r}]")
            return cuts[key]
        return cuts

    def _heatmap_parts(self, heatmaps, masks) -> Tuple[Dict[str, Tensor], Optional[dict]]:
        wa, wb = self.weights
        if isinstance(heatmaps, Tensor):
            _check_shapes(heatmaps, masks)
            pairs = _parse_cuts(self._layer_cuts(None), heatmaps.shape[1])
            if self.check:
                _check_values([("", heatmaps)], masks)
            p = _parts(heatmaps, masks, pairs, self.d, self.E, self.foreground, wa, wb)
            return {k: v.mean() for k, v in p.items()}, None
        if not isinstance(heatmaps, Mapping) or not heatmaps:
            raise ValueError(f"out.heatmaps must be a Tensor (B, M, C, H, W) or a non-empty dict "
                             f"{{layer name: Tensor}}, got {type(heatmaps).__name__}")
        named, mask_for, pairs_for = [], {}, {}
        for name, h in heatmaps.items():
            mk = masks
            if (isinstance(h, Tensor) and h.dim() == 5 and isinstance(masks, Tensor)
                    and masks.dim() == 4 and name != "input"
                    and masks.shape[1] not in (1, h.shape[2])):
                mk = masks.amax(dim=1, keepdim=True)
            _check_shapes(h, mk, name)
            where = f" (layer {name!r})"
            pairs_for[name] = _parse_cuts(self._layer_cuts(name), h.shape[1], where)
            mask_for[name] = mk
            named.append((name, h))
        if self.check:
            _check_values(named, masks)
        per = {name: _parts(h, mask_for[name], pairs_for[name], self.d, self.E,
                            self.foreground, wa, wb) for name, h in named}
        totals = torch.stack([per[n]["total"].mean() for n, _ in named])
        bgs = torch.stack([per[n]["background"].mean() for n, _ in named])
        fgs = torch.stack([per[n]["foreground"].mean() for n, _ in named])
        # 1-D GWRP over layers: descending order of the per-layer totals, weights d_lds^i / S.
        L = totals.shape[0]
        order = torch.argsort(totals.detach(), descending=True)
        w = _rank_weights(self.d_lds, L, totals.dtype, totals.device)
        w = w / w.sum()
        combine = lambda v: (v[order] * w).sum()
        parts = {"total": combine(totals), "background": combine(bgs),
                 "foreground": combine(fgs)}
        layers = {n: totals[i].detach() for i, (n, _) in enumerate(named)}
        return parts, layers

    def forward(self, out, labels: Tensor, masks: Tensor, epoch: Optional[int] = None) -> Tensor:
        logits = _get(out, "logits")
        heatmaps = _get(out, "heatmaps")
        if not isinstance(logits, Tensor):
            raise ValueError("out must have .logits (a Tensor (B, K)), e.g. the output of "
                             "fisnet.ISNet in training mode")
        P = self.p_at(epoch)
        ce = self._classification(logits, labels)
        parts, layers = None, None
        if P > 0:
            if heatmaps is None:
                raise ValueError("out.heatmaps is None: the heatmap loss needs the heatmaps of "
                                 "the training forward (call net.train(), or use P=0)")
            parts, layers = self._heatmap_parts(heatmaps, masks)
            loss = (1.0 - P) * ce + P * parts["total"]
        else:
            if heatmaps is not None and self.cuts is not None:
                with torch.no_grad():  # logged only: keep the heatmap graph out of backward
                    parts, layers = self._heatmap_parts(heatmaps, masks)
            loss = ce
        self.last = {
            "ce": ce.detach(), "loss": loss.detach(), "P": P,
            "heatmap": None if parts is None else parts["total"].detach(),
            "background": None if parts is None else parts["background"].detach(),
            "foreground": None if parts is None else parts["foreground"].detach(),
        }
        if layers is not None:
            self.last["layers"] = layers
        return loss

    def extra_repr(self) -> str:
        return (f"P={self.P}, d={self.d}, E={self.E}, cuts={self.cuts}, "
                f"foreground={self.foreground!r}, weights={self.weights}, d_lds={self.d_lds}, "
                f"multilabel={self.multilabel}")
