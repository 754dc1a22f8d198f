"""Pure-PyTorch versions of every fisnet op: the oracle for tests and the fallback where no
kernel applies.  Semantics (x is the ReLU's input, y = relu(x)):

    lrp_relu_fwd(x)              = relu(x)
    lrp_relu_bwd(g, x, eps)      = g * y / (y + eps)            (0 where x <= 0)
    lrp_relu_bwd_bwd(gg, g, x, eps) = (gg * y / (y + eps),        d/dg
                                       gg * g * eps / (y + eps)^2)  d/dx (0 where x <= 0)

`g` (and `gg`) may have extra leading "slot" dimensions over x's shape; x is broadcast.
Half-precision inputs are computed in float32 and cast back.
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
