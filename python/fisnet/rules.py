"""LRP rules that are not a modified ReLU backward: BatchNorm folding and the Zb input rule
(SPEC §2.1).  The z⁺ rule of the Dual ISNet lives in `fisnet.zplus`.

All functions are differentiable in the layer's weights (training backpropagates through
them) and work on a slot axis: relevance tensors have shape (B, M, ...), one map per slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

Bounds = Union[float, Sequence[float], torch.Tensor]


@dataclass
class LinearLayer:
    """A conv (1/2/3-d) or linear layer as the forward pass called it, BN already folded in."""

    kind: str  # "linear", "conv1d", "conv2d", "conv3d"
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: tuple = (1,)
    padding: tuple = (0,)
    dilation: tuple = (1,)
    groups: int = 1
    pad: Optional[tuple] = None  # extra zero padding in F.pad order (asymmetric "same" padding of even kernels)

    def forward(self, a: torch.Tensor, weight=None, bias=...) -> torch.Tensor:
        """The layer at `a`; `weight`/`bias` replace the layer's own (bias=None: no bias)."""
        w = self.weight if weight is None else weight
        bias = self.bias if bias is ... else bias
        if self.kind == "linear":
            return F.linear(a, w, bias)
        if self.pad is not None:
            a = F.pad(a, self.pad)
        conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[self.kind]
        return conv(a, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def transpose(self, s: torch.Tensor, weight: torch.Tensor, input_shape) -> torch.Tensor:
        """Wᵀ s: the input-gradient of the layer with `weight`, applied to `s`."""
        if self.kind == "linear":
            return s.matmul(weight)
        if self.pad is None:
            return conv_input_grad(s, weight, input_shape, self.stride, self.padding, self.dilation, self.groups)
        shape = list(input_shape)
        nd = weight.dim() - 2
        for i in range(nd):  # F.pad order: the last dimension first
            shape[-1 - i] += self.pad[2 * i] + self.pad[2 * i + 1]
        g = conv_input_grad(s, weight, shape, self.stride, self.padding, self.dilation, self.groups)
        for i in range(nd):
            g = g.narrow(g.dim() - 1 - i, self.pad[2 * i], int(input_shape[-1 - i]))
        return g


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_input_grad(g: torch.Tensor, weight: torch.Tensor, input_shape, stride, padding, dilation,
                    groups: int) -> torch.Tensor:
    """The input-gradient of a convolution (zero padding, int paddings) applied to `g`: a
    transposed convolution, with the output padding that restores `input_shape`.

    Written as `F.conv_transpose*d` rather than `torch.nn.grad.conv*d_input` (that is,
    `aten.convolution_backward`) on purpose: differentiated again (create_graph=True, the ISNet
    training step) a transposed convolution backpropagates with the ordinary convolution
    kernels, whereas `convolution_backward`'s own derivative (`_convolution_double_backward`)
    measured 1.5-6x slower on CPU for the layers of a small CNN (bench notes in docs/status.md)."""
    nd = weight.dim() - 2
    k = weight.shape[2:]
    out_sp = g.shape[-nd:]
    in_sp = tuple(input_shape)[-nd:]
    out_pad = tuple(int(i) - ((int(o) - 1) * s - 2 * p + d * (int(kk) - 1) + 1)
                    for i, o, s, p, d, kk in zip(in_sp, out_sp, stride, padding, dilation, k))
    return _CONV_T[nd](g, weight, None, tuple(stride), tuple(padding), out_pad, groups, tuple(dilation))


def fold_batchnorm(layer: LinearLayer, mean, var, gamma, beta, bn_eps: float) -> LinearLayer:
    """Fold y = γ (z − μ)/σ + β into the layer: W' = W·γ/σ, b' = γ(b − μ)/σ + β, σ = sqrt(var + eps).

    `mean`/`var` are the statistics the forward pass used: running statistics in eval mode,
    the batch's (biased) statistics in training mode."""
    sigma = torch.sqrt(var + bn_eps)
    scale = sigma.reciprocal() if gamma is None else gamma / sigma
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    w = layer.weight * scale.reshape(shape)
    b = torch.zeros_like(mean) if layer.bias is None else layer.bias
    b = (b - mean) * scale
    if beta is not None:
        b = b + beta
    return LinearLayer(layer.kind, w, b, layer.stride, layer.padding, layer.dilation, layer.groups, layer.pad)


def fold_batchnorm_as_used(layer: LinearLayer, bn: dict, conv_out: torch.Tensor) -> LinearLayer:
    """Fold a BatchNorm, given the arguments of its `F.batch_norm` call, with the statistics that
    call used: the batch's (of `conv_out`, the layer output it normalised) in training mode or
    without running statistics, the running statistics otherwise."""
    if bn.get("training", False) or bn.get("running_mean") is None:
        dims = [0] + list(range(2, conv_out.dim()))
        # two plain reductions: torch.var_mean over several dims measured 13x slower on CPU
        # (1.2 ms against 0.09 ms for a (32, 16, 32, 32) batch)
        mean = conv_out.mean(dim=dims, keepdim=True)
        var = (conv_out - mean).square().mean(dim=dims)
        mean = mean.reshape(-1)
    else:
        mean, var = bn["running_mean"], bn["running_var"]
    return fold_batchnorm(layer, mean, var, bn.get("weight"), bn.get("bias"), float(bn.get("eps", 1e-5)))


def bound_images(bounds, x: torch.Tensor):
    """(l, h) as tensors broadcastable to x (1, C, 1, 1...) plus scalar bias bounds (l_b, h_b).

    `bounds` is a pair of scalars or of per-channel sequences/tensors (normalised inputs)."""
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"bounds must be a pair (low, high) of scalars or per-channel tensors, got {bounds!r}")
    out = []
    for v in bounds:
        t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        if t.dim() > 1:
            raise ValueError(f"a bound must be a scalar or a 1-D per-channel tensor, got shape {tuple(t.shape)}")
        if t.dim() == 1:
            if x.dim() < 2 or t.numel() != x.shape[1]:
                raise ValueError(
                    f"per-channel bounds have {t.numel()} values but the input has "
                    f"{x.shape[1] if x.dim() > 1 else 'no'} channels (input shape {tuple(x.shape)})")
            t = t.reshape((1, -1) + (1,) * (x.dim() - 2))
        else:
            t = t.reshape((1,) * x.dim())
        out.append(t)
    low, high = out
    if bool((low > high).any()):
        raise ValueError(f"bounds: low must be <= high, got {bounds!r}")
    return low, high, float(low.min()), float(high.max())


def zb_relevance(layer: LinearLayer, a: torch.Tensor, r_out: torch.Tensor, low: torch.Tensor,
                 high: torch.Tensor, low_b: float, high_b: float, eps: float) -> torch.Tensor:
    """SPEC §2.1 Zb rule.  `a` (B, ...) the layer input, `r_out` (B, M, ...) the relevance at
    the layer (ReLU) output, `low`/`high` broadcastable to `a`.  Returns (B, M, *a.shape[1:]).

        z   = W a + b − (W⁺ l + b⁺ l_b) − (W⁻ h + b⁻ h_b);   z += ε·sign(z)  (sign(0) = +1)
        s   = R_out / z
        R_a = a ⊙ (Wᵀ s) − l ⊙ (W⁺ᵀ s) − h ⊙ (W⁻ᵀ s)

    The bias acts as an input fixed at 1 bounded by (l_b, h_b): the scalar bounds, or
    (min l, max h) for per-channel bounds."""
    w = layer.weight
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    b = layer.bias
    lo_img = low.expand((1,) + tuple(a.shape[1:]))
    hi_img = high.expand((1,) + tuple(a.shape[1:]))
    z = layer.forward(a, w, b)
    z = z - layer.forward(lo_img, wp, None if b is None else b.clamp(min=0) * low_b)
    z = z - layer.forward(hi_img, wn, None if b is None else b.clamp(max=0) * high_b)
    z = z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    B, M = r_out.shape[:2]
    s = (r_out / z.unsqueeze(1)).reshape((B * M,) + tuple(r_out.shape[2:]))
    shape = (B * M,) + tuple(a.shape[1:])
    ct = layer.transpose(s, w, shape).reshape((B, M) + tuple(a.shape[1:]))
    cp = layer.transpose(s, wp, shape).reshape((B, M) + tuple(a.shape[1:]))
    cn = layer.transpose(s, wn, shape).reshape((B, M) + tuple(a.shape[1:]))
    return a.unsqueeze(1) * ct - low.unsqueeze(1) * cp - high.unsqueeze(1) * cn
