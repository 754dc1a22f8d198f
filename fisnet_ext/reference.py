"""Pure-PyTorch versions of every fisnet op: the oracle for tests and the fallback where no
kernel applies.  Semantics (x is the ReLU's input, y = relu(x)):

    lrp_relu_fwd(x)              = relu(x)
    lrp_relu_bwd(g, x, eps)      = g * y / (y + eps)            (0 where x <= 0)
    lrp_relu_bwd_bwd(gg, g, x, eps) = (gg * y / (y + eps),        d/dg
                                       gg * g * eps / (y + eps)^2)  d/dx (0 where x <= 0)

`g` (and `gg`) may have extra leading "slot" dimensions over x's shape; x is broadcast.
Half-precision inputs are computed in float32 and cast back.

The z⁺ rule's ratio step (zplus_ratio, zplus_ratio_bwd) is at the end of this file.
"""
import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def lrp_relu_fwd(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


def lrp_relu_bwd(g: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    xa, ga = _acc(x), _acc(g)
    pos = xa > 0
    den = torch.where(pos, xa + eps, torch.ones_like(xa))
    out = torch.where(pos, ga * xa / den, torch.zeros_like(ga))
    return out.to(g.dtype)


def lrp_relu_bwd_bwd(gg: torch.Tensor, g: torch.Tensor, x: torch.Tensor, eps: float):
    xa, ga, gga = _acc(x), _acc(g), _acc(gg)
    pos = xa > 0
    inv = torch.where(pos, 1.0 / torch.where(pos, xa + eps, torch.ones_like(xa)), torch.zeros_like(xa))
    dg = gga * xa * inv
    dx = gga * ga * (eps * inv * inv)
    zero = torch.zeros_like(dg)
    return torch.where(pos, dg, zero).to(g.dtype), torch.where(pos, dx, zero).to(g.dtype)


# ---- the z⁺ rule's ratio step (Dual ISNet, SPEC §3.1) ---------------------------------------
#
#     zplus_ratio(g, num, zp, eps)          = g * num / (zp + eps)
#     zplus_ratio_bwd(gs, g, num, zp, eps)  = (gs * num / (zp + eps),            d/dg
#                                              gs * g / (zp + eps),              d/dnum
#                                              -gs * g * num / (zp + eps)^2)     d/dzp
#
# All tensors have one shape.  Where zp + eps == 0 every output is 0 (a safe denominator: no
# inf/NaN from the division itself; NaN in the inputs still propagates).


def _zplus_inv(zp: torch.Tensor, eps: float):
    """(1 / (zp + eps) with 0 where zp + eps == 0, the mask zp + eps != 0), in zp's dtype."""
    den = zp + eps
    nz = den != 0
    inv = torch.where(nz, 1.0 / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(den))
    return inv, nz


def zplus_ratio(g: torch.Tensor, num: torch.Tensor, zp: torch.Tensor, eps: float) -> torch.Tensor:
    ga, na, za = _acc(g), _acc(num), _acc(zp)
    den = za + eps
    nz = den != 0
    out = torch.where(nz, ga * na / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(ga))
    return out.to(g.dtype)


def zplus_ratio_bwd(gs: torch.Tensor, g: torch.Tensor, num: torch.Tensor, zp: torch.Tensor, eps: float):
    gsa, ga, na, za = _acc(gs), _acc(g), _acc(num), _acc(zp)
    inv, nz = _zplus_inv(za, eps)
    zero = torch.zeros_like(gsa)
    dg = torch.where(nz, gsa * na * inv, zero)
    dnum = torch.where(nz, gsa * ga * inv, zero)
    dzp = torch.where(nz, -(gsa * ga * na) * (inv * inv), zero)
    return dg.to(g.dtype), dnum.to(g.dtype), dzp.to(g.dtype)


# ---------------------------------------------------------------------------------------------
# Training-mode BatchNorm's input-gradient and its derivative (fisnet_ext/bn_ops.py).
#
# x has shape (N, C, *); per channel c, with n = N * prod(*) values, mean μ, biased variance σ²,
# r = (σ² + eps)^-1/2, x̂ = (x - μ) r and s = γ r:
#
#   bn_train_bwd(g, x, γ, eps)         = s (g - mean(g) - x̂ mean(g x̂))
#       the gradient at x of y = γ x̂ + β (batch statistics, which depend on x), given g = dL/dy;
#   bn_train_bwd_bwd(h, g, x, γ, eps)  = (d/dg, d/dx, d/dγ) of <h, bn_train_bwd(g, x, γ, eps)>:
#       with A = mean(h), Bm = mean(h x̂), ḡ = mean(g), m = mean(g x̂), D/n = mean(h g) - A ḡ - Bm m
#       d/dg = s (h - A - x̂ Bm)
#       d/dx = -s r (m (h - A) + Bm (g - ḡ) + (D/n - 2 m Bm) x̂)
#       d/dγ = r D
#   (means per channel over N and *).  g and h may carry leading slot dimensions (one map per
#   slot, x shared); d/dx and d/dγ are then summed over the slots.
def _bn_stats(x: torch.Tensor, eps: float):
    red = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, red, unbiased=False, keepdim=True)
    r = torch.rsqrt(var + eps)
    return (x - mean) * r, r


def _bn_chan(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return w.reshape((1, -1) + (1,) * (x.dim() - 2))


def bn_train_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    ga, xa, wa = _acc(g), _acc(x), _acc(weight)
    xh, r = _bn_stats(xa, eps)
    extra = ga.dim() - xa.dim()
    red = [extra] + list(range(extra + 2, ga.dim()))  # N and the spatial dims, per slot
    gm = ga.mean(red, keepdim=True)
    gxm = (ga * xh).mean(red, keepdim=True)
    return (_bn_chan(wa, xa) * r * (ga - gm - xh * gxm)).to(g.dtype)


def bn_train_bwd_bwd(h: torch.Tensor, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
    ha, ga, xa, wa = _acc(h), _acc(g), _acc(x), _acc(weight)
    xh, r = _bn_stats(xa, eps)
    extra = ga.dim() - xa.dim()
    red = [extra] + list(range(extra + 2, ga.dim()))  # N and the spatial dims, per slot
    A = ha.mean(red, keepdim=True)
    Bm = (ha * xh).mean(red, keepdim=True)
    gb = ga.mean(red, keepdim=True)
    m = (ga * xh).mean(red, keepdim=True)
    Dn = (ha * ga).mean(red, keepdim=True) - A * gb - Bm * m
    s = _bn_chan(wa, xa) * r
    d_g = s * (ha - A - xh * Bm)
    d_x = -s * r * (m * (ha - A) + Bm * (ga - gb) + (Dn - 2.0 * m * Bm) * xh)
    n = xa.numel() // xa.shape[1] if xa.dim() > 1 else 1
    d_w = (r * Dn * n).sum([d for d in range(ga.dim()) if d != extra + 1])
    d_x = d_x.sum(list(range(extra))) if extra else d_x
    return d_g.to(g.dtype), d_x.to(x.dtype), d_w.reshape(weight.shape).to(weight.dtype)
