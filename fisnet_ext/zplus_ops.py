"""The z⁺ rule's ratio step (Dual ISNet, SPEC §3.1) as fused custom ops, with their autograd.

Ops (namespace ``torch.ops.fisnet``; schemas in csrc/fisnet_ops.cpp):

* ``zplus_ratio(g, num, zp, eps)``          ``s = g * num / (zp + eps)``
* ``zplus_ratio_bwd(gs, g, num, zp, eps)``  its derivative contracted with ``gs``:
  ``(gs * num / (zp + eps), gs * g / (zp + eps), -gs * g * num / (zp + eps)^2)``

All tensors have one shape and dtype; eps >= 0.  Where ``zp + eps == 0`` every output is 0: the
kernels divide by a safe denominator there and select 0 (so eps = 0 with zp = 0 gives 0, not
NaN; NaN/inf in the inputs still propagate elsewhere).  The derivatives follow the same
convention (they are 0 there), which is the derivative of the op away from those points.

Like the lrp_relu family, each op has a C++ CPU kernel, a CUDA kernel (with FISNET_CUDA=1), a
Triton kernel (the ``fisnet::zplus_ratio_triton`` / ``fisnet::zplus_ratio_bwd_triton`` custom ops)
and the pure-PyTorch reference; they are registered through the op-group template
(`fisnet_ext.opgroup.OpGroup`): fake (meta) kernels, autograd (the ratio's backward is the fused
bwd op; the bwd op's own autograd is written in PyTorch, so third derivatives exist), vmap rules
(every tensor argument may be batched; unbatched ones are expanded to the common batched shape)
and the backend choice.

``zplus_ratio(g, num, zp, eps, backend=None)`` is the differentiable public function; the
backend is chosen as for lrp_relu (honouring `fisnet_ext.backend.current_backend()` and
``FISNET_BACKEND``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .opgroup import HAVE_TRITON, NEXT, Op, OpGroup, check_eps, check_tensors, vmap_expand  # noqa: F401


def _triton():
    from .triton import zplus as tz  # imported lazily: importing triton is slow

    return tz.zplus_ratio, tz.zplus_ratio_bwd


def _safe_inv(zp: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / (zp + eps), 0 where zp + eps == 0 (differentiable: its derivative is -inv^2 there too)."""
    den = zp + eps
    nz = den != 0
    return torch.where(nz, 1.0 / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(den))


def _ratio_bwd_grad(saved, params, a, b, c):
    """Autograd of zplus_ratio_bwd in PyTorch ops (third derivatives; rarely used).

    With inv = 1/(zp+eps): dg = gs*num*inv, dnum = gs*g*inv, dzp = -gs*g*num*inv^2, and
    d inv / d zp = -inv^2, d inv^2 / d zp = -2 inv^3."""
    gs, g, num, zp = saved
    (eps,) = params
    inv = _safe_inv(zp, eps)
    inv2 = inv * inv
    a = torch.zeros_like(g) if a is None else a
    b = torch.zeros_like(g) if b is None else b
    c = torch.zeros_like(g) if c is None else c
    d_gs = a * num * inv + b * g * inv - c * g * num * inv2
    d_g = b * gs * inv - c * gs * num * inv2
    d_num = a * gs * inv - c * gs * g * inv2
    d_zp = -(a * gs * num + b * gs * g) * inv2 + 2.0 * c * gs * g * num * inv2 * inv
    return d_gs, d_g, d_num, d_zp


def _same_shapes(*ts):
    shape = tuple(ts[0].shape)
    for t in ts[1:]:
        torch._check(tuple(t.shape) == shape,
                     lambda: f"fisnet.zplus_ratio: shapes {[tuple(u.shape) for u in ts]} differ; "
                             "all tensors must have one shape")


def _fake_ratio(g, num, zp, eps):
    _same_shapes(g, num, zp)
    return torch.empty_like(g)


def _fake_ratio_bwd(gs, g, num, zp, eps):
    _same_shapes(gs, g, num, zp)
    return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)


GROUP = OpGroup("ZPlusFamily", [
    Op("ratio", "zplus_ratio", "(Tensor g, Tensor num, Tensor zp, float eps) -> Tensor", reference.zplus_ratio,
       _fake_ratio, vmap_expand(3), 3, grad=NEXT),
    Op("ratio_bwd", "zplus_ratio_bwd", "(Tensor gs, Tensor g, Tensor num, Tensor zp, float eps) -> (Tensor, Tensor, Tensor)",
       reference.zplus_ratio_bwd, _fake_ratio_bwd, vmap_expand(4), 4, grad=_ratio_bwd_grad),
], triton=_triton)
NATIVE, TRITON, REFERENCE = GROUP.native, GROUP.triton_ops, GROUP.reference_ops
ZPlusFamily = GROUP.Backend  # the two ops of one backend: name, ratio, ratio_bwd


def zplus_family(device: torch.device, backend: Optional[str] = None) -> ZPlusFamily:
    """The z⁺ ratio op family that runs on `device` under `backend` (default: the current
    backend); the same choice, and the same errors, as `fisnet_ext.ops.family`."""
    return GROUP.choose(device, backend)


def check_zplus(op: str, eps, **tensors) -> float:
    """The Python argument check of the z⁺ ops: floating-point tensors of one dtype, device and
    shape; eps >= 0."""
    check_tensors(op, same_shape=True, **tensors)
    return check_eps(op, eps)


def zplus_ratio(g: torch.Tensor, num: torch.Tensor, zp: torch.Tensor, eps: float,
                backend: Optional[str] = None) -> torch.Tensor:
    """``g * num / (zp + eps)`` (0 where ``zp + eps == 0``), fused; differentiable to any order
    in g, num and zp.  All three tensors must have one shape, dtype and device; eps >= 0."""
    eps = check_zplus("zplus_ratio", eps, g=g, num=num, zp=zp)
    return zplus_family(g.device, backend).ratio(g, num, zp, eps)


def zplus_ratio_bwd(gs: torch.Tensor, g: torch.Tensor, num: torch.Tensor, zp: torch.Tensor, eps: float,
                    backend: Optional[str] = None):
    """``(d/dg, d/dnum, d/dzp)`` of `zplus_ratio` contracted with gs (differentiable)."""
    eps = check_zplus("zplus_ratio_bwd", eps, gs=gs, g=g, num=num, zp=zp)
    return zplus_family(g.device, backend).ratio_bwd(gs, g, num, zp, eps)
