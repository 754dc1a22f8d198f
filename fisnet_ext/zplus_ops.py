"""The z⁺ rule's ratio step (Dual ISNet, SPEC §3.1) as fused custom ops, with their autograd.

Ops (namespace ``torch.ops.fisnet``; schemas in csrc/fisnet_ops.cpp):

* ``zplus_ratio(g, num, zp, eps)``          ``s = g * num / (zp + eps)``
* ``zplus_ratio_bwd(gs, g, num, zp, eps)``  its derivative contracted with ``gs``:
  ``(gs * num / (zp + eps), gs * g / (zp + eps), -gs * g * num / (zp + eps)^2)``

All tensors have one shape and dtype; eps >= 0.  Where ``zp + eps == 0`` every output is 0: the
kernels divide by a safe denominator there and select 0 (so eps = 0 with zp = 0 gives 0, not
NaN; NaN/inf in the inputs still propagate elsewhere).  The derivatives follow the same
convention (they are 0 there), which is the derivative of the op away from those points.

Like the lrp_relu family (fisnet_ext/ops.py) each op has a C++ CPU kernel, a CUDA kernel (with
FISNET_CUDA=1), a Triton kernel (the ``fisnet::zplus_ratio_triton`` /
``fisnet::zplus_ratio_bwd_triton`` custom ops) and the pure-PyTorch reference; this module
registers fake (meta) kernels, autograd (the ratio's backward is the fused bwd op; the bwd op's
own autograd is written in PyTorch, so third derivatives exist) and vmap rules (every tensor
argument may be batched; unbatched ones are expanded to the common batched shape).

``zplus_ratio(g, num, zp, eps, backend=None)`` is the differentiable public function; the
backend is chosen as for lrp_relu (`fisnet_ext.ops.family`, honouring
`fisnet_ext.backend.current_backend()` and ``FISNET_BACKEND``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import ops, reference  # ops: loads _C (the schemas and C++ kernels) or the fallback schemas
from .ops import _register_vmap

HAVE_TRITON = ops.HAVE_TRITON


def _triton():
    from .triton import zplus as tz  # imported lazily: importing triton is slow

    return tz


if HAVE_TRITON:

    @torch.library.custom_op("fisnet::zplus_ratio_triton", mutates_args=())
    def _ratio_triton(g: torch.Tensor, num: torch.Tensor, zp: torch.Tensor, eps: float) -> torch.Tensor:
        return _triton().zplus_ratio(g, num, zp, eps)

    @torch.library.custom_op("fisnet::zplus_ratio_bwd_triton", mutates_args=())
    def _ratio_bwd_triton(gs: torch.Tensor, g: torch.Tensor, num: torch.Tensor, zp: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton().zplus_ratio_bwd(gs, g, num, zp, eps)


def _safe_inv(zp: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / (zp + eps), 0 where zp + eps == 0 (differentiable: its derivative is -inv^2 there too)."""
    den = zp + eps
    nz = den != 0
    return torch.where(nz, 1.0 / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(den))


def _ratio_bwd_backward_torch(ctx, a, b, c):
    """Autograd of zplus_ratio_bwd in PyTorch ops (third derivatives; rarely used).

    With inv = 1/(zp+eps): dg = gs*num*inv, dnum = gs*g*inv, dzp = -gs*g*num*inv^2, and
    d inv / d zp = -inv^2, d inv^2 / d zp = -2 inv^3."""
    gs, g, num, zp = ctx.saved_tensors
    inv = _safe_inv(zp, ctx.eps)
    inv2 = inv * inv
    a = torch.zeros_like(g) if a is None else a
    b = torch.zeros_like(g) if b is None else b
    c = torch.zeros_like(g) if c is None else c
    d_gs = a * num * inv + b * g * inv - c * g * num * inv2
    d_g = b * gs * inv - c * gs * num * inv2
    d_num = a * gs * inv - c * gs * g * inv2
    d_zp = -(a * gs * num + b * gs * g) * inv2 + 2.0 * c * gs * g * num * inv2 * inv
    return d_gs, d_g, d_num, d_zp, None


@dataclass(frozen=True)
class ZPlusFamily:
    """The two ops of one backend."""

    name: str
    ratio: Callable
    ratio_bwd: Callable


def _same_shapes(*ts):
    shape = tuple(ts[0].shape)
    for t in ts[1:]:
        torch._check(tuple(t.shape) == shape,
                     lambda: f"fisnet.zplus_ratio: shapes {[tuple(u.shape) for u in ts]} differ; "
                             "all tensors must have one shape")


def _register_family(name: str, ratio_name: str, bwd_name: str) -> ZPlusFamily:
    ratio = getattr(torch.ops.fisnet, ratio_name).default
    ratio_bwd = getattr(torch.ops.fisnet, bwd_name).default

    # ---- fake kernels
    @torch.library.register_fake(f"fisnet::{ratio_name}")
    def _(g, num, zp, eps):
        _same_shapes(g, num, zp)
        return torch.empty_like(g)

    @torch.library.register_fake(f"fisnet::{bwd_name}")
    def _(gs, g, num, zp, eps):
        _same_shapes(gs, g, num, zp)
        return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)

    # ---- autograd
    def ratio_setup(ctx, inputs, output):
        g, num, zp, eps = inputs
        ctx.save_for_backward(g, num, zp)
        ctx.eps = eps

    def ratio_backward(ctx, grad):
        g, num, zp = ctx.saved_tensors
        d_g, d_num, d_zp = ratio_bwd(grad, g, num, zp, ctx.eps)
        return d_g, d_num, d_zp, None

    torch.library.register_autograd(f"fisnet::{ratio_name}", ratio_backward, setup_context=ratio_setup)

    def bwd_setup(ctx, inputs, output):
        gs, g, num, zp, eps = inputs
        ctx.save_for_backward(gs, g, num, zp)
        ctx.eps = eps

    torch.library.register_autograd(f"fisnet::{bwd_name}", _ratio_bwd_backward_torch, setup_context=bwd_setup)

    # ---- vmap: every tensor may be batched; the unbatched ones are expanded to the batch
    def _front(info, tensors, dims):
        return [ops._front(t, d, info.batch_size) for t, d in zip(tensors, dims)]

    @_register_vmap(f"fisnet::{ratio_name}")
    def _(info, in_dims, g, num, zp, eps):
        g, num, zp = _front(info, (g, num, zp), in_dims[:3])
        return ratio(g, num, zp, eps), 0

    @_register_vmap(f"fisnet::{bwd_name}")
    def _(info, in_dims, gs, g, num, zp, eps):
        gs, g, num, zp = _front(info, (gs, g, num, zp), in_dims[:4])
        return ratio_bwd(gs, g, num, zp, eps), (0, 0, 0)

    return ZPlusFamily(name, ratio, ratio_bwd)


NATIVE = _register_family("native", "zplus_ratio", "zplus_ratio_bwd")
TRITON = _register_family("triton", "zplus_ratio_triton", "zplus_ratio_bwd_triton") if HAVE_TRITON else None
REFERENCE = ZPlusFamily("reference", reference.zplus_ratio, reference.zplus_ratio_bwd)


def zplus_family(device: torch.device, backend: Optional[str] = None) -> ZPlusFamily:
    """The z⁺ ratio op family that runs on `device` under `backend` (default: the current
    backend); the same choice, and the same errors, as `fisnet_ext.ops.family`."""
    return ops.same_choice(device, backend, NATIVE, TRITON, REFERENCE)


def _check_args(op: str, eps, **tensors) -> float:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"fisnet.{op}: {name} must be a floating-point tensor, got {type(t).__name__}"
                            + (f" of dtype {t.dtype}" if isinstance(t, torch.Tensor) else ""))
    (ref_name, ref), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != ref.dtype:
            raise TypeError(f"fisnet.{op}: {name} is {t.dtype} but {ref_name} is {ref.dtype}; pass tensors of one dtype")
        if t.device != ref.device:
            raise ValueError(f"fisnet.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.shape != ref.shape:
            raise ValueError(f"fisnet.{op}: {name} has shape {tuple(t.shape)} but {ref_name} has shape "
                             f"{tuple(ref.shape)}; all tensors must have one shape")
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"fisnet.{op}: eps must be >= 0, got {eps}")
    return eps


def zplus_ratio(g: torch.Tensor, num: torch.Tensor, zp: torch.Tensor, eps: float,
                backend: Optional[str] = None) -> torch.Tensor:
    """``g * num / (zp + eps)`` (0 where ``zp + eps == 0``), fused; differentiable to any order
    in g, num and zp.  All three tensors must have one shape, dtype and device; eps >= 0."""
    eps = _check_args("zplus_ratio", eps, g=g, num=num, zp=zp)
    return zplus_family(g.device, backend).ratio(g, num, zp, eps)


def zplus_ratio_bwd(gs: torch.Tensor, g: torch.Tensor, num: torch.Tensor, zp: torch.Tensor, eps: float,
                    backend: Optional[str] = None):
    """``(d/dg, d/dnum, d/dzp)`` of `zplus_ratio` contracted with gs (differentiable)."""
    eps = _check_args("zplus_ratio_bwd", eps, gs=gs, g=g, num=num, zp=zp)
    return zplus_family(g.device, backend).ratio_bwd(gs, g, num, zp, eps)
