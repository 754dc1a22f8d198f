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

Families as for lrp_relu (fisnet_ext/ops.py): C++ CPU kernel, CUDA kernel (FISNET_CUDA=1),
Triton (``fisnet::bn_train_bwd_triton`` / ``fisnet::bn_train_bwd_bwd_triton``) and the reference.
Registered here: fake kernels, autograd (bwd → bwd_bwd; bwd_bwd's own autograd differentiates
the reference formula, so third derivatives exist) and vmap rules (a batched g/h becomes a slot
dim; a batched x or weight falls back to one call per batch entry).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import ops, reference
from .ops import _front, _register_vmap

HAVE_TRITON = ops.HAVE_TRITON


def _triton():
    from .triton import bn as tb  # imported lazily: importing triton is slow

    return tb


if HAVE_TRITON:

    @torch.library.custom_op("fisnet::bn_train_bwd_triton", mutates_args=())
    def _bwd_triton(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _triton().bn_train_bwd(g, x, weight, eps)

    @torch.library.custom_op("fisnet::bn_train_bwd_bwd_triton", mutates_args=())
    def _bwd_bwd_triton(h: torch.Tensor, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton().bn_train_bwd_bwd(h, g, x, weight, eps)


def _bwd_bwd_backward_torch(ctx, a, b, c):
    """Autograd of bn_train_bwd_bwd: the reference formula differentiated by autograd (third
    derivatives; rarely used, so clarity over speed)."""
    h, g, x, w = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (h, g, x, w)]
        outs = reference.bn_train_bwd_bwd(*leaves, ctx.eps)
        pairs = [(o, gr) for o, gr in zip(outs, (a, b, c)) if gr is not None]
        if not pairs:
            return None, None, None, None, None
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [gr for _, gr in pairs],
                                    create_graph=torch.is_grad_enabled(), allow_unused=True)
    return tuple(grads) + (None,)


@dataclass(frozen=True)
class BNFamily:
    name: str
    bwd: Callable
    bwd_bwd: Callable


def _check_shapes(g, x, w):
    torch._check(x.dim() >= 2, lambda: f"fisnet.bn_train_bwd: x must have shape (N, C, ...), got {tuple(x.shape)}")
    torch._check(g.dim() >= x.dim() and tuple(g.shape[g.dim() - x.dim():]) == tuple(x.shape),
                 lambda: f"fisnet.bn_train_bwd: g of shape {tuple(g.shape)} must end with x's shape {tuple(x.shape)}")
    torch._check(tuple(w.shape) == (x.shape[1],),
                 lambda: f"fisnet.bn_train_bwd: weight must have shape ({x.shape[1]},), got {tuple(w.shape)}")


def _register_family(name: str, bwd_name: str, bwd_bwd_name: str) -> BNFamily:
    bwd = getattr(torch.ops.fisnet, bwd_name).default
    bwd_bwd = getattr(torch.ops.fisnet, bwd_bwd_name).default

    @torch.library.register_fake(f"fisnet::{bwd_name}")
    def _(g, x, w, eps):
        _check_shapes(g, x, w)
        return torch.empty_like(g)

    @torch.library.register_fake(f"fisnet::{bwd_bwd_name}")
    def _(h, g, x, w, eps):
        _check_shapes(g, x, w)
        return torch.empty_like(g), torch.empty_like(x), torch.empty_like(w)

    def bwd_setup(ctx, inputs, output):
        g, x, w, eps = inputs
        ctx.save_for_backward(g, x, w)
        ctx.eps = eps

    def bwd_backward(ctx, grad):
        g, x, w = ctx.saved_tensors
        d_g, d_x, d_w = bwd_bwd(grad, g, x, w, ctx.eps)
        return d_g, d_x, d_w, None

    torch.library.register_autograd(f"fisnet::{bwd_name}", bwd_backward, setup_context=bwd_setup)

    def bwd_bwd_setup(ctx, inputs, output):
        h, g, x, w, eps = inputs
        ctx.save_for_backward(h, g, x, w)
        ctx.eps = eps

    torch.library.register_autograd(f"fisnet::{bwd_bwd_name}", _bwd_bwd_backward_torch, setup_context=bwd_bwd_setup)

    @_register_vmap(f"fisnet::{bwd_name}")
    def _(info, in_dims, g, x, w, eps):
        gd, xd, wd, _ = in_dims
        n = info.batch_size
        if xd is None and wd is None:  # the batch of g is one more slot dim
            return bwd(_front(g, gd, n), x, w, eps), 0
        g, x, w = _front(g, gd, n), _front(x, xd, n), _front(w, wd, n)
        return torch.stack([bwd(g[i], x[i], w[i], eps) for i in range(n)]), 0

    @_register_vmap(f"fisnet::{bwd_bwd_name}")
    def _(info, in_dims, h, g, x, w, eps):
        # per batch entry: slot dims would sum d/dx and d/dweight over the entries (rare: only a
        # transform of the double backward itself gets here)
        n = info.batch_size
        h, g, x, w = (_front(t, d, n) for t, d in zip((h, g, x, w), in_dims[:4]))
        parts = [bwd_bwd(h[i], g[i], x[i], w[i], eps) for i in range(n)]
        return tuple(torch.stack([p[k] for p in parts]) for k in range(3)), (0, 0, 0)

    return BNFamily(name, bwd, bwd_bwd)


NATIVE = _register_family("native", "bn_train_bwd", "bn_train_bwd_bwd")
TRITON = _register_family("triton", "bn_train_bwd_triton", "bn_train_bwd_bwd_triton") if HAVE_TRITON else None
REFERENCE = BNFamily("reference", reference.bn_train_bwd, reference.bn_train_bwd_bwd)


def bn_family(device: torch.device, backend: Optional[str] = None) -> BNFamily:
    """The BatchNorm op family for `device` under `backend`: the choice of `fisnet_ext.ops.family`."""
    return ops.same_choice(device, backend, NATIVE, TRITON, REFERENCE)


def _check_args(op: str, eps, **tensors) -> float:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"fisnet.{op}: {name} must be a floating-point tensor, got {type(t).__name__}"
                            + (f" of dtype {t.dtype}" if isinstance(t, torch.Tensor) else ""))
    x = tensors["x"]
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"fisnet.{op}: {name} is {t.dtype} but x is {x.dtype}; pass tensors of one dtype")
        if t.device != x.device:
            raise ValueError(f"fisnet.{op}: {name} is on {t.device} but x is on {x.device}")
    g, w = tensors["g"], tensors["weight"]
    if x.dim() < 2:
        raise ValueError(f"fisnet.{op}: x must have shape (N, C, ...), got {tuple(x.shape)}")
    if g.dim() < x.dim() or tuple(g.shape[g.dim() - x.dim():]) != tuple(x.shape):
        raise ValueError(f"fisnet.{op}: g has shape {tuple(g.shape)} but x has shape {tuple(x.shape)}; g must have "
                         "x's shape, optionally with leading slot dimensions")
    if tuple(w.shape) != (x.shape[1],):
        raise ValueError(f"fisnet.{op}: weight must have shape ({x.shape[1]},) (one per channel), got {tuple(w.shape)}")
    if "h" in tensors and tensors["h"].shape != g.shape:
        raise ValueError(f"fisnet.{op}: h has shape {tuple(tensors['h'].shape)} but g has {tuple(g.shape)}")
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"fisnet.{op}: eps must be >= 0, got {eps}")
    return eps


def bn_train_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 backend: Optional[str] = None) -> torch.Tensor:
    """The input-gradient of training-mode BatchNorm (batch statistics of x) for output-gradient
    g; differentiable to any order in g, x and weight.  x: (N, C, *); weight: (C,) (ones for a
    BatchNorm without affine parameters); eps: the BatchNorm's eps."""
    eps = _check_args("bn_train_bwd", eps, g=g, x=x, weight=weight)
    return bn_family(x.device, backend).bwd(g, x, weight, eps)


def bn_train_bwd_bwd(h: torch.Tensor, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                     backend: Optional[str] = None):
    """``(d/dg, d/dx, d/dweight)`` of `bn_train_bwd` contracted with h (differentiable)."""
    eps = _check_args("bn_train_bwd_bwd", eps, h=h, g=g, x=x, weight=weight)
    return bn_family(x.device, backend).bwd_bwd(h, g, x, weight, eps)
