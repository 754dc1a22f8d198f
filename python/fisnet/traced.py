"""Convolutions and BatchNorms of a traced forward pass, with backwards that are cheap to
differentiate again.

An ISNet training step differentiates the heatmap backward once more (create_graph=True).  For
a convolution, PyTorch's backward is `aten.convolution_backward`, whose own derivative
(`_convolution_double_backward`) is slow on CPU: 1.5-6x the cost of the same work written as a
transposed convolution (measured for the layers of the benchmark CNN; docs/status.md).  The
heatmap backward only ever needs the input-gradient of a convolution (heatmaps are taken at
activations, never at weights), and that is a transposed convolution with the same weights.

`TracedConv` is the convolution the trace calls instead of `F.conv*d`:
* forward: the same `F.conv*d` call (the same kernels, the same output);
* backward while one of the trace's heatmap switches is on: the input-gradient as
  `F.conv_transpose*d` (`fisnet.rules.conv_input_grad`), recorded by autograd like any op, so
  the training step's double backward uses the ordinary convolution kernels; no weight or bias
  gradient (nothing in a heatmap pass asks for one);
* backward otherwise (the classification gradient): `aten.convolution_backward` with the
  gradients autograd needs, exactly PyTorch's own.

Not wrapped (left to PyTorch): string paddings, autocast regions, and calls whose weight is
not a tensor.

`TracedBatchNorm` is the same idea for a BatchNorm that normalises with batch statistics
(training mode): forward `torch.native_batch_norm` (output and running-statistics update as
`F.batch_norm`); heatmap backward the fused `fisnet_ext.bn_train_bwd` op (through
`fisnet_ext.bn_heatmap_backward`: its backend chosen when the forward runs), whose derivative is the
fused `bn_train_bwd_bwd` (two passes over the data instead of PyTorch's
`batchnorm_double_backward`, some thirty kernels; docs/status.md); ordinary backward
`aten.native_batch_norm_backward`, PyTorch's own.  It also returns the batch mean and variance it
used, differentiable, for the trace's BatchNorm folding.  Eval-mode BatchNorm (running statistics) is
an affine map whose double backward is already cheap: left to PyTorch, as are autocast regions,
weights of another dtype than the input, and a momentum of None.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import fisnet_ext

from .rules import batch_stats_grad, conv_input_grad

__all__ = ["TracedConv", "traced_conv", "TracedBatchNorm", "traced_batch_norm"]

_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_OF_ND = {nd: f for f, nd in _FUNCS.items()}


def _tup(v, nd: int) -> tuple:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * nd


class TracedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, switches):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.bias_shape = None if bias is None else tuple(bias.shape)
        ctx.switches = switches
        # no gradient reached the output (e.g. the z⁺ pass, whose taps send nothing through the
        # layer): nothing to do, rather than a transposed convolution of materialised zeros
        ctx.set_materialize_grads(False)
        return _CONV_OF_ND[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        none = (None,) * 5
        if g is None:
            return (None, None, None) + none
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        if _heatmap_mode(ctx.switches):
            gx = conv_input_grad(g, w, x.shape, stride, padding, dilation, groups) if ctx.needs_input_grad[0] \
                else None
            return (gx, None, None) + none
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.bias_shape is not None and ctx.needs_input_grad[2])
        nd = w.dim() - 2
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, list(ctx.bias_shape) if ctx.bias_shape is not None else None, list(stride),
            list(padding), list(dilation), False, [0] * nd, groups, list(mask))
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None) + none


def traced_conv(func, args, kwargs, switches: Sequence) -> torch.Tensor:
    """Call `func` (F.conv1d/2d/3d) with `args`/`kwargs` as `TracedConv`, or plainly when the call
    is one the wrapper leaves to PyTorch (see the module docstring)."""
    nd = _FUNCS[func]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    vals = dict(zip(names, args))
    vals.update(kwargs)
    x, w = vals.get("input"), vals.get("weight")
    padding = vals.get("padding", 0)
    if (isinstance(padding, str) or not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor)
            or torch.is_autocast_enabled(x.device.type) or x.dim() != nd + 2):
        return func(*args, **kwargs)
    return TracedConv.apply(x, w, vals.get("bias"), _tup(vals.get("stride", 1), nd), _tup(padding, nd),
                            _tup(vals.get("dilation", 1), nd), int(vals.get("groups", 1) or 1), tuple(switches))


def _heatmap_mode(switches) -> bool:
    return any(s is not None and s.active for s in switches)


class TracedBatchNorm(torch.autograd.Function):
    """(out, mean, var): the BatchNorm's output and the batch statistics it normalised with (mean and
    biased variance per channel), all differentiable in x.  The statistics are the trace's BatchNorm
    folding (`fisnet.rules._bn_statistics`): their gradient, which only the training step's final
    backward brings, is added here, to x's own, as the per-channel affine term
    g_μ/n + 2 (x − μ) g_var/n, so no full-size gradient of the fold waits on a separate node for the
    backward to reach this layer (and no pass over x computes the statistics again)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, switches, heatmap_bwd):
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.switches, ctx.heatmap_bwd = eps, switches, heatmap_bwd
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # no gradient at an output: nothing to do for it (see TracedConv)
        return out, mean.clone(), invstd.pow(-2).sub_(eps)

    @staticmethod
    def backward(ctx, g, g_mean=None, g_var=None):
        x, w, mean, invstd = ctx.saved_tensors
        gx = gw = gb = None
        if g is not None:
            if _heatmap_mode(ctx.switches):
                if ctx.needs_input_grad[0]:
                    gx = ctx.heatmap_bwd(g, x, w, ctx.eps)
            else:
                mask = [ctx.needs_input_grad[0], w is not None and ctx.needs_input_grad[1],
                        ctx.has_bias and ctx.needs_input_grad[2]]
                gx, gw, gb = torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True,
                                                                      ctx.eps, mask)
                gx, gw, gb = (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None)
        if (g_mean is not None or g_var is not None) and ctx.needs_input_grad[0]:
            gx = batch_stats_grad(gx, x, mean, g_mean, g_var)
        return (gx, gw, gb) + (None,) * 6


_BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def traced_batch_norm(args, kwargs, switches: Sequence, backend=None, stats: Optional[dict] = None) -> torch.Tensor:
    """Call F.batch_norm(*args, **kwargs) as `TracedBatchNorm` when it normalises with batch
    statistics, plainly otherwise (see the module docstring).  `stats`, if given, receives the batch
    statistics the forward used ("batch_mean", "batch_var": biased; differentiable in the input) when
    it is the former, so that folding this BatchNorm need not compute them again (rules._bn_statistics)."""
    vals = dict(zip(_BN_NAMES, args))
    vals.update(kwargs)
    x, w, b = vals.get("input"), vals.get("weight"), vals.get("bias")
    rm, rv = vals.get("running_mean"), vals.get("running_var")
    training = bool(vals.get("training", False))
    momentum, eps = vals.get("momentum", 0.1), vals.get("eps", 1e-5)
    batch_stats = training or rm is None or rv is None
    if (not batch_stats or not isinstance(x, torch.Tensor) or x.dim() < 2 or momentum is None
            or x.numel() <= x.shape[1]  # one value per channel: F.batch_norm raises its own error
            or any(t is not None and (not isinstance(t, torch.Tensor) or t.dtype != x.dtype) for t in (w, b))
            or torch.is_autocast_enabled(x.device.type)):
        return F.batch_norm(*args, **kwargs)
    heatmap_bwd = fisnet_ext.bn_heatmap_backward(x.device, backend)
    out, mean, var = TracedBatchNorm.apply(x, w, b, rm if training else None, rv if training else None,
                                           float(momentum), float(eps), tuple(switches), heatmap_bwd)
    if stats is not None:
        stats["batch_mean"], stats["batch_var"] = mean, var
    return out
