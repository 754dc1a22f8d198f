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

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

import fisnet_ext

from .rules import LinearLayer, batchnorm_scale_shift_as_used, scaled_part


@dataclass
class ZPlusMode:
    """Per trace: `matched` once the forward has met an op whose outputs can be negative and carry
    relevance (a GELU/SiLU/LeakyReLU/ELU/Mish/Hardswish, a norm, attention).  Then every z⁺ layer
    is sign-matched: an output z ≥ 0 takes its relevance from the positive contributions, an output
    z < 0 from the negative ones (R_j = (a_j w_jk)⁻ / z⁻_k · R_k), so relevance keeps its sign and is
    conserved as ε → 0 with zero biases.  In ReLU networks only outputs z ≥ 0 carry relevance and
    the rule is the plain z⁺ rule (docs/method.md)."""

    matched: bool = False


@dataclass
class LayerRecord:
    """One conv/linear layer (and its BatchNorm) of a z⁺ trace.  Its outputs are kept only as the
    tensors the forward went on with (`tapped`, `bn_tapped`: the model's own activations); the value a
    z⁺ backward needs is read from them (`value`) while they are unchanged, from a copy the trace made
    before an in-place op changed them (copy-on-write, `conv_copy` / `bn_copy`), or, for the ratio's
    numerator only, from an in-place ReLU's output (`*_relu_version`: G ⊙ z = G ⊙ relu(z) when the only
    gradient reaching z comes through that ReLU, which the trace checks)."""

    layer: LinearLayer
    input: torch.Tensor
    bn: Optional[dict] = None
    is_logits: bool = False
    tapped: Optional[torch.Tensor] = None  # the layer's output as the forward went on with it (after its tap)
    bn_tapped: Optional[torch.Tensor] = None  # the BatchNorm's output after its tap
    signed: bool = False  # the layer input has negative entries (after GELU, SiLU, LeakyReLU, …)
    tap_version: int = 0  # versions of `tapped` / `bn_tapped` when made (an in-place op changes them)
    bn_tap_version: int = 0
    mode: Optional[ZPlusMode] = None  # the trace's z⁺ mode (sign-matched or not)
    conv_copy: Optional[torch.Tensor] = None  # `tapped` before an in-place op changed it
    bn_copy: Optional[torch.Tensor] = None
    conv_relu_version: Optional[int] = None  # the version an in-place ReLU gave `tapped` (see class doc)
    bn_relu_version: Optional[int] = None
    read: set = field(default_factory=set)  # stages whose output an op read before any in-place change
    branch: bool = False  # a summand of a z⁺ residual sum (its value, not a ReLU's output, is needed)

    def value(self, stage: str, numerator: bool = False) -> torch.Tensor:
        """The output of `stage` ("conv" or "bn") as computed; with `numerator`, possibly an in-place
        ReLU's output in its place (see the class doc)."""
        t, v0, copy, rv = ((self.tapped, self.tap_version, self.conv_copy, self.conv_relu_version) if stage == "conv"
                           else (self.bn_tapped, self.bn_tap_version, self.bn_copy, self.bn_relu_version))
        if copy is not None:
            return copy
        if t._version == v0 or (numerator and rv is not None and t._version == rv):
            return t
        raise RuntimeError(
            "fisnet (Dual ISNet): a layer's output was modified in place, after the forward returned it, by an "
            "operation the trace did not see, so its value for the z⁺ rule is lost; modify a copy instead "
            "(out = out.clone()) or use the out-of-place form of the operation")

    @property
    def conv_out(self) -> torch.Tensor:
        """The conv/linear output (before any BatchNorm), as computed."""
        return self.value("conv")

    @property
    def raw_out(self) -> torch.Tensor:
        """The layer's output (after its BatchNorm), as computed."""
        return self.value("conv" if self.bn is None else "bn")


class _Recipe:
    """How to remake a signed folded weight (see `_RemadeWeights`): W, the BatchNorm scale (None: W's
    own sign part), the sign, the dtype, and W's version when it was made."""

    __slots__ = ("w", "scale", "positive", "dtype", "version")

    def __init__(self, w, scale, positive, dtype):
        self.w, self.scale, self.positive, self.dtype = w.detach(), None if scale is None else scale.detach(), positive, dtype
        self.version = w._version

    def remake(self) -> torch.Tensor:
        if self.w._version != self.version:
            raise RuntimeError("a layer's weight was modified in place between the heatmap pass and the training "
                               "step's backward (an optimizer step before loss.backward()?); step after the backward")
        with torch.no_grad():
            w = scaled_part(self.w, self.scale, self.positive)
            return w if w.dtype == self.dtype else w.to(self.dtype)


class _RemadeWeights:
    """Saved-tensor hooks for one z⁺ backward: the signed folded weights W'± that `_signed_weights` made
    are saved by the convolutions that use them as their recipe (`_Recipe`) and remade when the training
    step's backward unpacks them — a weight-sized multiply per use instead of one more copy of every
    weight kept through the step (ResNet-18: 45 MB).  Autograd gives the remade tensor the original's
    place in the graph, so higher derivatives are unchanged.  Off inside functorch transforms (the
    Dual two-slot pass runs its backward under vmap), where saved tensors are wrapped."""

    def __init__(self):
        self.made = {}

    def note(self, t: torch.Tensor, recipe: _Recipe) -> None:
        self.made[id(t)] = (t, recipe)

    def pack(self, t):
        r = self.made.get(id(t))
        return r[1] if r is not None and r[0] is t else t

    @staticmethod
    def unpack(p):
        return p.remake() if isinstance(p, _Recipe) else p

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.made.clear()
        return self._hooks.__exit__(*exc)


def _remade_weights():
    """A `_RemadeWeights` context for a z⁺ backward, or a null context inside a functorch transform."""
    level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
    if level is None or level() is not None:  # (unknown on this torch: keep the weights)
        return contextlib.nullcontext()
    return _RemadeWeights()


def _signed_weights(rec: LayerRecord, dt, remade=None):
    """(part, b'): part(True) = W'⁺, part(False) = W'⁻ of the layer with its BatchNorm folded in, in dtype `dt` (under
    autocast the forward ran in bf16/fp16 while the parameters stay fp32; the backward runs outside
    autocast).  W'± come from W and the BatchNorm's scale (`scaled_part`): the folded W' itself is
    not kept; with `remade` (a `_RemadeWeights`), W'± are not kept by their users either."""
    layer = rec.layer
    if rec.bn is None:
        scale, b = None, layer.bias
    else:
        scale, b = batchnorm_scale_shift_as_used(layer, rec.bn, rec.conv_out)

    def part(positive):
        w = scaled_part(layer.weight, scale, positive)
        w = w if w.dtype == dt else w.to(dt)
        if isinstance(remade, _RemadeWeights):
            remade.note(w, _Recipe(layer.weight, scale, positive, dt))
        return w

    return part, (b if b is None or b.dtype == dt else b.to(dt))


def _matched(rec: Optional[LayerRecord], mode: Optional[ZPlusMode] = None) -> bool:
    m = mode if mode is not None else (rec.mode if rec is not None else None)
    return bool(m is not None and m.matched)


def signed_ratios(g: torch.Tensor, out: torch.Tensor, zp: torch.Tensor, zn: Optional[torch.Tensor], eps: float):
    """(s⁺, s⁻): R/(z⁺+ε) where out ≥ 0 and R/(z⁻−ε) where out < 0 (R = out·g), each zero elsewhere;
    s⁻ is None when `zn` is (the plain z⁺ rule: s⁺ = R/(z⁺+ε) everywhere).  Fused, with its double
    backward (fisnet_ext.zplus_ratio)."""
    if zn is None:
        return fisnet_ext.zplus_ratio(g, out, zp, eps), None
    sp = fisnet_ext.zplus_ratio(g, out.clamp(min=0), zp, eps)
    sn = fisnet_ext.zplus_ratio(g, out.clamp(max=0), zn.neg(), eps).neg()  # g·out/(z⁻ − ε) where out < 0
    return sp, sn


def zplus_input_grad(rec: LayerRecord, z: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """G_in = W⁺ᵀ(G ⊙ num/(z⁺+ε)) for one layer (num = z, or z⁺ for the classifier); inputs of
    either sign through `_branch_zplus` (only positive contributions count); sign-matched outputs
    (`ZPlusMode`) with the negative contributions where z < 0."""
    dt = rec.input.dtype
    matched = _matched(rec) and not rec.is_logits
    with _remade_weights() as remade:
        zp, zn, back = _branch_zplus(rec, None, matched, remade)
        num = zp if rec.is_logits else z.to(dt)
        return back(*signed_ratios(g.to(dt), num, zp, zn, eps))


class ZPlusTap(torch.autograd.Function):
    """Identity on z; under the z⁺ switch, the z⁺ rule from z's gradient to the layer input."""

    @staticmethod
    def forward(ctx, z, a, rec, stage, switch, eps):
        # the record weakly: it holds tensors whose autograd nodes hold this ctx (a cycle through C++
        # nodes that Python's collector cannot free); the trace keeps the records alive
        ctx.rec, ctx.stage, ctx.switch, ctx.eps = weakref.ref(rec), stage, switch, eps
        ctx.set_materialize_grads(False)
        # z itself is not kept: the record reads the output's value from the returned tensor (or a
        # copy made before an in-place op changes it).  The tap is an in-place identity on z (no copy),
        # but for a view, which autograd does not let a Function change in place
        if z._base is None:
            ctx.mark_dirty(z)
            return z
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
        z = None if rec.is_logits else rec.value(ctx.stage, numerator=True)
        g_zp = fisnet_ext.slot_mask(g, 1) if sw.dual else g
        return g_through, zplus_input_grad(rec, z, g_zp, ctx.eps), None, None, None, None


def _branch_zplus(rec: Optional[LayerRecord], v: torch.Tensor, matched: bool = False, remade=None):
    """The positive contributions of a layer (or residual branch) to its output, and with `matched`
    the negative ones: (z⁺, z⁻ or None, a function (s⁺, s⁻) ↦ input-gradient).  A conv/BatchNorm
    layer: z⁺ = W⁺a + b⁺, and for inputs of either sign W⁺a⁺ + W⁻a⁻ + b⁺ (a⁺ with W⁺, a⁻ with W⁻,
    so every R_j = a_j·G_j ≥ 0; docs/method.md); z⁻ = W⁻a + b⁻, for inputs of either sign
    W⁻a⁺ + W⁺a⁻ + b⁻.  An identity branch (rec None): the positive (negative) entries of `v`, and
    no function (the caller masks s⁺, s⁻ by the sign of v)."""
    if rec is None:
        return v.clamp(min=0), (v.clamp(max=0) if matched else None), None
    a = rec.input
    layer = rec.layer
    part, b = _signed_weights(rec, a.dtype, remade)
    wp = part(True)  # (W'⁻ only where it is used: sign-matched layers, signed inputs)
    bp = None if b is None else b.clamp(min=0)
    T = layer.transpose
    if not rec.signed:
        zp = layer.forward(a, wp, bp)
        if not matched:
            return zp, None, (lambda sp, sn: T(sp, wp, a.shape))
        wn = part(False)
        bn = None if b is None else b.clamp(max=0)
        return zp, layer.forward(a, wn, bn), (lambda sp, sn: T(sp, wp, a.shape) + T(sn, wn, a.shape))
    wn = part(False)
    ap, an = a.clamp(min=0), a.clamp(max=0)
    zp = layer.forward(ap, wp, bp) + layer.forward(an, wn, None)
    if not matched:
        return zp, None, (lambda sp, sn: torch.where(a >= 0, T(sp, wp, a.shape), T(sp, wn, a.shape)))
    bn = None if b is None else b.clamp(max=0)
    zn = layer.forward(ap, wn, bn) + layer.forward(an, wp, None)
    return zp, zn, (lambda sp, sn: torch.where(a >= 0, T(sp, wp, a.shape) + T(sn, wn, a.shape),
                                               T(sp, wn, a.shape) + T(sn, wp, a.shape)))


class ZPlusSum(torch.autograd.Function):
    """u + v where u (and maybe v) is the output of a conv/BatchNorm: in the z⁺ pass the sum is one
    layer with the last conv/BatchNorm of each branch, whose inputs are the branches' inputs (and
    the identity input): only positive contributions count, so relevance never changes sign and is
    conserved as ε → 0 with zero biases.  Otherwise an ordinary sum.  `inplace`: u += v (u must be
    a branch output, so its value before the sum is not needed)."""

    @staticmethod
    def forward(ctx, u, v, a_u, a_v, recs, switch, eps, inplace, mode=None):
        ctx.recs = tuple(None if r is None else weakref.ref(r) for r in recs)  # weakly: see ZPlusTap
        ctx.switch, ctx.eps, ctx.mode = switch, eps, mode
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
        rest = (None,) * 5
        if g is None:
            return (None,) * 9
        if not sw.active:
            return (g, g, None, None) + rest
        u, v = ctx.saved_tensors
        rec_u, rec_v = (None if r is None else r() for r in ctx.recs)
        u = rec_u.raw_out if rec_u is not None else u
        v = rec_v.raw_out if rec_v is not None else v
        out = u + v
        g_through = fisnet_ext.slot_mask(g, 0) if sw.dual else None
        g_zp = fisnet_ext.slot_mask(g, 1) if sw.dual else g
        matched = _matched(None, ctx.mode)
        with _remade_weights() as remade:
            zu, nu, back_u = _branch_zplus(rec_u, u, matched, remade)
            zv, nv, back_v = _branch_zplus(rec_v, v, matched, remade)
            zsum = zu + zv
            nsum = None if nu is None else nu + nv
            sp, sn = signed_ratios(g_zp.to(zsum.dtype), out.to(zsum.dtype), zsum, nsum, ctx.eps)  # R_sum / (z± ± ε)
            grads = []
            for t, back in ((u, back_u), (v, back_v)):
                if back is not None:  # a branch: to its conv's input
                    grads.append((g_through, back(sp, sn)))
                else:  # the identity: R = t⁺ · s⁺ (+ t⁻ · s⁻)
                    own = sp * (t > 0).to(sp.dtype)
                    if sn is not None:
                        own = own + sn * (t < 0).to(sn.dtype)
                    grads.append((own if g_through is None else g_through + own, None))
        (g_u, g_au), (g_v, g_av) = grads
        return (g_u, g_v, g_au, g_av) + rest
