"""Triton kernels of training-mode BatchNorm's input gradient and its derivative.  Same semantics
as fisnet_ext.reference (bn_train_bwd, bn_train_bwd_bwd; its comment block is the spec):

x has shape (N, C, *); per channel c, with n = N * prod(*) values, mean μ, biased variance σ²,
r = (σ² + eps)^-1/2, x̂ = (x - μ) r and s = γ r (γ = weight, shape (C,)):

    bn_train_bwd(g, x, γ, eps)        = s (g - mean(g) - x̂ mean(g x̂))
    bn_train_bwd_bwd(h, g, x, γ, eps) = (d_g, d_x, d_γ), with A = mean(h), Bm = mean(h x̂),
        ḡ = mean(g), m = mean(g x̂), Dn = mean(h g) - A ḡ - Bm m:
        d_g = s (h - A - x̂ Bm)
        d_x = -s r (m (h - A) + Bm (g - ḡ) + (Dn - 2 m Bm) x̂)
        d_γ = r Dn n

Means are per channel over N and *.  g and h may carry leading "slot" dimensions,
g.shape == (*slots, *x.shape): every slot is an independent map with its own means, x is shared
(broadcast, never copied), and d_x and d_γ are summed over the slots.

Half-precision inputs are computed in float32 and cast back; the accumulation type is float64
when any input is float64, float32 otherwise.  d_g has g's dtype, d_x x's, d_γ weight's (weight
may have a dtype other than x's, as under autocast).  The launchers return new contiguous tensors.

Layout: x is viewed as (N, C, L) and g, h as (S, N, C, L) (S = the product of the slot dims, L
the product of *).  Each channel's (N, L) plane is cut into tiles of BLOCK_N x BLOCK_L elements
(BLOCK_L the smallest power of two >= L, at most the block size; the rows of a tile are
contiguous runs of L), so no integer division runs per element.

  1. _stats_kernel: one program per (slot, channel, split); it loops over every SPLIT-th tile
     of the plane and accumulates, in the accumulation type, the sums of d = x - p, d², g, g d
     (and h, h d, h g), where p = x[0, c, 0] is a per-channel pivot: with it the variance
     Σd²/n - (Σd/n)² does not cancel when |μ| >> σ.  The partial sums go to an (S, C, SPLIT, K)
     buffer.  SPLIT > 1 splits a channel's reduction over several programs when S * C alone
     gives too few programs to fill a GPU.
  2. Torch sums the partials over SPLIT and turns them into per-(slot, channel) coefficients
     (tiny (S, C) tensors) such that every output is an affine combination of g, h and x - μ.
     The kernels form x - μ as (x - p) - mean(x - p): μ itself is never rounded to the data
     type, which would cost x̂ about ulp(|μ|) r of absolute precision.
  3. An elementwise kernel writes the outputs.  bn_train_bwd: one program per (tile, channel,
     slot).  bn_train_bwd_bwd: one program per (tile, channel) that loads its x tile once and
     loops over the slots, writing each slot's d_g and accumulating d_x in registers, so the sum
     over slots needs neither atomics nor a temporary.

Program ids are flat (grid axis 0 only), so no grid dimension limit applies to C or S.  Offsets
are int64 when a tensor has 2^31 elements or more, int32 otherwise.

Edge cases: with no slots' worth of data (S == 0), d_x and d_γ are zeros (an empty sum); with
n == 0 (an empty batch) the statistics are undefined and d_γ is NaN, as in the reference.

Importing this module imports triton: set TRITON_INTERPRET=1 before, to run on CPU tensors.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ..bn_ops import check_bn  # the BatchNorm ops' one Python check

__all__ = ["bn_train_bwd", "bn_train_bwd_bwd"]

# Reduction tiles: 1024 elements at 4 warps, 8 per thread and up to 7 accumulators each.
_RED_BLOCK = 1024
_RED_NUM_WARPS = 4
# Elementwise tiles: 4096 elements at 8 warps, 16 per thread.
_EW_BLOCK = 4096
_EW_NUM_WARPS = 8
# Split a channel's reduction until the stats grid has about this many programs.
_TARGET_PROGRAMS = 1024
_INT32_LIMIT = 2**31 - 1

_K_BWD = 4        # Σd, Σd², Σg, Σg d
_K_BWD_BWD = 7    # ... and Σh, Σh d, Σh g


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _tile_offsets(t, n_ltiles, N, L, CL, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, INT64: tl.constexpr):
    """Offsets (relative to a channel's x[0, c, 0]) and mask of tile t of the (N, L) plane."""
    tn = t // n_ltiles
    tlc = t - tn * n_ltiles
    rows = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tlc * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (rows < N)[:, None] & (cols < L)[None, :]
    if INT64:
        rows = rows.to(tl.int64)
    offs = rows[:, None] * CL + cols[None, :]
    return offs, mask


@triton.jit
def _stats_kernel(x_ptr, g_ptr, h_ptr, part_ptr, N, C, L, CL, NCL, n_ltiles, n_tiles, SPLIT,
                  ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, HAS_H: tl.constexpr,
                  K: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    k = pid % SPLIT
    sc = pid // SPLIT  # slot * C + c
    c = sc % C
    slot = sc // C
    if INT64:
        c = c.to(tl.int64)
        slot = slot.to(tl.int64)
    x_base = c * L
    g_base = slot * NCL + x_base
    p = tl.load(x_ptr + x_base).to(ACC)  # the pivot x[0, c, 0]; n > 0 here
    s_d = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    s_dd = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    s_g = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    s_gd = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    s_h = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    s_hd = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    s_hg = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    n_iter = (n_tiles - k + SPLIT - 1) // SPLIT
    for i in range(0, n_iter):
        t = k + i * SPLIT
        offs, mask = _tile_offsets(t, n_ltiles, N, L, CL, BLOCK_N, BLOCK_L, INT64)
        x = tl.load(x_ptr + x_base + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + g_base + offs, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, x - p, 0.0)
        s_d += d
        s_dd += d * d
        s_g += g
        s_gd += g * d
        if HAS_H:
            h = tl.load(h_ptr + g_base + offs, mask=mask, other=0.0).to(ACC)
            s_h += h
            s_hd += h * d
            s_hg += h * g
    out = part_ptr + pid * K  # part[slot, c, k, :]
    tl.store(out + 0, tl.sum(tl.sum(s_d, 1), 0))
    tl.store(out + 1, tl.sum(tl.sum(s_dd, 1), 0))
    tl.store(out + 2, tl.sum(tl.sum(s_g, 1), 0))
    tl.store(out + 3, tl.sum(tl.sum(s_gd, 1), 0))
    if HAS_H:
        tl.store(out + 4, tl.sum(tl.sum(s_h, 1), 0))
        tl.store(out + 5, tl.sum(tl.sum(s_hd, 1), 0))
        tl.store(out + 6, tl.sum(tl.sum(s_hg, 1), 0))


@triton.jit
def _bwd_kernel(g_ptr, x_ptr, md_ptr, coef_ptr, out_ptr, N, C, L, CL, NCL, n_ltiles, n_tiles,
                ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, INT64: tl.constexpr):
    """out = cg * g + cx * (x - μ) + c0, coefficients per (slot, channel)."""
    pid = tl.program_id(0)
    t = pid % n_tiles
    sc = pid // n_tiles  # slot * C + c
    c = sc % C
    slot = sc // C
    if INT64:
        c = c.to(tl.int64)
        slot = slot.to(tl.int64)
    x_base = c * L
    g_base = slot * NCL + x_base
    p = tl.load(x_ptr + x_base).to(ACC)  # the pivot: x - μ = (x - p) - mean(x - p), (x - p) exact near p
    md = tl.load(md_ptr + c)
    cg = tl.load(coef_ptr + sc * 3 + 0)
    cx = tl.load(coef_ptr + sc * 3 + 1)
    c0 = tl.load(coef_ptr + sc * 3 + 2)
    offs, mask = _tile_offsets(t, n_ltiles, N, L, CL, BLOCK_N, BLOCK_L, INT64)
    x = tl.load(x_ptr + x_base + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + g_base + offs, mask=mask, other=0.0).to(ACC)
    out = cg * g + cx * ((x - p) - md) + c0
    tl.store(out_ptr + g_base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_bwd_kernel(h_ptr, g_ptr, x_ptr, md_ptr, coef_ptr, dg_ptr, dx_ptr, S, N, C, L, CL, NCL, n_ltiles,
                    n_tiles, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                    INT64: tl.constexpr):
    """Per slot: d_g = a0 h + a1 (x - μ) + a2;  d_x = Σ_slots b0 h + b1 g + b2 (x - μ) + b3."""
    pid = tl.program_id(0)
    t = pid % n_tiles
    c = pid // n_tiles
    if INT64:
        c = c.to(tl.int64)
    x_base = c * L
    p = tl.load(x_ptr + x_base).to(ACC)  # the pivot, as in _bwd_kernel
    md = tl.load(md_ptr + c)
    offs, mask = _tile_offsets(t, n_ltiles, N, L, CL, BLOCK_N, BLOCK_L, INT64)
    xc = (tl.load(x_ptr + x_base + offs, mask=mask, other=0.0).to(ACC) - p) - md
    dx = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    g_base = x_base  # slot sl's channel c starts at sl * NCL + c * L; int64 when INT64
    for sl in range(0, S):
        cp = coef_ptr + (sl * C + c) * 7
        a0 = tl.load(cp + 0)
        a1 = tl.load(cp + 1)
        a2 = tl.load(cp + 2)
        b0 = tl.load(cp + 3)
        b1 = tl.load(cp + 4)
        b2 = tl.load(cp + 5)
        b3 = tl.load(cp + 6)
        g_off = g_base + offs
        g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(ACC)
        h = tl.load(h_ptr + g_off, mask=mask, other=0.0).to(ACC)
        dg = a0 * h + a1 * xc + a2
        tl.store(dg_ptr + g_off, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        dx += b0 * h + b1 * g + b2 * xc + b3
        g_base += NCL
    tl.store(dx_ptr + x_base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's device for the launch."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class _Layout:
    """x as (N, C, L), the maps as (S, N, C, L), and the tiling of a channel's (N, L) plane."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor):
        self.N, self.C = x.shape[0], x.shape[1]
        self.L = math.prod(x.shape[2:])
        self.S = math.prod(g.shape[: g.dim() - x.dim()])
        self.n = self.N * self.L
        self.CL = self.C * self.L
        self.NCL = self.N * self.CL
        self.int64 = g.numel() > _INT32_LIMIT - 2 * _EW_BLOCK or x.numel() > _INT32_LIMIT - 2 * _EW_BLOCK

    def tiles(self, block: int):
        """(BLOCK_N, BLOCK_L, tiles along L, tiles in all) for tiles of `block` elements."""
        block_l = min(triton.next_power_of_2(self.L), block)
        block_n = block // block_l
        n_ltiles = triton.cdiv(self.L, block_l)
        return block_n, block_l, n_ltiles, triton.cdiv(self.N, block_n) * n_ltiles

    def args(self):
        return (self.N, self.C, self.L, self.CL, self.NCL)


def _stats(lay: _Layout, x, g, h, acc: torch.dtype):
    """Per-(slot, channel) sums (S, C, K) of d, d², g, g d (, h, h d, h g); d = x - x[0, c, 0]."""
    K = _K_BWD if h is None else _K_BWD_BWD
    block_n, block_l, n_ltiles, n_tiles = lay.tiles(_RED_BLOCK)
    split = max(1, min(n_tiles, triton.cdiv(_TARGET_PROGRAMS, lay.S * lay.C)))
    part = torch.empty((lay.S, lay.C, split, K), dtype=acc, device=x.device)
    _stats_kernel[(lay.S * lay.C * split,)](
        x, g, g if h is None else h, part, *lay.args(), n_ltiles, n_tiles, split, ACC=_tl_dtype(acc),
        BLOCK_N=block_n, BLOCK_L=block_l, HAS_H=h is not None, K=K, INT64=lay.int64,
        num_warps=_RED_NUM_WARPS)
    return part.sum(2)


def _moments(lay: _Layout, sums: torch.Tensor, eps: float):
    """(r, mean of d = x - pivot) per channel, from slot 0's sums (x's sums are per channel).
    μ = pivot + mean_d is never formed: the kernels take x - μ as (x - pivot) - mean_d, which keeps
    x̂'s precision when |μ| >> σ (μ itself would be rounded to the data type's ulp of |μ|)."""
    n = lay.n
    mean_d = sums[0, :, 0] / n
    var = (sums[0, :, 1] / n - mean_d * mean_d).clamp_min(0.0)
    return torch.rsqrt(var + eps), mean_d.contiguous()


def bn_train_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """s (g - mean(g) - x̂ mean(g x̂)) per channel and slot; g's shape and dtype."""
    check_bn("bn_train_bwd", eps, x, weight, one_dtype=False, g=g)
    gc, xc = g.contiguous(), x.contiguous()
    out = torch.empty_like(gc)
    lay = _Layout(xc, gc)
    if gc.numel() == 0:
        return out
    acc = _acc_dtype(gc, xc, weight)
    with _on_device(xc):
        sums = _stats(lay, xc, gc, None, acc)
        r, mean_d = _moments(lay, sums, eps)
        n = lay.n
        s = weight.to(acc) * r                                  # (C,)
        gm = sums[:, :, 2] / n                                  # (S, C)
        gxm = r * (sums[:, :, 3] / n - gm * mean_d)             # mean(g x̂)
        coef = torch.stack([s.expand_as(gm), -s * r * gxm, -s * gm], dim=-1).contiguous()
        block_n, block_l, n_ltiles, n_tiles = lay.tiles(_EW_BLOCK)
        _bwd_kernel[(n_tiles * lay.C * lay.S,)](
            gc, xc, mean_d, coef, out, *lay.args(), n_ltiles, n_tiles, ACC=_tl_dtype(acc),
            BLOCK_N=block_n, BLOCK_L=block_l, INT64=lay.int64, num_warps=_EW_NUM_WARPS)
    return out


def bn_train_bwd_bwd(h: torch.Tensor, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(d_g, d_x, d_weight) of <h, bn_train_bwd(g, x, weight, eps)>; d_x and d_weight summed over slots."""
    check_bn("bn_train_bwd_bwd", eps, x, weight, one_dtype=False, h=h, g=g)
    hc, gc, xc = h.contiguous(), g.contiguous(), x.contiguous()
    lay = _Layout(xc, gc)
    d_g = torch.empty_like(gc)
    acc = _acc_dtype(hc, gc, xc, weight)
    if lay.S == 0 or lay.C == 0:
        return d_g, torch.zeros_like(xc), torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if lay.n == 0:  # no values per channel: undefined statistics, as in the reference
        return d_g, torch.empty_like(xc), torch.full_like(weight, float("nan"),
                                                          memory_format=torch.contiguous_format)
    d_x = torch.empty_like(xc)
    with _on_device(xc):
        sums = _stats(lay, xc, gc, hc, acc)
        r, mean_d = _moments(lay, sums, eps)
        n = lay.n
        s = weight.to(acc) * r                                  # (C,)
        A = sums[:, :, 4] / n                                   # mean(h)        (S, C)
        gb = sums[:, :, 2] / n                                  # mean(g)
        Bm = r * (sums[:, :, 5] / n - A * mean_d)               # mean(h x̂)
        m = r * (sums[:, :, 3] / n - gb * mean_d)               # mean(g x̂)
        Dn = sums[:, :, 6] / n - A * gb - Bm * m
        sr = s * r
        coef = torch.stack([
            s.expand_as(A), -sr * Bm, -s * A,                   # d_g = s h - s Bm r (x-μ) - s A
            -sr * m, -sr * Bm, -sr * r * (Dn - 2.0 * m * Bm),   # d_x = -s r (m h + Bm g + (Dn-2mBm) r (x-μ)
            sr * (m * A + Bm * gb),                             #             - m A - Bm ḡ)
        ], dim=-1).contiguous()
        block_n, block_l, n_ltiles, n_tiles = lay.tiles(_EW_BLOCK)
        _bwd_bwd_kernel[(n_tiles * lay.C,)](
            hc, gc, xc, mean_d, coef, d_g, d_x, lay.S, *lay.args(), n_ltiles, n_tiles,
            ACC=_tl_dtype(acc), BLOCK_N=block_n, BLOCK_L=block_l, INT64=lay.int64, num_warps=_EW_NUM_WARPS)
        d_w = (r * Dn * n).sum(0)
    return d_g, d_x, d_w.to(weight.dtype)
