"""Triton kernels of the z⁺ rule's ratio step (Dual ISNet, SPEC §3.1).  Same semantics as
fisnet_ext.reference and the C++/CUDA kernels:

    zplus_ratio(g, num, zp, eps)         = g * num / (zp + eps)
    zplus_ratio_bwd(gs, g, num, zp, eps) = (gs * num / (zp + eps),           d/dg
                                            gs * g / (zp + eps),             d/dnum
                                            -gs * g * num / (zp + eps)^2)    d/dzp

All tensors have one shape and dtype.  Where zp + eps == 0 every output is 0 (a safe
denominator, then a select).  Half-precision inputs are computed in float32 and cast back;
float64 stays float64.  The launchers return new contiguous tensors.

Launch layout: a flat 1-D grid of BLOCK-element blocks; offsets are int64 when a tensor has
2^31 elements or more, int32 otherwise.

Importing this module imports triton: set TRITON_INTERPRET=1 before, to run on CPU tensors.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..zplus_ops import check_zplus  # the z⁺ ops' one Python check

__all__ = ["zplus_ratio", "zplus_ratio_bwd"]

_BLOCK = 4096
_NUM_WARPS = 8
_INT32_LIMIT = 2**31 - 1


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _offsets(n, BLOCK: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _ratio_kernel(g_ptr, num_ptr, zp_ptr, out_ptr, n, eps: tl.float64, ACC: tl.constexpr, BLOCK: tl.constexpr,
                  INT64: tl.constexpr):
    offs, mask = _offsets(n, BLOCK, INT64)
    e = tl.full([], eps, ACC)  # exact for fp64, also in the interpreter
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    num = tl.load(num_ptr + offs, mask=mask, other=0.0).to(ACC)
    zp = tl.load(zp_ptr + offs, mask=mask, other=0.0).to(ACC)
    den = zp + e
    nz = den != 0
    out = tl.where(nz, g * num / tl.where(nz, den, 1.0), 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ratio_bwd_kernel(gs_ptr, g_ptr, num_ptr, zp_ptr, dg_ptr, dnum_ptr, dzp_ptr, n, eps: tl.float64,
                      ACC: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    offs, mask = _offsets(n, BLOCK, INT64)
    e = tl.full([], eps, ACC)
    gs = tl.load(gs_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    num = tl.load(num_ptr + offs, mask=mask, other=0.0).to(ACC)
    zp = tl.load(zp_ptr + offs, mask=mask, other=0.0).to(ACC)
    den = zp + e
    nz = den != 0
    inv = 1.0 / tl.where(nz, den, 1.0)
    dg = tl.where(nz, gs * num * inv, 0.0)
    dnum = tl.where(nz, gs * g * inv, 0.0)
    dzp = tl.where(nz, -(gs * g * num) * (inv * inv), 0.0)
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(dnum_ptr + offs, dnum.to(dnum_ptr.dtype.element_ty), mask=mask)
    tl.store(dzp_ptr + offs, dzp.to(dzp_ptr.dtype.element_ty), mask=mask)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's device for the launch."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def zplus_ratio(g: torch.Tensor, num: torch.Tensor, zp: torch.Tensor, eps: float) -> torch.Tensor:
    """g * num / (zp + eps), 0 where zp + eps == 0."""
    check_zplus("zplus_ratio", eps, g=g, num=num, zp=zp)
    gc, nc, zc = g.contiguous(), num.contiguous(), zp.contiguous()
    out = torch.empty_like(gc)
    n = gc.numel()
    if n == 0:
        return out
    with _on_device(gc):
        _ratio_kernel[(triton.cdiv(n, _BLOCK),)](gc, nc, zc, out, n, float(eps), ACC=_acc_dtype(gc.dtype),
                                                 BLOCK=_BLOCK, INT64=n > _INT32_LIMIT - _BLOCK,
                                                 num_warps=_NUM_WARPS)
    return out


def zplus_ratio_bwd(gs: torch.Tensor, g: torch.Tensor, num: torch.Tensor, zp: torch.Tensor, eps: float):
    """(d/dg, d/dnum, d/dzp) of zplus_ratio contracted with gs; 0 where zp + eps == 0."""
    check_zplus("zplus_ratio_bwd", eps, gs=gs, g=g, num=num, zp=zp)
    gsc, gc, nc, zc = gs.contiguous(), g.contiguous(), num.contiguous(), zp.contiguous()
    dg, dnum, dzp = torch.empty_like(gc), torch.empty_like(gc), torch.empty_like(gc)
    n = gc.numel()
    if n == 0:
        return dg, dnum, dzp
    with _on_device(gc):
        _ratio_bwd_kernel[(triton.cdiv(n, _BLOCK),)](gsc, gc, nc, zc, dg, dnum, dzp, n, float(eps),
                                                     ACC=_acc_dtype(gc.dtype), BLOCK=_BLOCK,
                                                     INT64=n > _INT32_LIMIT - _BLOCK, num_warps=_NUM_WARPS)
    return dg, dnum, dzp
