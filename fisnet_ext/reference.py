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


# ---------------------------------------------------------------------------------------------
# The lrp_act family (fisnet_ext/act_ops.py): element-wise activations y = φ(z) whose heatmap
# backward is the identity rule with the ε of the preceding layer.  `kind` is the integer code
# of fisnet_ext.act_ops.KINDS (csrc/act_math.h); `param` is leaky_relu's slope, elu's alpha or
# softplus's beta (ignored by the other kinds).
#
#   act_fwd(x, kind, p)               = φ(x)       (PyTorch's own F.* function)
#   act_bwd(g, x, kind, p, eps)       = g * h(x),  h(z) = φ(z) / (z + eps * sign z), sign 0 = +1
#   act_bwd_bwd(gg, g, x, kind, p, eps) = (gg * h(x), gg * g * h'(x))
#
# Every kind but softplus is φ(z) = z * r(z) with r(0) := φ'(0) (PyTorch's derivative at 0);
# with ρ = z / d (d = z + eps * sign z; ρ := 1 where d == 0) the factor is h = ρ r and
# h' = ρ r' + eps * sign z / d² * r — for eps = 0 exactly r(z) = φ(z)/z and r'(z), with no
# cancellation near 0.  Softplus (φ(0) > 0) needs eps > 0: h = φ / d, h' = (φ' - h) / d.
# Everything is written with differentiable torch ops (the op's third derivative uses it).
import math as _math

import torch.nn.functional as _F

ACT_RELU, ACT_RELU6, ACT_LEAKY, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_HARDSWISH, ACT_ELU, ACT_MISH, \
    ACT_SOFTPLUS = range(10)
_SOFTPLUS_THRESHOLD = 20.0
_ELU_SERIES = 0.25
_GELU_TANH_BETA = _math.sqrt(2.0) * (2.0 / _math.sqrt(_math.pi)) * 0.5
_GELU_TANH_KAPPA = 0.044715


def act_fwd(x: torch.Tensor, kind: int, param: float) -> torch.Tensor:
    if kind == ACT_RELU:
        return torch.relu(x)
    if kind == ACT_RELU6:
        return _F.relu6(x)
    if kind == ACT_LEAKY:
        return _F.leaky_relu(x, param)
    if kind == ACT_GELU:
        return _F.gelu(x)
    if kind == ACT_GELU_TANH:
        return _F.gelu(x, approximate="tanh")
    if kind == ACT_SILU:
        return _F.silu(x)
    if kind == ACT_HARDSWISH:
        return _F.hardswish(x)
    if kind == ACT_ELU:
        return _F.elu(x, param)
    if kind == ACT_MISH:
        return _F.mish(x)
    if kind == ACT_SOFTPLUS:
        return _F.softplus(x, param, _SOFTPLUS_THRESHOLD)
    raise ValueError(f"fisnet.act_fwd: unknown activation kind {kind}")


def _act_ratio(z: torch.Tensor, kind: int, p: float):
    """(r, r') with r = φ(z)/z, r(0) = φ'(0); for softplus (r, r') = (φ', 0)."""
    one, zero = torch.ones_like(z), torch.zeros_like(z)
    if kind == ACT_RELU:
        return torch.where(z > 0, one, zero), zero
    if kind == ACT_RELU6:
        hi = z >= 6
        zs = torch.where(hi, z, 6.0 * one)
        inv = 1.0 / zs
        return torch.where(hi, 6.0 * inv, torch.where(z > 0, one, zero)), torch.where(hi, -6.0 * inv * inv, zero)
    if kind == ACT_LEAKY:
        return torch.where(z > 0, one, p * one), zero
    if kind == ACT_GELU:
        return 0.5 * (1.0 + torch.erf(z * _math.sqrt(0.5))), torch.exp(-0.5 * z * z) / _math.sqrt(2.0 * _math.pi)
    if kind == ACT_GELU_TANH:  # (1 + tanh u)/2 = sigmoid(2u) = 1/(1 + e), e = exp(-2u); g(1-g) = e g^2
        e = torch.exp(-2.0 * (_GELU_TANH_BETA * (z + _GELU_TANH_KAPPA * (z * z * z))))
        r = 1.0 / (1.0 + e)
        w = torch.where(r > 0, 2.0 * e * r * r, torch.zeros_like(z))
        return r, w * _GELU_TANH_BETA * (1.0 + 3.0 * _GELU_TANH_KAPPA * z * z)
    if kind == ACT_SILU:
        s = 1.0 / (1.0 + torch.exp(-z))
        return s, s * (1.0 - s)
    if kind == ACT_HARDSWISH:
        return torch.clamp(z + 3.0, 0.0, 6.0) / 6.0, torch.where((z > -3) & (z < 3), one / 6.0, zero)
    if kind == ACT_ELU:
        neg = z < 0
        zs = torch.where(neg, z, -one)
        em = torch.expm1(zs)
        r = torch.where(z > 0, one, torch.where(neg, p * (em / zs), p * one))
        zz = torch.where(z <= 0, z, zero)
        series = 1 / 2 + zz * (1 / 3 + zz * (1 / 8 + zz * (1 / 30 + zz * (1 / 144 + zz * (1 / 840 + zz * (
            1 / 5760 + zz * (1 / 45360 + zz * (1 / 403200 + zz * (1 / 3991680)))))))))
        direct = (zs * (em + 1.0) - em) / (zs * zs)
        rp = torch.where(z > 0, zero, p * torch.where(zz > -_ELU_SERIES, series, direct))
        return r, rp
    if kind == ACT_MISH:
        t = torch.tanh(torch.log1p(torch.exp(z)))
        return t, (1.0 - t * t) / (1.0 + torch.exp(-z))
    if kind == ACT_SOFTPLUS:
        bz = z * p
        big = bz > _SOFTPLUS_THRESHOLD
        e = torch.exp(torch.where(big, zero, bz))
        return torch.where(big, one, e / (e + 1.0)), zero
    raise ValueError(f"fisnet.act_bwd: unknown activation kind {kind}")


def act_factor(z: torch.Tensor, kind: int, param: float, eps: float):
    """(h(z), h'(z)) of the identity rule, in z's dtype (differentiable in z)."""
    se = torch.where(z < 0, torch.full_like(z, -eps), torch.full_like(z, eps))
    d = z + se
    nz = d != 0
    dd = torch.where(nz, d, torch.ones_like(d))
    r, rp = _act_ratio(z, kind, param)
    if kind == ACT_SOFTPLUS:
        h = act_fwd(z, kind, param) / dd
        return h, (r - h) / dd
    rho = torch.where(nz, z / dd, torch.ones_like(z))  # exactly 1 when eps == 0
    inv = 1.0 / dd
    return rho * r, rho * rp + se * inv * inv * r


def act_bwd(g: torch.Tensor, x: torch.Tensor, kind: int, param: float, eps: float) -> torch.Tensor:
    h, _ = act_factor(_acc(x), kind, param, eps)
    return (_acc(g) * h).to(g.dtype)


def act_bwd_bwd(gg: torch.Tensor, g: torch.Tensor, x: torch.Tensor, kind: int, param: float, eps: float):
    h, hp = act_factor(_acc(x), kind, param, eps)
    gga = _acc(gg)
    return (gga * h).to(g.dtype), (gga * _acc(g) * hp).to(g.dtype)
