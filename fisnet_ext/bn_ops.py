"""Training-mode BatchNorm's input-gradient and its derivative as fused custom ops.

Ops (namespace ``torch.ops.fisnet``; schemas in csrc/fisnet_ops.cpp; formulas in
fisnet_ext/reference.py):

* ``bn_train_bwd(g, x, weight, eps)``         ``s (g - mean(g) - x̂ mean(g x̂))``: the gradient at
  x of ``y = weight · x̂ + bias`` with x's batch statistics (which depend on x), given ``g = dL/dy``
* ``bn_train_bwd_bwd(h, g, x, weight, eps)``  its derivative contracted with h:
  ``(d/dg, d/dx, d/dweight)``

x has shape (N, C, *); the statistics are recomputed from x inside the kernels, so the ops are
functions of their arguments alone (no saved mean/invstd to keep consistent), and d/dx includes
the dependence of the mean and variance on x.  g and h may carry leading slot dims over x's
shape (one map per slot, x broadcast, never copied); d/dx and d/dweight are summed over them.

Why: the heatmap backward of a training-mode BatchNorm, differentiated again in an ISNet
training step, is PyTorch's ``batchnorm_double_backward``: some thirty element-wise and
reduction kernels.  Here it is two passes over the data (sums, then an affine combination per
element).  ``fisnet.traced.TracedBatchNorm`` uses these ops for the heatmap backward of every
training-mode BatchNorm in a traced forward.

Backends as for lrp_relu: C++ CPU kernel, CUDA kernel (FISNET_CUDA=1), Triton
(``fisnet::bn_train_bwd_triton`` / ``fisnet::bn_train_bwd_bwd_triton``) and the reference, registered
through the op-group template (`fisnet_ext.opgroup.OpGroup`): fake kernels, autograd (bwd → bwd_bwd;
bwd_bwd's own autograd differentiates the reference formula, so third derivatives exist), vmap
rules (a batched g/h becomes a slot dim; a batched x or weight falls back to one call per batch
entry) and the backend choice.

`bn_heatmap_backward(device, backend)` is the public form the method layer uses for a traced
training-mode BatchNorm: the backend is chosen when the forward runs, the op called in the backward.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .opgroup import HAVE_TRITON, NEXT, Op, OpGroup, check_eps, check_tensors, front, vmap_loop  # noqa: F401


def _triton():
    from .triton import bn as tb  # imported lazily: importing triton is slow

    return tb.bn_train_bwd, tb.bn_train_bwd_bwd


def _check_shapes(g, x, w):
    torch._check(x.dim() >= 2, lambda: f"fisnet.bn_train_bwd: x must have shape (N, C, ...), got {tuple(x.shape)}")
    torch._check(g.dim() >= x.dim() and tuple(g.shape[g.dim() - x.dim():]) == tuple(x.shape),
                 lambda: f"fisnet.bn_train_bwd: g of shape {tuple(g.shape)} must end with x's shape {tuple(x.shape)}")
    torch._check(tuple(w.shape) == (x.shape[1],),
                 lambda: f"fisnet.bn_train_bwd: weight must have shape ({x.shape[1]},), got {tuple(w.shape)}")


def _fake_bwd(g, x, w, eps):
    _check_shapes(g, x, w)
    return torch.empty_like(g)


def _fake_bwd_bwd(h, g, x, w, eps):
    _check_shapes(g, x, w)
    return torch.empty_like(g), torch.empty_like(x), torch.empty_like(w)


_loop3, _loop4 = vmap_loop(3), vmap_loop(4)


def _vmap_bwd(op, info, in_dims, g, x, w, eps):
    """A batched g is one more slot dim; a batched x or weight: one call per batch entry."""
    gd, xd, wd, _ = in_dims
    if xd is None and wd is None:
        return op(front(g, gd, info.batch_size), x, w, eps), 0
    return _loop3(op, info, in_dims, g, x, w, eps)


GROUP = OpGroup("BNFamily", [
    Op("bwd", "bn_train_bwd", "(Tensor g, Tensor x, Tensor weight, float eps) -> Tensor", reference.bn_train_bwd,
       _fake_bwd, _vmap_bwd, 3, grad=NEXT),
    # vmap per batch entry: slot dims would sum d/dx and d/dweight over the entries (rare: only a
    # transform of the double backward itself gets here)
    Op("bwd_bwd", "bn_train_bwd_bwd", "(Tensor h, Tensor g, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)",
       reference.bn_train_bwd_bwd, _fake_bwd_bwd, _loop4, 4, grad=None),
], triton=_triton)
NATIVE, TRITON, REFERENCE = GROUP.native, GROUP.triton_ops, GROUP.reference_ops
BNFamily = GROUP.Backend  # the two ops of one backend: name, bwd, bwd_bwd


def bn_family(device: torch.device, backend: Optional[str] = None) -> BNFamily:
    """The BatchNorm op family for `device` under `backend`: the choice of `fisnet_ext.ops.family`."""
    return GROUP.choose(device, backend)


def check_bn(op: str, eps, x, weight, one_dtype: bool = True, **maps) -> float:
    """The Python argument check of the BatchNorm ops (public functions and Triton launchers):
    floating-point tensors on x's device and, but for the weight when `one_dtype` is False (the
    Triton launchers accept an fp32 weight with half data), of x's dtype; x of shape (N, C, *);
    the maps (g, and h) of x's shape with optional leading slot dims, equal to each other;
    weight of shape (C,); eps >= 0."""
    check_tensors(op, ref="x", any_dtype=() if one_dtype else ("weight",), **maps, x=x, weight=weight)
    if x.dim() < 2:
        raise ValueError(f"fisnet.{op}: x must have shape (N, C, ...), got {tuple(x.shape)}")
    for name, t in maps.items():
        if t.dim() < x.dim() or tuple(t.shape[t.dim() - x.dim():]) != tuple(x.shape):
            raise ValueError(f"fisnet.{op}: {name} has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}; "
                             f"{name} must have x's shape, optionally with leading slot dimensions")
    if tuple(weight.shape) != (x.shape[1],):
        raise ValueError(f"fisnet.{op}: weight must have shape ({x.shape[1]},) (one per channel), got "
                         f"{tuple(weight.shape)}")
    if len({tuple(t.shape) for t in maps.values()}) > 1:
        raise ValueError(f"fisnet.{op}: " + " and ".join(f"{k} has shape {tuple(t.shape)}" for k, t in maps.items())
                         + "; they must be equal")
    return check_eps(op, eps)


def bn_train_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 backend: Optional[str] = None) -> torch.Tensor:
    """The input-gradient of training-mode BatchNorm (batch statistics of x) for output-gradient
    g; differentiable to any order in g, x and weight.  x: (N, C, *); weight: (C,) (ones for a
    BatchNorm without affine parameters); eps: the BatchNorm's eps."""
    eps = check_bn("bn_train_bwd", eps, x, weight, g=g)
    return bn_family(x.device, backend).bwd(g, x, weight, eps)


def bn_train_bwd_bwd(h: torch.Tensor, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                     backend: Optional[str] = None):
    """``(d/dg, d/dx, d/dweight)`` of `bn_train_bwd` contracted with h (differentiable)."""
    eps = check_bn("bn_train_bwd_bwd", eps, x, weight, h=h, g=g)
    return bn_family(x.device, backend).bwd_bwd(h, g, x, weight, eps)


class BNHeatmapBackward:
    """The heatmap backward of a training-mode BatchNorm on one backend (see `bn_heatmap_backward`)."""

    __slots__ = ("backend", "_bwd")

    def __init__(self, fam):
        self.backend = fam.name
        self._bwd = fam.bwd

    def __call__(self, g: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
        if weight is None:  # a BatchNorm without affine parameters
            weight = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        return self._bwd(g, x, weight, eps)

    def __repr__(self):
        return f"BNHeatmapBackward(backend={self.backend!r})"


def bn_heatmap_backward(device, backend: Optional[str] = None) -> BNHeatmapBackward:
    """The heatmap backward of a training-mode BatchNorm on `device`, its backend chosen now.

    ``bn_heatmap_backward(x.device, backend)`` picks the backend as every fisnet op does (`backend`,
    else the current one; the same errors, raised here) and returns ``f(g, x, weight, eps)``:
    `bn_train_bwd` on that backend -- the input-gradient of ``F.batch_norm(x, ..., training=True)``
    for output-gradient g, with x's batch statistics, differentiable to any order (its derivative
    is `bn_train_bwd_bwd`).  ``weight=None`` stands for a BatchNorm without affine parameters.
    g may carry leading slot dims over x's shape.  The call does not repeat the Python argument
    checks: the C++ and Triton kernels check their arguments.  A traced forward calls this once per
    BatchNorm, so that its heatmap backward runs on the backend in force when the forward ran
    (as `lrp_relu` does)."""
    return BNHeatmapBackward(bn_family(torch.device(device), backend))
