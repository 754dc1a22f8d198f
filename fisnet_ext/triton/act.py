"""Triton kernels of the lrp_act family: forward φ(z), identity-rule heatmap backward and its
double backward.  Same semantics as fisnet_ext.reference (act_*) and csrc/act_math.h:

    fwd(x, kind, p)                 = φ(x)
    bwd(g, x, kind, p, eps)         = g * h(x),           h(z) = φ(z) / (z + eps * sign z)
    bwd_bwd(gg, g, x, kind, p, eps) = (gg * h(x), gg * g * h'(x))

The kind is a compile-time constant (one specialisation per kind).  expm1, log1p and tanh are
written with exp and log (Kahan's tricks for expm1/log1p: accurate near 0), so the kernels use
only what the Triton interpreter has too.  Layout, slots, int64 offsets and dtypes as in
fisnet_ext/triton/lrp_relu.py (whose helpers are reused).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..act_ops import check_act_launch
from .lrp_relu import _BLOCK, _INT32_LIMIT, _NUM_WARPS, _acc_dtype, _layout, _offsets, _on_device

__all__ = ["fwd", "bwd", "bwd_bwd"]

_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5
_KAPPA = 0.044715


@triton.jit
def _expm1(x):
    u = tl.exp(x)
    um1 = u - 1.0
    inner = um1 * x / tl.log(tl.where((u == 1.0) | (um1 == -1.0), 2.0, u).to(x.dtype))
    r = tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, inner))
    return tl.where(u == float("inf"), u, r)


@triton.jit
def _log1p(x):
    u = 1.0 + x
    safe = tl.where(u == 1.0, 2.0, u).to(x.dtype)
    r = tl.where(u == 1.0, x, tl.log(safe) * x / (safe - 1.0))
    return tl.where(u == float("inf"), u, r)


@triton.jit
def _tanh(x):
    t = _expm1(-2.0 * tl.abs(x))
    a = -t / (2.0 + t)
    return tl.where(x < 0, -a, a)


@triton.jit
def _phi(z, p, KIND: tl.constexpr, ACC: tl.constexpr):
    if KIND == 0:
        f = tl.where((z > 0) | (z != z), z, 0.0)
    elif KIND == 1:
        lo = tl.where(z < 0, 0.0, z)
        f = tl.where(lo > 6.0, 6.0, lo)
    elif KIND == 2:
        f = tl.where(z > 0, z, z * p)
    elif KIND == 3:
        f = z * 0.5 * (1.0 + tl.math.erf(z * tl.full([], _SQRT1_2, ACC)))
    elif KIND == 4:
        inner = tl.full([], _BETA, ACC) * (z + tl.full([], _KAPPA, ACC) * (z * z * z))
        f = 0.5 * z * (1.0 + _tanh(inner))
    elif KIND == 5:
        f = z / (1.0 + tl.exp(-z))
    elif KIND == 6:
        c = z + 3.0
        c = tl.where(c < 0, 0.0, c)
        c = tl.where(c > 6.0, 6.0, c)
        f = z * c / 6.0
    elif KIND == 7:
        f = tl.where(z <= 0, _expm1(z) * p, z)
    elif KIND == 8:
        f = z * _tanh(_log1p(tl.exp(z)))
    else:
        bz = z * p
        f = tl.where(bz > 20.0, z, _log1p(tl.exp(bz)) / p)
    return f.to(ACC)


@triton.jit
def _ratio(z, p, KIND: tl.constexpr, ACC: tl.constexpr):
    """(r, r') with r = φ(z)/z, r(0) = φ'(0); softplus: (φ', 0)."""
    zero = tl.zeros_like(z)
    if KIND == 0:
        r = tl.where(z > 0, 1.0, 0.0)
        rp = zero
    elif KIND == 1:
        hi = z >= 6.0
        inv = 1.0 / tl.where(hi, z, 6.0)
        r = tl.where(hi, 6.0 * inv, tl.where(z > 0, 1.0, 0.0))
        rp = tl.where(hi, -6.0 * inv * inv, 0.0)
    elif KIND == 2:
        r = tl.where(z > 0, 1.0, p)
        rp = zero
    elif KIND == 3:
        r = 0.5 * (1.0 + tl.math.erf(z * tl.full([], _SQRT1_2, ACC)))
        rp = tl.exp(-0.5 * z * z) * tl.full([], _INV_SQRT_2PI, ACC)
    elif KIND == 4:
        beta = tl.full([], _BETA, ACC)
        kappa = tl.full([], _KAPPA, ACC)
        e = tl.exp(-2.0 * (beta * (z + kappa * (z * z * z))))
        r = 1.0 / (1.0 + e)  # (1 + tanh u)/2 = sigmoid(2u); g (1 - g) = e g^2
        rp = tl.where(r > 0, 2.0 * e * r * r, 0.0) * beta * (1.0 + 3.0 * kappa * z * z)
    elif KIND == 5:
        s = 1.0 / (1.0 + tl.exp(-z))
        r = s
        rp = s * (1.0 - s)
    elif KIND == 6:
        c = z + 3.0
        c = tl.where(c < 0, 0.0, c)
        c = tl.where(c > 6.0, 6.0, c)
        r = c / 6.0
        rp = tl.where((z > -3.0) & (z < 3.0), tl.full([], 1.0, ACC) / 6.0, 0.0)
    elif KIND == 7:
        neg = z < 0
        zs = tl.where(neg, z, -1.0)
        em = _expm1(zs)
        r = tl.where(z > 0, 1.0, tl.where(neg, p * (em / zs), p))
        zz = tl.where(z <= 0, z, 0.0)
        one = tl.full([], 1.0, ACC)
        series = one / 2.0 + zz * (one / 3.0 + zz * (one / 8.0 + zz * (one / 30.0 + zz * (
            one / 144.0 + zz * (one / 840.0 + zz * (one / 5760.0 + zz * (one / 45360.0 + zz * (
                one / 403200.0 + zz * (one / 3991680.0)))))))))
        direct = (zs * (em + 1.0) - em) / (zs * zs)
        rp = tl.where(z > 0, 0.0, p * tl.where(zz > -0.25, series, direct))
    elif KIND == 8:
        t = _tanh(_log1p(tl.exp(z)))
        r = t
        rp = (1.0 - t * t) / (1.0 + tl.exp(-z))
    else:
        bz = z * p
        big = bz > 20.0
        e = tl.exp(tl.where(big, 0.0, bz))
        r = tl.where(big, 1.0, e / (e + 1.0))
        rp = zero
    return r.to(ACC), rp.to(ACC)


@triton.jit
def _factor(z, p, e, KIND: tl.constexpr, ACC: tl.constexpr):
    se = tl.where(z < 0, -e, e)
    d = z + se
    nz = d != 0
    dd = tl.where(nz, d, 1.0)
    inv = 1.0 / dd
    r, rp = _ratio(z, p, KIND, ACC)
    if KIND == 9:
        h = _phi(z, p, KIND, ACC) / dd
        hp = (r - h) / dd
    else:
        rho = tl.where(nz, z / dd, 1.0)  # exactly 1 when eps == 0
        h = rho * r
        hp = rho * rp + se * inv * inv * r
    return h.to(ACC), hp.to(ACC)


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, n, param: tl.float64, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                INT64: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.full([], param, ACC)
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = _phi(z, p, KIND, ACC)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(g_ptr, x_ptr, out_ptr, n, nx, param: tl.float64, eps: tl.float64, KIND: tl.constexpr,
                ACC: tl.constexpr, BLOCK: tl.constexpr, SLOT_GRID: tl.constexpr, BCAST: tl.constexpr,
                INT64: tl.constexpr):
    og, ox, mask = _offsets(n, nx, BLOCK, SLOT_GRID, BCAST, INT64)
    p = tl.full([], param, ACC)
    e = tl.full([], eps, ACC)
    z = tl.load(x_ptr + ox, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + og, mask=mask, other=0.0).to(ACC)
    h, hp = _factor(z, p, e, KIND, ACC)
    tl.store(out_ptr + og, (g * h).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_bwd_kernel(gg_ptr, g_ptr, x_ptr, dg_ptr, dx_ptr, n, nx, param: tl.float64, eps: tl.float64,
                    KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, SLOT_GRID: tl.constexpr,
                    BCAST: tl.constexpr, INT64: tl.constexpr):
    og, ox, mask = _offsets(n, nx, BLOCK, SLOT_GRID, BCAST, INT64)
    p = tl.full([], param, ACC)
    e = tl.full([], eps, ACC)
    z = tl.load(x_ptr + ox, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + og, mask=mask, other=0.0).to(ACC)
    gg = tl.load(gg_ptr + og, mask=mask, other=0.0).to(ACC)
    h, hp = _factor(z, p, e, KIND, ACC)
    tl.store(dg_ptr + og, (gg * h).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + og, (gg * g * hp).to(dx_ptr.dtype.element_ty), mask=mask)


def fwd(x: torch.Tensor, kind: int, param: float) -> torch.Tensor:
    """φ(x) as a new contiguous tensor."""
    check_act_launch("act_fwd", None, x, kind, param, 0.0)
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n = xc.numel()
    if n == 0:
        return y
    with _on_device(xc):
        _fwd_kernel[(triton.cdiv(n, _BLOCK),)](xc, y, n, float(param), KIND=int(kind), ACC=_acc_dtype(xc.dtype),
                                              BLOCK=_BLOCK, INT64=n > _INT32_LIMIT - _BLOCK, num_warps=_NUM_WARPS)
    return y


def bwd(g: torch.Tensor, x: torch.Tensor, kind: int, param: float, eps: float) -> torch.Tensor:
    """g * h(x), x broadcast over g's leading slot dimensions."""
    check_act_launch("act_bwd", g, x, kind, param, eps)
    gc, xc = g.contiguous(), x.contiguous()
    out = torch.empty_like(gc)
    n, nx = gc.numel(), xc.numel()
    if n == 0:
        return out
    grid, flags = _layout(n, nx)
    with _on_device(xc):
        _bwd_kernel[grid](gc, xc, out, n, nx, float(param), float(eps), KIND=int(kind), ACC=_acc_dtype(xc.dtype),
                          BLOCK=_BLOCK, num_warps=_NUM_WARPS, **flags)
    return out


def bwd_bwd(gg: torch.Tensor, g: torch.Tensor, x: torch.Tensor, kind: int, param: float, eps: float):
    """(gg * h(x), gg * g * h'(x)), both of g's shape."""
    check_act_launch("act_bwd_bwd", g, x, kind, param, eps, gg)
    ggc, gc, xc = gg.contiguous(), g.contiguous(), x.contiguous()
    dg = torch.empty_like(gc)
    dx = torch.empty_like(gc)
    n, nx = gc.numel(), xc.numel()
    if n == 0:
        return dg, dx
    grid, flags = _layout(n, nx)
    with _on_device(xc):
        _bwd_bwd_kernel[grid](ggc, gc, xc, dg, dx, n, nx, float(param), float(eps), KIND=int(kind),
                              ACC=_acc_dtype(xc.dtype), BLOCK=_BLOCK, num_warps=_NUM_WARPS, **flags)
    return dg, dx
