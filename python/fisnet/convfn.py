"""Convolutions of a traced forward pass, with a backward that is cheap to differentiate again.

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
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .rules import conv_input_grad

__all__ = ["TracedConv", "traced_conv"]

_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _tup(v, nd: int) -> tuple:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * nd


class TracedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, switches):
        nd = weight.dim() - 2
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.bias_shape = None if bias is None else tuple(bias.shape)
        ctx.switches = switches
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        none = (None,) * 5
        if any(s is not None and s.active for s in ctx.switches):
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
