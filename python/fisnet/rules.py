"""LRP rules that are not a modified ReLU backward: BatchNorm folding and the Zb input rule
(docs/spec.md §2.1).  The z⁺ rule of the Dual ISNet lives in `fisnet.zplus`.

All functions are differentiable in the layer's weights (training backpropagates through
them) and work on a slot axis: relevance tensors have shape (B, M, ...), one map per slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

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


def batchnorm_scale_shift(bias: Optional[torch.Tensor], mean, var, gamma, beta, bn_eps: float):
    """(scale, b'): y = γ (z − μ)/σ + β of z = W a + b is z·scale + (b' − b·scale), i.e. the folded layer
    W' = W·scale (per output channel), b' = γ(b − μ)/σ + β; scale = γ/σ, σ = sqrt(var + eps)."""
    sigma = torch.sqrt(var + bn_eps)
    scale = sigma.reciprocal() if gamma is None else gamma / sigma
    b = torch.zeros_like(mean) if bias is None else bias
    b = (b - mean) * scale
    if beta is not None:
        b = b + beta
    return scale, b


def fold_batchnorm(layer: LinearLayer, mean, var, gamma, beta, bn_eps: float) -> LinearLayer:
    """Fold y = γ (z − μ)/σ + β into the layer: W' = W·γ/σ, b' = γ(b − μ)/σ + β, σ = sqrt(var + eps).

    `mean`/`var` are the statistics the forward pass used: running statistics in eval mode,
    the batch's (biased) statistics in training mode."""
    scale, b = batchnorm_scale_shift(layer.bias, mean, var, gamma, beta, bn_eps)
    w = layer.weight * scale.reshape((-1,) + (1,) * (layer.weight.dim() - 1))
    return LinearLayer(layer.kind, w, b, layer.stride, layer.padding, layer.dilation, layer.groups, layer.pad)


def fold_batchnorm_as_used(layer: LinearLayer, bn: dict, conv_out: torch.Tensor) -> LinearLayer:
    """Fold a BatchNorm, given the arguments of its `F.batch_norm` call, with the statistics that
    call used: the batch's (of `conv_out`, the layer output it normalised) in training mode or
    without running statistics, the running statistics otherwise."""
    mean, var = _bn_statistics(bn, conv_out)
    return fold_batchnorm(layer, mean, var, bn.get("weight"), bn.get("bias"), float(bn.get("eps", 1e-5)))


def batchnorm_scale_shift_as_used(layer: LinearLayer, bn: dict, conv_out: torch.Tensor):
    """`batchnorm_scale_shift` with the statistics the BatchNorm call used (see `fold_batchnorm_as_used`):
    the folded layer without forming W·scale (`scaled_part` takes its signed parts from W and scale)."""
    mean, var = _bn_statistics(bn, conv_out)
    return batchnorm_scale_shift(layer.bias, mean, var, bn.get("weight"), bn.get("bias"), float(bn.get("eps", 1e-5)))


class _ScaledPart(torch.autograd.Function):
    """(W·scale)⁺ (`positive`) or (W·scale)⁻, scale per output channel (dim 0 of W), keeping only W and
    scale for the backward: the full folded weight W·scale is neither kept nor, in the backward,
    anything but a temporary (the z⁺ pass folds every BatchNorm: for ResNet-18 a second copy of its
    weights per step).  Backward in differentiable ops on W and scale (the sign mask is constant), so
    higher derivatives are exact."""

    generate_vmap_rule = True  # built inside the two-slot pass's vmapped backward

    @staticmethod
    def forward(w, scale, positive):
        ws = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
        return ws.clamp_(min=0) if positive else ws.clamp_(max=0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, scale, positive = inputs
        ctx.save_for_backward(w, scale)
        ctx.positive = positive

    @staticmethod
    def backward(ctx, g):
        w, scale = ctx.saved_tensors
        s = scale.reshape((-1,) + (1,) * (w.dim() - 1))
        keep = torch.mul(w, s)
        keep = keep > 0 if ctx.positive else keep < 0
        dims = tuple(range(1, w.dim()))
        if torch.is_grad_enabled():  # differentiable (create_graph): out of place
            g = g * keep.to(g.dtype)
            gs = (g * w).sum(dim=dims) if ctx.needs_input_grad[1] else None
            return (g * s if ctx.needs_input_grad[0] else None), gs, None
        # the step's own backward: one weight-sized buffer (these gradients wait for the layer's
        # forward backward, so every temporary here adds to the step's peak)
        g = g.masked_fill(~keep, 0)
        del keep
        gs = torch.einsum("o...,o...->o", g, w) if ctx.needs_input_grad[1] else None
        return (g.mul_(s) if ctx.needs_input_grad[0] else None), gs, None


def scaled_part(w: torch.Tensor, scale: Optional[torch.Tensor], positive: bool) -> torch.Tensor:
    """(W·scale)⁺ or (W·scale)⁻ (scale None: W's own parts), differentiable in W and scale."""
    if scale is None:
        return w.clamp(min=0) if positive else w.clamp(max=0)
    return _ScaledPart.apply(w, scale, positive)


def _bn_statistics(bn: dict, conv_out: torch.Tensor):
    """(mean, var) a BatchNorm call used: the batch's (biased) in training mode or without running
    statistics, the running statistics otherwise.  The batch's are the forward's own when the trace
    recorded them (`bn["batch_mean"]`, `bn["batch_var"]`: outputs of `fisnet.traced.TracedBatchNorm`,
    differentiable in the BatchNorm's input, their gradient added in its backward), else computed from
    `conv_out` (`_BatchStats`, differentiable in `conv_out`)."""
    if bn.get("training", False) or bn.get("running_mean") is None:
        mean, var = bn.get("batch_mean"), bn.get("batch_var")
        if mean is not None and var is not None and mean.dtype == conv_out.dtype:
            return mean, var
        return _BatchStats.apply(conv_out, (0,) + tuple(range(2, conv_out.dim())))
    return bn["running_mean"], bn["running_var"]


class _BatchStats(torch.autograd.Function):
    """(mean, biased variance) of `x` over `dims`, per channel, as a function of `x` alone (the fold of
    a BatchNorm whose statistics the trace did not record).

    Values: `x.mean(dims)` and `(x − μ).square().mean(dims)`, two plain reductions (torch.var_mean
    over several dims measured 13x slower on CPU: 1.2 ms against 0.09 ms for a (32, 16, 32, 32)
    batch).  Graph: it keeps only `x` (which the BatchNorm keeps anyway), not the full-size `x − μ`
    that `square`'s backward would save, and its backward, g_x = g_μ/n + 2 (x − μ) g_var / n with μ
    recomputed from x, is one expression in differentiable torch ops (no materialised `expand / n` of
    mean's own backward), so higher derivatives (the training step's double backward,
    gradgradcheck) work through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, dims):
        mu = x.mean(dim=dims, keepdim=True)
        return mu.reshape(-1), (x - mu).square_().mean(dim=dims)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dims = inputs
        ctx.dims = dims
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g_mean, g_var):
        x, = ctx.saved_tensors
        return batch_stats_grad(None, x, None, g_mean, g_var, ctx.dims), None


def batch_stats_grad(gx: Optional[torch.Tensor], x: torch.Tensor, mean: Optional[torch.Tensor],
                     g_mean: Optional[torch.Tensor], g_var: Optional[torch.Tensor], dims=None) -> torch.Tensor:
    """gx + g_μ/n + 2 (x − μ) g_var/n per channel (n = elements per channel; gx None: 0): the gradient at x
    of x's batch mean and biased variance over `dims` (default: all but dim 1), as x·a + b with
    a = 2 g_var/n, b = g_μ/n − μ·a.  In place on gx (a fresh gradient) unless autograd records the
    backward (create_graph); then, or when `mean` is None, μ is computed from x, as a function of x,
    so that the result's own derivative is exact (μ's dependence on x)."""
    dims = tuple(dims) if dims is not None else (0,) + tuple(range(2, x.dim()))
    n = 1
    for d in dims:
        n *= x.shape[d]
    kept = [1 if d in dims else x.shape[d] for d in range(x.dim())]
    if mean is None or torch.is_grad_enabled():
        mean = x.mean(dim=dims)
    mean = mean.reshape(-1)
    a = torch.zeros_like(mean) if g_var is None else g_var.reshape(-1) * (2.0 / n)
    b = -mean * a if g_mean is None else g_mean.reshape(-1) / n - mean * a
    a, b = a.reshape(kept).to(x.dtype), b.reshape(kept).to(x.dtype)
    if gx is None:
        return torch.addcmul(b, x, a)
    if torch.is_grad_enabled():
        return torch.addcmul(gx, x, a) + b
    return gx.addcmul_(x, a).add_(b)


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


def fold_batchnorm_for_zb(layer: LinearLayer, bn: dict, conv_out: torch.Tensor):
    """`fold_batchnorm_as_used(layer, bn, conv_out)` and the BatchNorm's output recomputed from
    `conv_out` with the same statistics, `conv_out·(γ/σ) + (β − μ·γ/σ)`: the `z_full` of
    `zb_relevance` for a layer whose BatchNorm output was overwritten by an in-place ReLU (one
    element-wise pass instead of the layer's convolution; differentiable through μ and σ as the
    fold is).  Returns (folded layer, z_full)."""
    mean, var = _bn_statistics(bn, conv_out)
    gamma, beta, bn_eps = bn.get("weight"), bn.get("bias"), float(bn.get("eps", 1e-5))
    folded = fold_batchnorm(layer, mean, var, gamma, beta, bn_eps)
    sigma = torch.sqrt(var + bn_eps)
    scale = sigma.reciprocal() if gamma is None else gamma / sigma
    shift = -mean * scale if beta is None else beta - mean * scale
    shape = (-1,) + (1,) * (conv_out.dim() - 2)
    return folded, torch.addcmul(shift.reshape(shape), conv_out, scale.reshape(shape))


def _zb_relevance_reference(layer: LinearLayer, a: torch.Tensor, r_out: torch.Tensor, low: torch.Tensor,
                            high: torch.Tensor, low_b: float, high_b: float, eps: float) -> torch.Tensor:
    """The Zb rule as first written (three transposed convolutions, PyTorch's division backward):
    the oracle of `zb_relevance` (tests/fisnet/test_rules_zb.py, bench/zb_bench.py)."""
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


def _zb_stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + ε·sign(z) with sign(0) := +1 (the same floats as `z + ε·(±1)`)."""
    e = torch.tensor(eps, dtype=z.dtype, device=z.device)
    return torch.where(z >= 0, e, -e).add_(z)


class ZbRatio(torch.autograd.Function):
    """(s, z_s) with z_s = z' + ε·sign(z') (sign 0 := +1), z' = z − c_1 − c_2 − … (in that order) and
    s = R_out / z_s, for `R_out` (B, M, ...), `z` (B, ...) and any number of terms `c_i`
    broadcastable to `z` (the Zb rule's bound terms, one image each).  Taking them here keeps no
    full-size z' tensor alive.

    Its backward, g_R = g / z_s, g_z = g_{z_s} − Σ_M g_R ⊙ s and g_{c_i} = −g_z summed to c_i's shape, is
    written in differentiable torch ops on the saved outputs s and z_s, so a second backward
    (gradgradcheck, the training step's double backward) differentiates it; z_s is an output (not
    an intermediate) for that reason.  PyTorch's division backward instead computes −g·R/(z·z) and
    sums it over the slot axis (more full-size passes and temporaries), and autograd would record
    the stabiliser's `where`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(r_out, z, eps, *cs):
        for c in cs:
            z = z - c
        zs = _zb_stabilise(z, eps)
        return r_out / zs.unsqueeze(1), zs

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, zs = output
        ctx.c_shapes = [c.shape for c in inputs[3:]]
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable()
        ctx.save_for_backward(s, zs)

    @staticmethod
    def backward(ctx, g, g_zs):
        s, zs = ctx.saved_tensors
        want_z = any(ctx.needs_input_grad[1:2] + ctx.needs_input_grad[3:])
        gr = gz = None
        if g is None:
            gz = g_zs
        else:
            gr = g / zs.unsqueeze(1)
            if want_z:
                gs = gr * s
                gz = (gs.squeeze(1) if gs.shape[1] == 1 else gs.sum(1)).neg_()  # in place: one full tensor less
                if g_zs is not None:
                    gz = gz + g_zs
            if not ctx.needs_input_grad[0]:
                gr = None
        gcs = [-gz.sum_to_size(shape) if need and gz is not None else None
               for shape, need in zip(ctx.c_shapes, ctx.needs_input_grad[3:])]
        return (gr, (gz if ctx.needs_input_grad[1] else None), None, *gcs)


def _is_zero(t: torch.Tensor) -> bool:
    return not bool(t.any())


def _bias_image(layer: LinearLayer, bias: torch.Tensor) -> torch.Tensor:
    """A bias (O,) shaped to broadcast against the layer output (B, O, ...) / (B, ..., O)."""
    if layer.kind == "linear":
        return bias
    return bias.reshape((-1,) + (1,) * (layer.weight.dim() - 2))


def zb_relevance(layer: LinearLayer, a: torch.Tensor, r_out: torch.Tensor, low: torch.Tensor,
                 high: torch.Tensor, low_b: float, high_b: float, eps: float,
                 z_full: Optional[torch.Tensor] = None) -> torch.Tensor:
    """docs/spec.md §2.1 Zb rule.  `a` (B, ...) the layer input, `r_out` (B, M, ...) the relevance at
    the layer (ReLU) output, `low`/`high` broadcastable to `a`.  Returns (B, M, *a.shape[1:]).

        z   = W a + b − (W⁺ l + b⁺ l_b) − (W⁻ h + b⁻ h_b);   z += ε·sign(z)  (sign(0) = +1)
        s   = R_out / z
        R_a = a ⊙ (Wᵀ s) − l ⊙ (W⁺ᵀ s) − h ⊙ (W⁻ᵀ s)

    The bias acts as an input fixed at 1 bounded by (l_b, h_b): the scalar bounds, or
    (min l, max h) for per-channel bounds.

    `z_full`, if given, is the layer's output W a + b as the forward computed it (the first ReLU's
    input, after the BatchNorm folded into `layer`): it replaces the full-batch convolution of `a`.
    The constant terms W⁺ l, W⁻ h are convolutions of one image (batch 1); a term whose bound image
    is 0 everywhere (l = 0, the default bounds (0, 1)) is left out.  The three transposes are one
    transposed convolution with the weights [W, −W⁺, −W⁻] stacked per group along its output
    channels, and R_a = Σ_t X_t ⊙ T_t with X = [a, l, h]; s comes from `ZbRatio`.  Equal to
    `_zb_relevance_reference` to rounding (tests/fisnet/test_rules_zb.py).

    In two steps, `zb_ratio` (s) and `zb_transpose` (R_a), so that a caller can let R_out and z go
    before the transposed convolution runs (the trace does: they are the largest tensors of a
    training step's heatmap pass at a high-resolution first layer)."""
    s, kept = zb_ratio(layer, a, r_out, low, high, low_b, high_b, eps, z_full=z_full)
    return zb_transpose(layer, a, s, kept, tuple(r_out.shape[:2]))


def zb_ratio(layer: LinearLayer, a: torch.Tensor, r_out: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
             low_b: float, high_b: float, eps: float, z_full: Optional[torch.Tensor] = None):
    """Zb's first step (`zb_relevance`): (s, kept) with s = R_out / z_s shaped (B·M, ...) and `kept`
    the (bound image, weight part) pairs whose bound image is not zero, for `zb_transpose`."""
    w = layer.weight
    b = layer.bias
    feat = tuple(a.shape[1:])
    lo_img = low.expand((1,) + feat)
    hi_img = high.expand((1,) + feat)
    # (bound image, weight part, bias part): the l term with W⁺, b⁺ l_b; the h term with W⁻, b⁻ h_b
    terms = []
    for img, part, bound in ((lo_img, "pos", low_b), (hi_img, "neg", high_b)):
        wpart = w.clamp(min=0) if part == "pos" else w.clamp(max=0)
        bpart = None
        if b is not None and bound != 0:
            bpart = (b.clamp(min=0) if part == "pos" else b.clamp(max=0)) * bound
        terms.append((img, wpart, bpart, _is_zero(img)))
    z = layer.forward(a, w, b) if z_full is None else z_full
    cs = []  # the bound terms, one image each, in the reference's order: z − (l term) − (h term) inside ZbRatio
    for img, wpart, bpart, zero in terms:
        if not zero:
            cs.append(layer.forward(img, wpart, bpart))
        elif bpart is not None:
            cs.append(_bias_image(layer, bpart))
    s = ZbRatio.apply(r_out, z, float(eps), *cs)[0]
    B, M = r_out.shape[:2]
    kept = [(img, wpart) for img, wpart, _, zero in terms if not zero]
    return s.reshape((B * M,) + tuple(r_out.shape[2:])), kept


def zb_transpose(layer: LinearLayer, a: torch.Tensor, s: torch.Tensor, kept, BM: Tuple[int, int]) -> torch.Tensor:
    """Zb's second step (`zb_relevance`): R_a (B, M, *a.shape[1:]) from `zb_ratio`'s (s, kept)."""
    B, M = BM
    w = layer.weight
    feat = tuple(a.shape[1:])
    nt = 1 + len(kept)
    if layer.kind == "linear":
        wst = torch.cat([w] + [-wp for _, wp in kept], dim=1)  # (O, nt·C)
        t = layer.transpose(s, wst, (B * M,) + feat)  # (B·M, ..., nt·C)
        t = t.reshape((B, M) + feat[:-1] + (nt, feat[-1]))
        x = torch.stack([a] + [img.expand_as(a) for img, _ in kept], dim=-2).unsqueeze(1)
        return (x * t).sum(-2) if nt > 1 else (x * t).squeeze(-2)
    g = layer.groups
    O, cg = w.shape[0], w.shape[1]
    k = tuple(w.shape[2:])
    parts = [w] + [-wp for _, wp in kept]
    wst = torch.stack([p.reshape((g, O // g, cg) + k) for p in parts], dim=2).reshape((O, nt * cg) + k)
    t = layer.transpose(s, wst, (B * M,) + feat)  # (B·M, g·nt·cg, ...): per group [Wᵀs, −W⁺ᵀs, −W⁻ᵀs]
    sp = tuple(t.shape[2:])
    t = t.reshape((B, M, g, nt, cg) + sp)
    x = torch.stack([v.unflatten(1, (g, cg)).expand((a.shape[0], g, cg) + sp)
                     for v in [a] + [img for img, _ in kept]], dim=2).unsqueeze(1)  # (B, 1, g, nt, cg, ...)
    r = (x * t).sum(3) if nt > 1 else (x * t).squeeze(3)
    return r.reshape((B, M) + feat)


# ---------------------------------------------------------------------------------------------
# The rule table: which heatmap backward applies at each kind of op the trace intercepts.
#
# Rules are nouns: each class below names one heatmap backward (its z⁺ backward for the Dual
# ISNet is stated with it).  DEFAULT_RULES maps every op kind to the rule used unless the user
# overrides it: `fisnet.explain(..., rules={"norm": "gradient"})`, `fisnet.ISNet(..., rules=...)`.
# Every rule acts in the heatmap backward only; the ordinary (classification) gradient is never
# changed, and every factor is computed from saved forward tensors with differentiable
# operations, so the training step's double backward differentiates it.


class Rule:
    """One heatmap backward.  `name` is what `rules={kind: name}` uses."""

    name = ""
    kinds: tuple = ()
    formula = ""

    def __repr__(self):
        return f"{type(self).__name__}()"


class Identity(Rule):
    """Element-wise activation y = φ(z): relevance passes unchanged, the ε of the layer before is
    applied here (LRP-ε in gradient form).  z⁺ slot: the same rule with ε = 0 (φ(z)/z; for ReLU the
    plain derivative)."""

    name, kinds = "identity", ("activation",)
    formula = "G_z = G_y · φ(z) / (z + ε·sign z), sign 0 := +1  (ReLU: y/(y+ε))"


class Gradient(Rule):
    """No rule: the plain gradient (the op is treated as if it were linear).  Only on request."""

    name, kinds = "gradient", ("activation", "norm", "gate")
    formula = "G_in = the ordinary gradient"


class WinnerTakeAll(Rule):
    """Max-pooling: the winner takes the relevance (the plain gradient)."""

    name, kinds = "winner_take_all", ("maxpool",)
    formula = "G_in = the ordinary gradient of max"


class Affine(Rule):
    """BatchNorm: an affine map (the plain gradient), folded into the conv/linear before it for the
    Zb and z⁺ rules."""

    name, kinds = "affine", ("batchnorm",)
    formula = "G_in = γ/σ · G_out"


class ConstantScale(Rule):
    """Normalisation with a data-dependent scale (LayerNorm, GroupNorm, InstanceNorm, RMSNorm): the
    scale 1/σ is held constant; the centring and the affine part keep their gradient."""

    name, kinds = "constant_scale", ("norm",)
    formula = "G_x = (1/σ) · centre(w ⊙ G_y)  (σ a constant of the rule; RMSNorm: no centring)"


class ConstantGate(Rule):
    """Multiplicative gate, signal × sigmoid(s) or × hardsigmoid(s) (squeeze-excitation): the gate
    is held constant, the signal receives all the relevance, the gate branch none."""

    name, kinds = "constant_gate", ("gate",)
    formula = "G_signal = gate ⊙ G_y, G_gate = 0"


class ConstantAttention(Rule):
    """CP-LRP (Ali et al. 2022): the attention weights A = softmax(q kᵀ/√d) are held constant; v
    receives all the relevance, q and k none."""

    name, kinds = "cp", ("attention",)
    formula = "G_v = Aᵀ G_o, G_q = G_k = 0"


class AttnLRP(Rule):
    """AttnLRP (Achtibat et al. 2024) in gradient form: the uniform rule on both matrix products,
    i.e. the ordinary backward through the attention with the gradients reaching q and k scaled by
    1/4 and the gradient reaching v by 1/2 (the softmax's own gradient between them)."""

    name, kinds = "attnlrp", ("attention",)
    formula = "ordinary backward; G_q, G_k × 1/4, G_v × 1/2"


Gradient.kinds = Gradient.kinds + ("attention",)

RULE_CLASSES = (Identity, Gradient, WinnerTakeAll, Affine, ConstantScale, ConstantGate, ConstantAttention,
                AttnLRP)

DEFAULT_RULES = {
    "activation": "identity",      # ReLU, ReLU6, LeakyReLU, GELU (erf, tanh), SiLU, Hardswish, ELU, Mish, Softplus
    "maxpool": "winner_take_all",  # max_pool*, adaptive_max_pool*, torch.max/amax over one tensor
    "batchnorm": "affine",         # F.batch_norm (nn.BatchNorm*)
    "norm": "constant_scale",      # F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm
    "gate": "constant_gate",       # signal * sigmoid(s) / hardsigmoid(s)
    "attention": "cp",             # F.scaled_dot_product_attention, nn.MultiheadAttention
}


def resolve_rules(overrides=None) -> dict:
    """The rule table with `overrides` ({op kind: rule name}) applied; a clear error otherwise."""
    table = dict(DEFAULT_RULES)
    for kind, name in (overrides or {}).items():
        if kind not in DEFAULT_RULES:
            raise ValueError(f"rules: unknown op kind {kind!r}; the kinds are {', '.join(DEFAULT_RULES)} "
                             "(the input layer's rule is chosen with zb=True/False)")
        if isinstance(name, Rule):
            name = name.name
        allowed = [c.name for c in RULE_CLASSES if kind in c.kinds]
        if name not in allowed:
            raise ValueError(f"rules: {name!r} is not a rule for {kind!r}; choose one of {', '.join(allowed)}")
        table[kind] = name
    return table


def describe_rules(overrides=None) -> str:
    """The rule table as text: op kind, rule, heatmap backward."""
    table = resolve_rules(overrides)
    by_name = {c.name: c for c in RULE_CLASSES}
    return "\n".join(f"{k:<11} {v:<16} {by_name[v].formula}" for k, v in table.items())
