"""The LRP-z⁺ rule (docs/spec.md §3.1) as a switchable backward, for the Dual ISNet.

During a traced forward (`fisnet.lrp.trace(..., zplus=True)`) every conv/linear output, and
the output of a BatchNorm applied to it, passes through an identity "tap".  In an ordinary
backward (and in the LRP-ε heatmap backward) the taps pass the gradient through unchanged.
While the trace's z⁺ switch is on, the tap at a layer's final output (after its BatchNorm,
folded into the layer: W' = W·γ/σ, b' = γ(b − μ)/σ + β) skips the layer's own backward and sends

    G_in = W'⁺ᵀ ( G_out ⊙ num / (z'⁺ + ε) ),   z'⁺ = W'⁺ a + b'⁺

to the layer input, with num = z' (the layer output; the ReLU after it passes the plain
gradient, so G_out ⊙ z' = G_y ⊙ y) for hidden layers and num = z'⁺ for the classifier (the
last conv/linear of the forward), whose positive-weight logits seed the map.  All of it is
written in differentiable PyTorch ops, so the map can be trained on (create_graph=True).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

import fisnet_ext

from .rules import LinearLayer, fold_batchnorm_as_used


@dataclass
class LayerRecord:
    layer: LinearLayer
    input: torch.Tensor
    conv_out: Optional[torch.Tensor] = None
    bn: Optional[dict] = None
    bn_raw: Optional[torch.Tensor] = None  # the BatchNorm's output before its tap
    is_logits: bool = False
    tapped: Optional[torch.Tensor] = None  # the layer's output as the forward saw it (after its tap)
    bn_tapped: Optional[torch.Tensor] = None  # the BatchNorm's output after its tap
    signed: bool = False  # the layer input has negative entries (after GELU, SiLU, LeakyReLU, …)
    tap_version: int = 0  # versions of `tapped` / `bn_tapped` when made (an in-place op changes them)
    bn_tap_version: int = 0

    @property
    def raw_out(self) -> torch.Tensor:
        """The layer's output (after its BatchNorm), as computed: never modified in place."""
        return self.conv_out if self.bn is None else self.bn_raw


def folded(rec: LayerRecord) -> LinearLayer:
    return rec.layer if rec.bn is None else fold_batchnorm_as_used(rec.layer, rec.bn, rec.conv_out)


def _in_dtype(layer: LinearLayer, dt) -> LinearLayer:
    """The layer with its weights in the dtype of its input (under autocast the forward ran in
    bf16/fp16 while the parameters stay fp32; the backward runs outside autocast)."""
    if layer.weight.dtype == dt:
        return layer
    return LinearLayer(layer.kind, layer.weight.to(dt), None if layer.bias is None else layer.bias.to(dt),
                       layer.stride, layer.padding, layer.dilation, layer.groups, layer.pad)


def zplus_input_grad(rec: LayerRecord, z: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """G_in = W⁺ᵀ(G ⊙ num/(z⁺+ε)) for one layer (num = z, or z⁺ for the classifier); inputs of
    either sign through `_branch_zplus` (only positive contributions count)."""
    dt = rec.input.dtype
    zp, back = _branch_zplus(rec, None)
    num = zp if rec.is_logits else z.to(dt)
    return back(fisnet_ext.zplus_ratio(g.to(dt), num, zp, eps))  # fused g·num/(z⁺+ε), with its double backward


class ZPlusTap(torch.autograd.Function):
    """Identity on z; under the z⁺ switch, the z⁺ rule from z's gradient to the layer input."""

    @staticmethod
    def forward(ctx, z, a, rec, stage, switch, eps):
        # the record weakly: it holds tensors whose autograd nodes hold this ctx (a cycle through C++
        # nodes that Python's collector cannot free); the trace keeps the records alive
        ctx.rec, ctx.stage, ctx.switch, ctx.eps = weakref.ref(rec), stage, switch, eps
        ctx.save_for_backward(z)
        ctx.set_materialize_grads(False)
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        sw = ctx.switch
        if not sw.active:
            return g, None, None, None, None, None
        if g is None:
            return None, None, None, None, None, None
        rec = ctx.rec()
        if rec is None:
            raise RuntimeError("a z⁺ backward ran after its trace was freed; keep the LRPTrace while computing maps")
        # two rule slots (Dual ISNet, one batched pass): slot 0 is the LRP-ε pass, where the tap is
        # an identity; slot 1 the z⁺ pass
        g_through = fisnet_ext.slot_mask(g, 0) if sw.dual else None
        if ctx.stage == "conv" and rec.bn is not None:
            return g_through, None, None, None, None, None  # the tap after the BatchNorm does the z⁺ work
        (z,) = ctx.saved_tensors
        g_zp = fisnet_ext.slot_mask(g, 1) if sw.dual else g
        return g_through, zplus_input_grad(rec, z, g_zp, ctx.eps), None, None, None, None


def _branch_zplus(rec: Optional[LayerRecord], v: torch.Tensor):
    """The positive contributions of a layer (or residual branch) to its output: (z⁺, a function
    s ↦ input-gradient).  A conv/BatchNorm layer: W⁺a + b⁺, and for inputs of either sign
    W⁺a⁺ + W⁻a⁻ + b⁺ (a⁺ with W⁺, a⁻ with W⁻, so every R_j = a_j·G_j ≥ 0; docs/method.md); an
    identity branch (rec None): the positive entries of `v`."""
    if rec is None:
        return v.clamp(min=0), None
    a = rec.input
    layer = _in_dtype(folded(rec), a.dtype)
    wp = layer.weight.clamp(min=0)
    bp = None if layer.bias is None else layer.bias.clamp(min=0)
    if not rec.signed:
        return layer.forward(a, wp, bp), (lambda s: layer.transpose(s, wp, a.shape))
    wn = layer.weight.clamp(max=0)
    zp = layer.forward(a.clamp(min=0), wp, bp) + layer.forward(a.clamp(max=0), wn, None)
    return zp, (lambda s: torch.where(a >= 0, layer.transpose(s, wp, a.shape), layer.transpose(s, wn, a.shape)))


class ZPlusSum(torch.autograd.Function):
    """u + v where u (and maybe v) is the output of a conv/BatchNorm: in the z⁺ pass the sum is one
    layer with the last conv/BatchNorm of each branch, whose inputs are the branches' inputs (and
    the identity input): only positive contributions count, so relevance never changes sign and is
    conserved as ε → 0 with zero biases.  Otherwise an ordinary sum.  `inplace`: u += v (u must be
    a branch output, so its value before the sum is not needed)."""

    @staticmethod
    def forward(ctx, u, v, a_u, a_v, recs, switch, eps, inplace):
        ctx.recs = tuple(None if r is None else weakref.ref(r) for r in recs)  # weakly: see ZPlusTap
        ctx.switch, ctx.eps = switch, eps
        if inplace:
            u.add_(v)
            ctx.mark_dirty(u)
            out = u
        else:
            out = u + v
        # the values of the two summands, as the backward needs them: a branch's own (unmodified)
        # output from its record (u itself may be changed in place later, e.g. by an in-place ReLU);
        # an identity input as saved
        ctx.save_for_backward(None if recs[0] is not None else u, None if recs[1] is not None else v)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, g):
        sw = ctx.switch
        rest = (None,) * 4
        if g is None:
            return (None,) * 8
        if not sw.active:
            return (g, g, None, None) + rest
        u, v = ctx.saved_tensors
        rec_u, rec_v = (None if r is None else r() for r in ctx.recs)
        u = rec_u.raw_out if rec_u is not None else u
        v = rec_v.raw_out if rec_v is not None else v
        out = u + v
        g_through = fisnet_ext.slot_mask(g, 0) if sw.dual else None
        g_zp = fisnet_ext.slot_mask(g, 1) if sw.dual else g
        zu, back_u = _branch_zplus(rec_u, u)
        zv, back_v = _branch_zplus(rec_v, v)
        zsum = zu + zv
        s = fisnet_ext.zplus_ratio(g_zp.to(zsum.dtype), out.to(zsum.dtype), zsum, ctx.eps)  # R_sum / (z⁺ + ε)
        grads = []
        for t, back in ((u, back_u), (v, back_v)):
            if back is not None:  # a branch: to its conv's input
                grads.append((g_through, back(s)))
            else:  # the identity: R = t⁺ · s
                own = s * (t > 0).to(s.dtype)
                grads.append((own if g_through is None else g_through + own, None))
        (g_u, g_au), (g_v, g_av) = grads
        return (g_u, g_v, g_au, g_av) + rest
