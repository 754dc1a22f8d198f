"""Triton kernels of the LRP-Flex ReLU: forward (plain ReLU), heatmap backward and its
double backward.  Same semantics as fisnet_ext.reference and the C++/CUDA kernels:

    lrp_relu_fwd(x)                 = relu(x)
    lrp_relu_bwd(g, x, eps)         = x > 0 ? g * x / (x + eps) : 0
    lrp_relu_bwd_bwd(gg, g, x, eps) = (x > 0 ? gg * x / (x + eps) : 0,
                                       x > 0 ? gg * g * eps / (x + eps)^2 : 0)

`g` / `gg` may carry extra leading "slot" dimensions: g.shape == (*slots, *x.shape) and x is
broadcast over the slots.  Half-precision inputs are computed in float32 and cast back;
float64 stays float64.  The launchers return new contiguous tensors.

Launch layout: 1-D blocks of BLOCK elements.  Without slots (or with slots, when x is small)
the grid is flat over g and x is indexed by ``i % x.numel()``; when x is large the grid is
(blocks of x) x (slots), so no integer division runs per element and x is read contiguously.
Offsets are int64 when a tensor has 2^31 elements or more, int32 otherwise.

Importing this module imports triton: set TRITON_INTERPRET=1 before, to run on CPU tensors.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..opgroup import check_slot_args  # the element-wise groups' one Python check

__all__ = ["lrp_relu_fwd", "lrp_relu_bwd", "lrp_relu_bwd_bwd"]

# 16 elements per thread at 8 warps: four 128-bit accesses per tensor for fp32, two for fp16/bf16.
_BLOCK = 4096
_NUM_WARPS = 8
_INT32_LIMIT = 2**31 - 1
_MAX_GRID_Y = 65535  # CUDA's limit on grid dimensions 1 and 2


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_float(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"fisnet: {name} must be a floating-point tensor, got {t.dtype}")


@triton.jit
def _offsets(n, nx, BLOCK: tl.constexpr, SLOT_GRID: tl.constexpr, BCAST: tl.constexpr, INT64: tl.constexpr):
    """Offsets into g (og), into x (ox) and the mask of one block."""
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    if SLOT_GRID:
        # grid (cdiv(nx, BLOCK), slots): this block covers x[pid*BLOCK : ...] in one slot
        slot = tl.program_id(1)
        if INT64:
            ox = pid.to(tl.int64) * BLOCK + lane
            og = slot.to(tl.int64) * nx + ox
        else:
            ox = pid * BLOCK + lane
            og = slot * nx + ox
        mask = ox < nx
    else:
        if INT64:
            og = pid.to(tl.int64) * BLOCK + lane
        else:
            og = pid * BLOCK + lane
        mask = og < n
        if BCAST:
            ox = og % nx
        else:
            ox = og
    return og, ox, mask


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    # like torch.relu: NaN propagates, everything not > 0 becomes 0
    y = tl.where((x > 0) | (x != x), x, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(g_ptr, x_ptr, out_ptr, n, nx, eps: tl.float64, ACC: tl.constexpr, BLOCK: tl.constexpr,
                SLOT_GRID: tl.constexpr, BCAST: tl.constexpr, INT64: tl.constexpr):
    og, ox, mask = _offsets(n, nx, BLOCK, SLOT_GRID, BCAST, INT64)
    e = tl.full([], eps, ACC)  # exact for fp64, also in the interpreter
    x = tl.load(x_ptr + ox, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + og, mask=mask, other=0.0).to(ACC)
    pos = x > 0
    den = tl.where(pos, x + e, 1.0)  # safe denominator; masked to 0 below
    out = tl.where(pos, g * x / den, 0.0)
    tl.store(out_ptr + og, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_bwd_kernel(gg_ptr, g_ptr, x_ptr, dg_ptr, dx_ptr, n, nx, eps: tl.float64, ACC: tl.constexpr,
                    BLOCK: tl.constexpr, SLOT_GRID: tl.constexpr, BCAST: tl.constexpr, INT64: tl.constexpr):
    og, ox, mask = _offsets(n, nx, BLOCK, SLOT_GRID, BCAST, INT64)
    e = tl.full([], eps, ACC)  # exact for fp64, also in the interpreter
    x = tl.load(x_ptr + ox, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + og, mask=mask, other=0.0).to(ACC)
    gg = tl.load(gg_ptr + og, mask=mask, other=0.0).to(ACC)
    pos = x > 0
    inv = 1.0 / tl.where(pos, x + e, 1.0)
    dg = tl.where(pos, gg * x * inv, 0.0)
    dx = tl.where(pos, gg * g * (e * inv * inv), 0.0)
    tl.store(dg_ptr + og, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + og, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's device for the launch."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _layout(n: int, nx: int):
    """Launch grid and constexpr flags for a g of n elements over an x of nx elements."""
    slots = n // nx
    int64 = n > _INT32_LIMIT - _BLOCK
    if slots > 1 and nx >= 4 * _BLOCK and slots <= _MAX_GRID_Y:
        return (triton.cdiv(nx, _BLOCK), slots), dict(SLOT_GRID=True, BCAST=True, INT64=int64)
    return (triton.cdiv(n, _BLOCK),), dict(SLOT_GRID=False, BCAST=slots > 1, INT64=int64)


def lrp_relu_fwd(x: torch.Tensor) -> torch.Tensor:
    """relu(x) as a new contiguous tensor."""
    _check_float(x, "x")
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n = xc.numel()
    if n == 0:
        return y
    grid = (triton.cdiv(n, _BLOCK),)
    with _on_device(xc):
        _fwd_kernel[grid](xc, y, n, BLOCK=_BLOCK, INT64=n > _INT32_LIMIT - _BLOCK, num_warps=_NUM_WARPS)
    return y


def lrp_relu_bwd(g: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x > 0 ? g * x / (x + eps) : 0, x broadcast over g's leading slot dimensions."""
    check_slot_args("lrp_relu_bwd", g, x, eps)
    gc, xc = g.contiguous(), x.contiguous()
    out = torch.empty_like(gc)
    n, nx = gc.numel(), xc.numel()
    if n == 0:
        return out
    grid, flags = _layout(n, nx)
    with _on_device(xc):
        _bwd_kernel[grid](gc, xc, out, n, nx, float(eps), ACC=_acc_dtype(xc.dtype), BLOCK=_BLOCK,
                          num_warps=_NUM_WARPS, **flags)
    return out


def lrp_relu_bwd_bwd(gg: torch.Tensor, g: torch.Tensor, x: torch.Tensor, eps: float):
    """(dg, dx) of lrp_relu_bwd contracted with gg; both have g's shape."""
    check_slot_args("lrp_relu_bwd_bwd", g, x, eps, gg)
    ggc, gc, xc = gg.contiguous(), g.contiguous(), x.contiguous()
    dg = torch.empty_like(gc)
    dx = torch.empty_like(gc)
    n, nx = gc.numel(), xc.numel()
    if n == 0:
        return dg, dx
    grid, flags = _layout(n, nx)
    with _on_device(xc):
        _bwd_bwd_kernel[grid](ggc, gc, xc, dg, dx, n, nx, float(eps), ACC=_acc_dtype(xc.dtype), BLOCK=_BLOCK,
                              num_warps=_NUM_WARPS, **flags)
    return dg, dx
