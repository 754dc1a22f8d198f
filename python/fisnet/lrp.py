"""LRP-Flex: LRP-ε heatmaps for any ReLU network by one modified backward pass (docs/spec.md §2).

How it works without editing the model: the forward pass runs under a `TorchFunctionMode`
that replaces every ReLU call (`nn.ReLU`, inplace or not, reused or not; `F.relu`,
`torch.relu`, `Tensor.relu`) by `fisnet_ext.lrp_relu` tied to one `HeatmapSwitch`, records the
first conv/linear layer (and its BatchNorm and ReLU) for the Zb rule, and refuses other
activations.  The model's parameters, modules, hooks and flags are untouched; LDS layers are
read with forward hooks that are removed before the call returns.

`trace(model, x, ...)` runs that forward and returns an `LRPTrace`, whose `relevance(q)`
computes the heatmaps of any per-image quantities q (B, M) in one backward call (batched over
M with `is_grads_batched`).  The logits of the trace are the model's ordinary logits: their
gradient (switch off) is the ordinary gradient, so one forward serves classification and
heatmaps.  `explain(...)` is the user-facing one-call form.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fisnet_ext

from . import optable
from .rules import (LinearLayer, bound_images, fold_batchnorm_as_used, fold_batchnorm_for_zb, resolve_rules,
                    zb_ratio, zb_transpose)
from .traced import _FUNCS as TRACED_CONV_FUNCS, traced_batch_norm, traced_conv
from .zplus import LayerRecord, ZPlusMode, ZPlusSum, ZPlusTap, signed_ratios

# On CPU a batched backward over many seeds runs in chunks of seeds whose largest activation
# (chunk x batch x bytes per image) stays under this many bytes.  K = 100, batch 32, small_cnn:
# unchunked (200 MB tensors) 1.8x slower than a per-class loop, 64 MB chunks 1.2x slower, 20 MB
# chunks 0.9x (docs/status.md).
CPU_SEED_CHUNK_BYTES = 20 << 20

TRACED_BATCH_NORM = True  # tests switch it off to compare with PyTorch's own BatchNorm backward


class UnsupportedActivationError(TypeError):
    """The model uses a non-linearity that LRP-Flex cannot treat (only ReLU is supported)."""


_T = torch.Tensor
RELU_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, _T.relu, _T.relu_}
INPLACE_RELU_FUNCS = {F.relu_, torch.relu_, _T.relu_}
CONV_FUNCS = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d", F.linear: "linear"}

_unsupported_funcs = {}
for _name in ("gelu", "silu", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "mish", "hardswish",
              "hardsigmoid", "hardtanh", "hardtanh_", "relu6", "softplus", "prelu", "rrelu", "rrelu_", "glu",
              "logsigmoid", "softsign", "tanhshrink", "threshold", "threshold_", "softshrink", "hardshrink",
              "sigmoid", "tanh"):
    if hasattr(F, _name):
        _unsupported_funcs[getattr(F, _name)] = f"F.{_name}"
for _name in ("sigmoid", "sigmoid_", "tanh", "tanh_", "selu", "selu_", "celu", "celu_", "rrelu", "prelu"):
    if hasattr(torch, _name):
        _unsupported_funcs[getattr(torch, _name)] = f"torch.{_name}"
    if hasattr(_T, _name):
        _unsupported_funcs[getattr(_T, _name)] = f"Tensor.{_name}"
UNSUPPORTED_FUNCS = _unsupported_funcs

# element-wise activations of the rule table (kind "activation"): function -> how to read its call
ACT_FUNCS = {}
for _f, _spec in ((F.relu6, ("relu6", None, None)), (F.leaky_relu, ("leaky_relu", "negative_slope", 0.01)),
                  (F.leaky_relu_, ("leaky_relu", "negative_slope", 0.01)), (F.gelu, ("gelu", None, None)),
                  (F.silu, ("silu", None, None)), (F.hardswish, ("hardswish", None, None)),
                  (F.elu, ("elu", "alpha", 1.0)), (F.elu_, ("elu", "alpha", 1.0)), (F.mish, ("mish", None, None)),
                  (F.softplus, ("softplus", "beta", 1.0)), (F.hardtanh, ("hardtanh", None, None)),
                  (F.hardtanh_, ("hardtanh", None, None))):
    ACT_FUNCS[_f] = _spec
_ACT_ARGS = {"leaky_relu": ("input", "negative_slope", "inplace"), "elu": ("input", "alpha", "inplace"),
             "softplus": ("input", "beta", "threshold"), "gelu": ("input", "approximate"),
             "hardtanh": ("input", "min_val", "max_val", "inplace")}
NORM_FUNCS = {F.layer_norm: "layer_norm", F.group_norm: "group_norm", F.instance_norm: "instance_norm"}
if hasattr(F, "rms_norm"):
    NORM_FUNCS[F.rms_norm] = "rms_norm"
GATE_FUNCS = {torch.sigmoid: "torch.sigmoid", _T.sigmoid: "Tensor.sigmoid", F.sigmoid: "F.sigmoid",
              F.hardsigmoid: "F.hardsigmoid"}
ATTENTION_FUNCS = {F.scaled_dot_product_attention: "sdpa", F.multi_head_attention_forward: "mha"}
MUL_FUNCS = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__, torch.multiply, _T.multiply}
# attention written by hand, softmax(q kᵀ ...) v: its two matrix products and its softmax
MATMUL_FUNCS = {torch.matmul, _T.matmul, _T.__matmul__, torch.bmm, _T.bmm}
SOFTMAX_FUNCS = {torch.softmax, _T.softmax, F.softmax}
_SCORES_HOW = ("is supported only as attention scores: scaled, masked (constants) and passed to a softmax whose "
               "output multiplies the values (softmax(q @ k.transpose(-2, -1) * scale) @ v); use "
               "F.scaled_dot_product_attention or nn.MultiheadAttention otherwise")
# functions whose output is ≥ 0 wherever their (first) input is: a Dual trace then knows a conv's
# input is not signed without reading it (`_known_nonneg`; a host synchronisation on GPUs)
SIGN_KEEPING_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                      F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                      F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.flatten, _T.flatten, _T.view, _T.reshape,
                      torch.reshape, _T.contiguous, F.dropout, F.dropout2d}
# linear with non-negative coefficients: in a Dual trace, an input of either sign gets the z⁺ rule
NONNEG_LINEAR_FUNCS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                       F.adaptive_avg_pool3d, torch.mean, _T.mean}
# residual sums the z⁺ rule treats as one layer with their branches (out-of-place forms, and
# `out += identity`, whose result Python binds to `out`)
RESIDUAL_ADDS = {torch.add, _T.add, _T.__add__, _T.__radd__, _T.__iadd__, _T.add_}

UNSUPPORTED_MODULES = tuple(
    getattr(nn, n) for n in ("SELU", "CELU", "PReLU", "RReLU", "Tanh",
                             "Softsign", "Tanhshrink", "Threshold", "LogSigmoid", "GLU",
                             "Softshrink", "Hardshrink", "Softmax", "LogSoftmax", "Softmax2d")
    if hasattr(nn, n)
)


def check_activations(model: nn.Module) -> None:
    """Raise `UnsupportedActivationError` naming the first non-ReLU activation module."""
    for name, mod in model.named_modules():
        if isinstance(mod, UNSUPPORTED_MODULES):
            raise UnsupportedActivationError(
                f"module {name or '<root>'!r} is {type(mod).__name__}: fisnet has no LRP rule for it (see "
                f"fisnet.rules.DEFAULT_RULES for the supported ops). Replace it with a supported activation"
                + (" or return logits instead of probabilities" if "Softmax" in type(mod).__name__ else "")
                + ", or explain a model without it.")


# ---------------------------------------------------------------------------------------------
@dataclass
class _ZbLayer:
    """A conv/linear call that reads the model input directly: the Zb rule applies there."""

    layer: LinearLayer
    input: torch.Tensor  # what the layer read: the input (or a full view of it), or F.pad of it
    output: torch.Tensor
    pad: Optional[tuple] = None  # (pad, mode, value) when the layer read F.pad(input, ...)
    bn: Optional[dict] = None
    bn_output: Optional[torch.Tensor] = None
    relu_output: Optional[torch.Tensor] = None
    relu_version: Optional[int] = None  # the version of relu_output when a ReLU (max(z, 0)) made it
    version: int = 0  # of the layer (BN) output when recorded
    other_uses: List[str] = field(default_factory=list)  # functions other than one ReLU that read the output

    @property
    def neuron(self) -> torch.Tensor:
        """The layer's output as the next op sees it (after the BatchNorm folded into it)."""
        return self.bn_output if self.bn_output is not None else self.output

    @property
    def target(self) -> torch.Tensor:
        """Where R_out is taken: the ReLU that follows directly, else the layer (BN) output."""
        return self.relu_output if self.relu_output is not None else self.neuron


@dataclass
class _LDSEntry:
    """An LDS layer's output; `pre`/`edge` hold its value and autograd edge when a later op
    modifies it in place (the map is then that of the tensor the layer returned)."""

    tensor: torch.Tensor
    version: int
    pre: Optional[torch.Tensor] = None
    edge: object = None


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_PAD_ARGS = ("input", "pad", "mode", "value")


def _call_args(names, args, kwargs) -> dict:
    """The arguments of an intercepted call by name."""
    vals = dict(zip(names, args))
    vals.update(kwargs)
    return vals


def _make_layer(kind: str, vals: dict) -> LinearLayer:
    """A LinearLayer from the arguments of an F.conv*/F.linear call."""
    nd = {"conv1d": 1, "conv2d": 2, "conv3d": 3, "linear": 0}[kind]

    def tup(v, default):
        v = default if v is None else v
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * max(nd, 1)

    padding = vals.get("padding", 0)
    pad = None
    dil = tup(vals.get("dilation"), 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same":  # PyTorch's split: left = total // 2, the rest on the right
            k = vals["weight"].shape[2:]
            total = [d * (kk - 1) for d, kk in zip(dil, k)]
            left = [t // 2 for t in total]
            if all(t == 2 * lft for t, lft in zip(total, left)):
                padding = tuple(left)
            else:
                padding = 0
                pad = tuple(v for t, lft in zip(reversed(total), reversed(left)) for v in (lft, t - lft))
        else:
            raise ValueError(f"unknown conv padding {padding!r}")
    return LinearLayer(kind, vals["weight"], vals.get("bias"), tup(vals.get("stride"), 1), tup(padding, 0),
                       dil, int(vals.get("groups", 1) or 1), pad)


def _deref(r):
    return r() if r is not None else None


_INPLACE_ARG: Dict[object, Optional[int]] = {}  # func -> position of its `inplace` parameter (None: none)


def _is_inplace(func, args, kwargs) -> bool:
    """Whether a call changes its first argument in place: a Tensor method or torch function named
    `…_` or `__i…__`, item assignment, or an `inplace=True` argument (by name or position)."""
    name = getattr(func, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__":
        return True
    if kwargs.get("inplace") is True:
        return True
    if func not in _INPLACE_ARG:
        pos = None
        try:
            params = list(inspect.signature(func).parameters)
            pos = params.index("inplace") if "inplace" in params else None
        except (TypeError, ValueError):
            pass
        _INPLACE_ARG[func] = pos
    pos = _INPLACE_ARG[func]
    return pos is not None and len(args) > pos and args[pos] is True


def _tensors(obj):
    """The tensors among a call's arguments (one level of lists/tuples, as torch ops take them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            if isinstance(o, torch.Tensor):
                yield o
            elif isinstance(o, (list, tuple)):
                for p in o:
                    if isinstance(p, torch.Tensor):
                        yield p


class _Interceptor(TorchFunctionMode):
    """The trace's view of a forward pass: ReLUs become `fisnet_ext.lrp_relu`, convs and
    training BatchNorms their traced forms, Zb layers are recorded, and every other function
    applied to an input-dependent tensor is checked against the op table (fisnet.optable)."""

    def __init__(self, eps, switch, backend, x_in, zb, zb_read=None, first_weight=None, zswitch=None,
                 rules=None):
        super().__init__()
        self.rules = resolve_rules(rules)
        self.switches = tuple(s for s in (switch, zswitch) if s is not None)
        self._gates: Dict[int, weakref.ref] = {}  # sigmoid/hardsigmoid outputs: gates for the "gate" rule
        self.n_act = 0
        self.zswitch = zswitch  # set for the Dual ISNet: conv/linear outputs get z⁺ taps
        self._bn_stats: dict = {}  # the last F.batch_norm call's batch statistics (traced_batch_norm)
        self.zmode = ZPlusMode()  # sign-matched z⁺ layers once an op with signed relevant outputs is met
        self.records: List[LayerRecord] = []
        self._nonneg: Dict[int, tuple] = {}  # id -> (weakref, version): tensors known ≥ 0 (Dual traces)
        self._ztapped: Dict[int, tuple] = {}  # id(tapped output) -> (weakref, record, stage): copy-on-write
        self._pending_relu = None  # (tensor, record, stage) an in-place ReLU is about to change (see _relu)
        self.eps = eps
        self.switch = switch
        self.backend = backend
        self.x_in = x_in
        self.zb = zb
        self.zb_read = zb_read  # the tensor a Zb layer gets in place of the input it read
        self.first_weight = first_weight  # a Parameter, when the user named the Zb layer
        self.zb_layers: List[_ZbLayer] = []
        self._zb_by_out: Dict[int, _ZbLayer] = {}
        self._pads: Dict[int, tuple] = {}
        self._taint: Dict[int, weakref.ref] = {id(x_in): weakref.ref(x_in)}
        self.watch: Dict[int, _LDSEntry] = {}  # LDS outputs, filled by the forward hooks
        self.n_relu = 0
        self.act_bytes = 0  # the largest ReLU output per image, in bytes (sizes the seed chunks)
        self.pending: Optional[Exception] = None  # a refusal raised inside a binary operator
        # attention written by hand: products of two input-dependent tensors that may be attention
        # scores (q kᵀ; and what linear ops with constants make of them), and softmaxes of such scores
        self._scores: Dict[int, weakref.ref] = {}
        self._weights: Dict[int, weakref.ref] = {}

    # -- input dependence -----------------------------------------------------------------
    @staticmethod
    def _in(table: Dict[int, weakref.ref], t) -> bool:
        """`t` itself (not a later tensor at the same address) is in an id → weakref table."""
        r = table.get(id(t))
        return r is not None and r() is t

    def _tainted(self, t) -> bool:
        return self._in(self._taint, t)

    def _mark(self, out) -> None:
        for o in _tensors(out):
            self._taint[id(o)] = weakref.ref(o)

    def _reads_input(self, t) -> Optional[tuple]:
        """(pad spec or None) when `t` is the model input, a full contiguous view of it, or F.pad of it."""
        x = self.x_in
        if t is x:
            return (None,)
        if not isinstance(t, torch.Tensor):
            return None
        if (t.numel() == x.numel() and t.dtype == x.dtype and t.device == x.device and t.numel() > 0
                and t.data_ptr() == x.data_ptr() and t.is_contiguous() and x.is_contiguous()):
            return (None,)
        p = self._pads.get(id(t))
        if p is not None and p[0] is t:
            return (p[1],)
        return None

    # -- the mode -------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watch and args:
            self._before_inplace(func, args, kwargs)
        if self._ztapped:
            self._tap_use(func, args, kwargs)
        if func in MATMUL_FUNCS or func in SOFTMAX_FUNCS or self._scores or self._weights:
            out = self._handwritten_attention(func, args, kwargs)
            if out is not NotImplemented:
                return out
        if func in RELU_FUNCS:
            return self._relu(func, args, kwargs)
        if func in ACT_FUNCS:
            return self._act(func, args, kwargs)
        if func in NORM_FUNCS:
            return self._norm(func, args, kwargs)
        if func in GATE_FUNCS:
            return self._gate(func, args, kwargs)
        if func in ATTENTION_FUNCS:
            return self._attention(func, args, kwargs)
        if func in MUL_FUNCS and self._gates and self.rules["gate"] == "constant_gate":
            args = self._hold_gates(args)
        if func in UNSUPPORTED_FUNCS:
            raise UnsupportedActivationError(
                f"the model's forward calls {UNSUPPORTED_FUNCS[func]}: fisnet has no LRP rule for it yet "
                f"(ReLU networks only); replace it with F.relu / nn.ReLU, or return logits rather than probabilities.")
        zb_rec = None
        if self._zb_by_out:
            self._note_zb_use(func, args, kwargs)
        if func in CONV_FUNCS and self.zb:
            vals = _call_args(_CONV_ARGS, args, kwargs)
            read = self._reads_input(vals.get("input"))
            if read is not None and (self.first_weight is None or vals.get("weight") is self.first_weight):
                zb_rec = _ZbLayer(_make_layer(CONV_FUNCS[func], vals), vals["input"], None, pad=read[0])
                vals["input"] = self.zb_read(vals["input"])
                args, kwargs = (), vals
        if self.zswitch is not None and func in RESIDUAL_ADDS:
            out = self._residual(func, args, kwargs)
            if out is not None:
                self._check(func, args, kwargs, out)
                return out
        if func is F.batch_norm:
            self._bn_stats = {}  # this call's batch statistics (traced_batch_norm), for folding it (Zb, z⁺)
        if func in TRACED_CONV_FUNCS:
            out = traced_conv(func, args, kwargs, (self.switch, self.zswitch))
        elif func is F.batch_norm and TRACED_BATCH_NORM:
            out = traced_batch_norm(args, kwargs, (self.switch, self.zswitch), self.backend, self._bn_stats)
        elif self.zswitch is not None and func in NONNEG_LINEAR_FUNCS and args and self._signed_input(args[0]):
            out = self._zplus_nonneg_linear(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if self.zswitch is not None:
            out = self._tap(func, args, kwargs, out)
            if func in SIGN_KEEPING_FUNCS and isinstance(out, torch.Tensor) and args \
                    and isinstance(args[0], torch.Tensor) and self._known_nonneg(args[0]):
                self._note_nonneg(out)
        if zb_rec is not None:
            zb_rec.output = out
            zb_rec.version = out._version
            self._mark(out)  # it reads the input (detached or gated for the heatmap backward)
            self.zb_layers.append(zb_rec)
            self._zb_by_out[id(out)] = zb_rec
        elif func is F.batch_norm and self._zb_by_out:
            x = args[0] if args else kwargs["input"]
            rec = self._zb_by_out.get(id(x))
            if rec is not None and rec.output is x and rec.bn is None:
                rec.bn = {**_call_args(_BN_ARGS, args, kwargs), **self._bn_stats}
                rec.bn_output = out
                rec.version = out._version
                self._zb_by_out[id(out)] = rec
        elif func is F.pad and self.zb:
            vals = _call_args(_PAD_ARGS, args, kwargs)
            if self._reads_input(vals.get("input")) == (None,):
                self._pads[id(out)] = (out, (tuple(vals["pad"]), vals.get("mode", "constant") or "constant",
                                             vals.get("value", None)))
        self._check(func, args, kwargs, out)
        return out

    def _note_zb_use(self, func, args, kwargs) -> None:
        """Record which functions read a Zb layer's output (its BatchNorm and ReLU excepted)."""
        for t in list(_tensors(args)) + list(_tensors(list(kwargs.values()))):
            rec = self._zb_by_out.get(id(t))
            if rec is None or rec.neuron is not t or rec.relu_output is t:  # (an in-place ReLU's output)
                continue
            if func is F.batch_norm and rec.bn is None and rec.output is t:
                continue
            if getattr(func, "__name__", "") in ("__get__", "size", "dim"):
                continue
            rec.other_uses.append(optable.func_name(func))

    def _relu(self, func, args, kwargs):
        x = args[0] if args else kwargs["input"]
        inplace = func in INPLACE_RELU_FUNCS or (func is F.relu and bool(
            args[1] if len(args) > 1 else kwargs.get("inplace", False)))
        if self.rules["activation"] == "gradient":
            y = func(*args, **kwargs)
        elif inplace:
            y = fisnet_ext.lrp_relu_(x, self.eps, self.switch, self.backend)
        else:
            y = fisnet_ext.lrp_relu(x, self.eps, self.switch, self.backend)
        self.n_relu += 1
        if self._pending_relu is not None and self._pending_relu[0] is x:  # (_tap_use) its output stands in
            _, zrec, stage = self._pending_relu
            setattr(zrec, f"{stage}_relu_version", y._version)
        self._pending_relu = None
        if y.dim() > 0 and y.shape[0] > 0:
            self.act_bytes = max(self.act_bytes, y.numel() // y.shape[0] * y.element_size())
        rec = self._zb_by_out.get(id(x))
        if rec is not None and rec.neuron is x:
            if rec.relu_output is None and not rec.other_uses:
                rec.relu_output, rec.relu_version = y, y._version
            else:
                rec.other_uses.append(optable.func_name(func))
        if self._tainted(x):
            self._mark(y)
        if self.zswitch is not None:
            self._note_nonneg(y)
        return y

    def _note_nonneg(self, t) -> None:
        self._nonneg[id(t)] = (weakref.ref(t), t._version)

    def _known_nonneg(self, t) -> bool:
        """`t` is, as it is now, a ReLU's output or a pooling/reshape of one (not changed in place since)."""
        r = self._nonneg.get(id(t))
        return r is not None and r[0]() is t and t._version == r[1]

    def _act(self, func, args, kwargs):
        """An element-wise activation of the rule table (kind "activation")."""
        kind, pname, pdefault = ACT_FUNCS[func]
        vals = _call_args(_ACT_ARGS.get(kind, ("input", "inplace")), args, kwargs)
        x = vals["input"]
        param = None
        if kind == "hardtanh":  # nn.ReLU6 calls F.hardtanh(x, 0, 6)
            lo, hi = float(vals.get("min_val", -1.0)), float(vals.get("max_val", 1.0))
            if (lo, hi) != (0.0, 6.0):
                self._raise(func, UnsupportedActivationError(
                    f"the model's forward calls F.hardtanh with range ({lo}, {hi}): fisnet's activation rule "
                    "knows hardtanh only as ReLU6 (0, 6); use ReLU or ReLU6, or explain a model without it."))
                return func(*args, **kwargs)
            kind = "relu6"
        elif kind == "gelu":
            kind = "gelu_tanh" if vals.get("approximate", "none") == "tanh" else "gelu"
        elif kind == "softplus" and float(vals.get("threshold", 20.0)) != 20.0:
            self._raise(func, UnsupportedActivationError(
                "the model's forward calls F.softplus with a threshold other than 20: fisnet's softplus rule uses "
                "PyTorch's default threshold; use the default."))
            return func(*args, **kwargs)
        elif pname is not None:
            param = float(vals.get(pname, pdefault))
        if not self._tainted(x) or self.rules["activation"] == "gradient":
            y = func(*args, **kwargs)
        else:
            y = fisnet_ext.lrp_act(x, kind, self.eps, self.switch, self.backend, param=param)
        if kind != "relu6" and self._tainted(x):
            self.zmode.matched = True  # outputs of either sign
        self.n_act += 1
        rec = self._zb_by_out.get(id(x))
        if rec is not None and rec.neuron is x:  # a Zb layer's activation: R_out is taken at its output
            if rec.relu_output is None and not rec.other_uses:
                rec.relu_output = y
            else:
                rec.other_uses.append(optable.func_name(func))
        if self._tainted(x):
            self._mark(y)
        return y

    def _norm(self, func, args, kwargs):
        """LayerNorm / GroupNorm / InstanceNorm / RMSNorm (kind "norm"): with the "constant_scale"
        rule, computed from differentiable parts whose scale σ is held constant in heatmap backwards
        (`_HeatmapBlock`): the ordinary gradient is the exact one, and in the double backward σ stays
        a function of the weights."""
        which = NORM_FUNCS[func]
        x = args[0] if args else kwargs["input"]
        if self._tainted(x):
            self.zmode.matched = True
        if not self._tainted(x) or self.rules["norm"] == "gradient":
            out = func(*args, **kwargs)
            if self._tainted(x):
                if self.zswitch is not None and out.shape == x.shape:
                    out = _ZPlusElementwise.apply(x, out, self.zswitch, self.eps)
                self._mark(out)
            return out
        hold = self._hold
        if which == "layer_norm":
            v = _call_args(("input", "normalized_shape", "weight", "bias", "eps"), args, kwargs)
            dims = tuple(range(x.dim() - len(tuple(v["normalized_shape"])), x.dim()))
            y = _normalise(x, dims, float(v.get("eps", 1e-5)), True, hold)
            y = _affine(y, v.get("weight"), v.get("bias"), None)
        elif which == "rms_norm":
            v = _call_args(("input", "normalized_shape", "weight", "eps"), args, kwargs)
            dims = tuple(range(x.dim() - len(tuple(v["normalized_shape"])), x.dim()))
            e = v.get("eps")
            e = torch.finfo(x.dtype).eps if e is None else float(e)
            y = _affine(_normalise(x, dims, e, False, hold), v.get("weight"), None, None)
        elif which == "group_norm":
            v = _call_args(("input", "num_groups", "weight", "bias", "eps"), args, kwargs)
            G = int(v["num_groups"])
            xg = x.reshape(x.shape[0], G, -1)
            y = _normalise(xg, (2,), float(v.get("eps", 1e-5)), True, hold).reshape(x.shape)
            y = _affine(y, v.get("weight"), v.get("bias"), x.dim())
        else:  # instance_norm
            v = _call_args(("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
                            "momentum", "eps"), args, kwargs)
            if not v.get("use_input_stats", True):  # running statistics: an affine map
                out = func(*args, **kwargs)
                self._mark(out)
                return out
            if v.get("running_mean") is not None:  # keep PyTorch's running-statistics update
                with torch.no_grad():
                    func(*args, **kwargs)
            dims = tuple(range(2, x.dim()))
            y = _normalise(x, dims, float(v.get("eps", 1e-5)), True, hold)
            y = _affine(y, v.get("weight"), v.get("bias"), x.dim())
        if self.zswitch is not None:  # the z⁺ pass: relevance passes the norm element by element
            y = _ZPlusElementwise.apply(x, y, self.zswitch, self.eps)
        self._mark(y)
        return y

    def _signed_input(self, t) -> bool:
        return (isinstance(t, torch.Tensor) and self._tainted(t) and t.is_floating_point()
                and not self._known_nonneg(t) and bool((t < 0).any()))

    def _zplus_nonneg_linear(self, func, args, kwargs):
        """Average pooling / mean of an input of either sign, in a Dual trace: f linear with
        non-negative coefficients, sign-matched in the z⁺ pass (`_zplus_split`, docs/method.md)."""
        a, rest = args[0], args[1:]
        return self._zplus_split(lambda t: func(t, *rest, **kwargs), a)

    def _zplus_split(self, f, a, zp_of=None, zn_of=None):
        """f(a) for f linear with non-negative coefficients (or affine, t ↦ t + b, with `zp_of`/`zn_of`
        giving z⁺ = t⁺ + b⁺ and z⁻ = t⁻ + b⁻) in a
        Dual trace: the z⁺ pass is sign-matched, an output y ≥ 0 takes its relevance from the inputs
        a > 0 (z⁺ = f(a⁺)), an output y < 0 from the inputs a < 0 (z⁻ = f(a⁻)):
        G_a = 1[a > 0] ⊙ f*(R_y/(z⁺+ε) on y ≥ 0) + 1[a < 0] ⊙ f*(R_y/(z⁻−ε) on y < 0).  f runs three
        times (two graphs for the two adjoints, and z⁺); the ordinary and LRP-ε backwards are f's own."""
        sw = self.zswitch
        y1 = f(_ZPlusSelect.apply(a, sw, True))
        y2 = f(_ZPlusSelect.apply(a, sw, False))
        zp = f(a.clamp(min=0)) if zp_of is None else zp_of(a)
        zn = y1 - zp if zn_of is None else zn_of(a)
        return _ZPlusSplit.apply(y1, y2, zp, zn, sw, self.eps)

    def _hold(self, t):
        return _HeatmapBlock.apply(t, self.switches)

    # -- attention (kind "attention") ---------------------------------------------------------
    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, training=True):
        """softmax(q kᵀ·scale + mask) v by the math path (differentiable twice), with the rule of the
        table: "cp" holds A constant in heatmap backwards, "attnlrp" scales the gradients reaching
        q, k (1/4) and v (1/2) in heatmap backwards.  Returns (out, A)."""
        rule = self.rules["attention"]
        if rule == "attnlrp":
            q = _HeatmapScale.apply(q, 0.25, self.switches)
            k = _HeatmapScale.apply(k, 0.25, self.switches)
            v = _HeatmapScale.apply(v, 0.5, self.switches)
        L, S = q.shape[-2], k.shape[-2]
        scale = 1.0 / (q.shape[-1] ** 0.5) if scale is None else float(scale)
        logits = torch.matmul(q, k.transpose(-2, -1)) * scale
        if is_causal:
            causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
            logits = logits.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask
        a = torch.softmax(logits, dim=-1)
        if dropout_p > 0.0 and training:
            a = F.dropout(a, dropout_p)
        a_used = self._hold(a) if rule == "cp" else a
        if rule == "cp" and self.zswitch is not None and bool((v < 0).any()):  # (v: maybe made in a rule)
            # the z⁺ pass: o = A v is linear in v with A ≥ 0 held: sign-matched as at average pooling
            return self._zplus_split(lambda t: torch.matmul(a_used, t), v), a
        return torch.matmul(a_used, v), a

    def _attention(self, func, args, kwargs):
        which = ATTENTION_FUNCS[func]
        tensors = [t for t in _tensors(args) if self._tainted(t)] + \
            [t for t in _tensors(list(kwargs.values())) if self._tainted(t)]
        if tensors:
            self.zmode.matched = True
        if not tensors or self.rules["attention"] == "gradient":
            out = func(*args, **kwargs)
            if tensors:
                self._mark(out)
            return out
        if which == "sdpa":
            v = _call_args(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
                           args, kwargs)
            if v.get("enable_gqa"):
                self._raise(func, UnsupportedActivationError(
                    "F.scaled_dot_product_attention with enable_gqa=True has no attention rule in fisnet yet"))
                return func(*args, **kwargs)
            out, _ = self._sdpa(v["query"], v["key"], v["value"], v.get("attn_mask"), float(v.get("dropout_p", 0.0)),
                                bool(v.get("is_causal", False)), v.get("scale"))
            self._mark(out)
            return out
        return self._mha(func, args, kwargs)

    # -- attention written by hand: softmax(q kᵀ·scale + mask) v --------------------------------
    def _handwritten_attention(self, func, args, kwargs):
        """The attention rule (kind "attention") for attention written by hand.  A product of two
        input-dependent tensors (matmul/bmm) is taken as attention scores q kᵀ; scores may pass
        through linear ops with constants (a scale, a mask) and must end in a softmax, whose output A
        is the attention weights; A's product with the values is the attention output.  "cp": A is
        held in heatmap backwards (q and k get nothing, v gets Aᵀ G); "attnlrp": the uniform rule at
        both products (each operand's heatmap gradient halved: q, k 1/4 and v 1/2 in all, as
        `_sdpa`).  Any other use of the scores is refused.  Returns NotImplemented when the call is
        none of these (the ordinary path)."""
        tainted = [t for t in _tensors(args) if self._tainted(t)]
        tainted += [t for t in _tensors(list(kwargs.values())) if self._tainted(t)]
        scores = [t for t in tainted if self._in(self._scores, t)]
        rule = self.rules["attention"]
        if scores and func in SOFTMAX_FUNCS and len(tainted) == 1:
            self.zmode.matched = True
            a = func(*args, **kwargs)
            if rule == "cp":
                a = self._hold(a)
            self._mark(a)
            self._weights[id(a)] = weakref.ref(a)
            return a
        one_linear = len(tainted) == 1 and (func in optable.LINEAR or func in optable.PRODUCTS or (
            func in optable.DIVISIONS and not self._tainted(args[1] if len(args) > 1 else kwargs.get("other"))))
        if scores:
            if not one_linear or func in MATMUL_FUNCS:
                self._refuse(func, "a product of two input-dependent tensors (q @ kᵀ) " + _SCORES_HOW)
                return func(*args, **kwargs)
            out = func(*args, **kwargs)
            self._mark(out)
            for o in _tensors(out):
                self._scores[id(o)] = weakref.ref(o)
            return out
        if one_linear and func not in MATMUL_FUNCS and self._in(self._weights, tainted[0]):
            out = func(*args, **kwargs)  # a view, copy or dropout of A is still A (held under cp)
            self._mark(out)
            for o in _tensors(out):
                if o.is_floating_point():
                    self._weights[id(o)] = weakref.ref(o)
            return out
        if func not in MATMUL_FUNCS or len(tainted) != 2 or len(args) < 2 or kwargs:
            return NotImplemented
        x, y = args[0], args[1]
        if rule == "gradient":
            return NotImplemented  # refused as a product, as without a rule
        self.zmode.matched = True
        # A v (or v A) when an operand is attention weights, else the scores q kᵀ
        weights = [t for t in (x, y) if self._in(self._weights, t)]
        if rule == "attnlrp":  # the uniform rule at either product
            x = _HeatmapScale.apply(x, 0.5, self.switches)
            y = _HeatmapScale.apply(y, 0.5, self.switches)
        if rule == "cp" and len(weights) == 1 and self.zswitch is not None:
            w = weights[0]
            other = y if w is x else x
            f = (lambda t: func(w, t)) if w is x else (lambda t: func(t, w))
            # the z⁺ pass: linear in the values with A ≥ 0 held, as at average pooling
            out = self._zplus_split(f, other) if bool((other < 0).any()) else f(other)
        else:
            out = func(x, y)
        self._mark(out)
        if not weights:
            self._scores[id(out)] = weakref.ref(out)
        return out

    def _mha(self, func, args, kwargs):
        """F.multi_head_attention_forward (nn.MultiheadAttention's slow path, which the trace always
        takes: its inputs require grad) with the attention rule; common options only."""
        names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
                 "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
                 "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
                 "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
        v = _call_args(names, args, kwargs)
        unsupported = [n for n in ("bias_k", "bias_v", "static_k", "static_v") if v.get(n) is not None]
        if v.get("add_zero_attn"):
            unsupported.append("add_zero_attn")
        if unsupported:
            self._raise(func, UnsupportedActivationError(
                f"nn.MultiheadAttention with {', '.join(unsupported)} has no attention rule in fisnet yet"))
            return func(*args, **kwargs)
        q, k, val = v["query"], v["key"], v["value"]
        batched = q.dim() == 3
        if not batched:
            q, k, val = q.unsqueeze(1), k.unsqueeze(1), val.unsqueeze(1)
        L, N, E = q.shape
        S = k.shape[0]
        H = int(v["num_heads"])
        if v.get("use_separate_proj_weight"):
            wq, wk, wv = v["q_proj_weight"], v["k_proj_weight"], v["v_proj_weight"]
        else:
            wq, wk, wv = v["in_proj_weight"].chunk(3)
        b = v.get("in_proj_bias")
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        lin = self._linear
        qp, kp, vp = lin(q, wq, bq), lin(k, wk, bk), lin(val, wv, bv)

        def heads(t, n):  # (n, N, E) -> (N, H, n, E/H)
            return t.reshape(n, N, H, E // H).permute(1, 2, 0, 3)

        mask = v.get("attn_mask")
        if mask is not None:
            if mask.dtype != torch.bool:
                mask = mask.to(qp.dtype)
            mask = mask.reshape(1, 1, L, S) if mask.dim() == 2 else mask.reshape(N, H, L, S)
        kpm = v.get("key_padding_mask")
        if kpm is not None:
            kpm = kpm.reshape(N, 1, 1, S)
            add = torch.zeros_like(kpm, dtype=qp.dtype).masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool \
                else kpm.to(qp.dtype)
            if mask is None:
                mask = add
            elif mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=qp.dtype).masked_fill(~mask, float("-inf")) + add
            else:
                mask = mask + add
        out, a = self._sdpa(heads(qp, L), heads(kp, S), heads(vp, S), mask, float(v.get("dropout_p", 0.0)),
                            bool(v.get("is_causal", False)) and mask is None, None, bool(v.get("training", True)))
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = lin(out, v["out_proj_weight"], v.get("out_proj_bias"))
        weights = None
        if v.get("need_weights", True):
            weights = a.mean(1) if v.get("average_attn_weights", True) else a
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(1)
        self._mark(out)
        return out, weights

    def _linear(self, a, w, b):
        """F.linear inside a rule's own computation (nn.MultiheadAttention's projections), with the
        z⁺ tap a traced F.linear gets in a Dual trace."""
        out = F.linear(a, w, b)
        return self._tap(F.linear, (a, w, b), {}, out) if self.zswitch is not None else out

    def _gate(self, func, args, kwargs):
        """sigmoid / hardsigmoid: computed as usual; an input-dependent result is a gate, allowed
        only as a factor of a product (kind "gate")."""
        x = args[0] if args else kwargs["input"]
        y = func(*args, **kwargs)
        if self._tainted(x):
            self._mark(y)
            self._gates[id(y)] = weakref.ref(y)
        return y

    def _is_gate(self, t) -> bool:
        return self._in(self._gates, t)

    def _hold_gates(self, args):
        """signal × gate: the gate held constant in heatmap backwards (the "constant_gate" rule)."""
        args = list(args)
        gates = [i for i, a in enumerate(args[:2]) if self._is_gate(a)]
        others = [i for i, a in enumerate(args[:2]) if i not in gates and self._tainted(a)]
        if len(gates) == 1 and len(others) == 1:
            args[gates[0]] = _HeatmapBlock.apply(args[gates[0]], self.switches, True)
            self.n_act += 1
        return tuple(args)

    def _tap_use(self, func, args, kwargs) -> None:
        """Copy-on-write for the z⁺ records' outputs (`LayerRecord.value`): before an in-place op changes a
        tapped output that is still as computed, keep a copy of it — except for an in-place ReLU whose
        output can stand in for it (the stage's final output, read by nothing else before, not a
        residual summand): then `_relu` notes the version it makes.  Any other use marks the output
        as read."""
        name = getattr(func, "__name__", "")
        if name in ("__get__", "size", "dim", "__len__"):
            return
        first = args[0] if args else kwargs.get("input")
        for t in list(_tensors(args)) + list(_tensors(list(kwargs.values()))):
            entry = self._ztapped.get(id(t))
            if entry is None or entry[0]() is not t:
                continue
            _, rec, stage = entry
            if t._version != (rec.tap_version if stage == "conv" else rec.bn_tap_version) or \
                    getattr(rec, f"{stage}_copy") is not None:
                continue  # already changed (and kept, or its ReLU noted) or copied
            if t is first and _is_inplace(func, args, kwargs):
                if (func in INPLACE_RELU_FUNCS or func is F.relu) and stage not in rec.read and not rec.branch \
                        and (stage == "bn" or rec.bn is None) and self.rules["activation"] != "gradient":
                    self._pending_relu = (t, rec, stage)
                else:  # the value as computed, with its graph (the z⁺ rule is trained through it)
                    setattr(rec, f"{stage}_copy", t.clone())
            else:
                rec.read.add(stage)

    def _before_inplace(self, func, args, kwargs) -> None:
        """Keep the value and autograd edge of an LDS output before an op modifies it in place."""
        t = args[0]
        e = self.watch.get(id(t))
        if e is None or e.tensor is not t or e.pre is not None:
            return
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or func in INPLACE_RELU_FUNCS \
                or (func is F.relu and bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))):
            e.pre = t.clone()
            e.edge = torch.autograd.graph.get_gradient_edge(t)

    def _check(self, func, args, kwargs, out) -> None:
        """Follow input dependence, and refuse a non-linear function without a rule (fisnet.optable)."""
        tainted = [t for t in _tensors(args) if self._tainted(t)]
        tainted += [t for t in _tensors(list(kwargs.values())) if self._tainted(t)]
        if not tainted:
            return
        outs = [o for o in _tensors(out) if o.is_floating_point() and o.requires_grad]
        if not outs:
            return  # indices, shapes, booleans, detached values: no relevance flows through them
        if self._gates and any(self._is_gate(t) for t in tainted):
            if func in optable.PRODUCTS and len(tainted) == 2 and sum(map(self._is_gate, tainted)) == 1:
                return self._mark(out)  # a gate under the "gradient" rule: the plain product
            if func in optable.LINEAR and len(tainted) == 1 and getattr(func, "__name__", "") not in (
                    "add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "sum", "mean"):
                for o in outs:  # a view or copy of a gate is still a gate (e.g. scale.view(B, C, 1, 1))
                    self._gates[id(o)] = weakref.ref(o)
                return self._mark(out)
            return self._refuse(func, "a sigmoid/hardsigmoid output is supported only as a multiplicative gate "
                                      "(signal × gate); used any other way it has no rule (the identity rule "
                                      "diverges at 0 for sigmoid)")
        if func in optable.LINEAR or getattr(func, "__name__", "") == "__get__":
            return self._mark(out)
        if func in optable.RULES:
            other = args[1] if len(args) > 1 else kwargs.get("other")
            if func in optable.REDUCTIONS and isinstance(other, torch.Tensor):
                self._refuse(func, "an element-wise maximum of two tensors is not pooling")
            return self._mark(out)
        if func in optable.PRODUCTS:
            if len(tainted) >= 2:
                self._refuse(func, "a product of two input-dependent tensors (a gate, attention) has no rule yet")
            return self._mark(out)
        if func in optable.DIVISIONS:
            divisor = args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(divisor, torch.Tensor) and self._tainted(divisor):
                self._refuse(func, "a division by an input-dependent tensor has no rule")
            return self._mark(out)
        if func in optable.NO_RULE:
            self._refuse(func, optable.hint(optable.func_name(func)))
        self._raise(func, UnsupportedActivationError(
            f"the model's forward calls {optable.func_name(func)} on an input-dependent tensor, and fisnet's op "
            "table (fisnet.optable, docs/method.md) does not list it, so fisnet cannot tell whether it is linear. "
            "If it is linear in its tensor inputs, declare it with fisnet.register_linear(func) before explaining; "
            "otherwise rewrite the model without it."))

    def _refuse(self, func, why: str):
        err = UnsupportedActivationError(
            f"the model's forward calls {optable.func_name(func)}: it is non-linear and fisnet has no LRP rule for "
            f"it ({why}). Refused rather than treated as linear (docs/method.md lists the op table).")
        self._raise(func, err)

    def _raise(self, func, err):
        # Python turns a TypeError raised inside a binary operator (x * y, dispatched here as
        # Tensor.mul) into NotImplemented: keep the first refusal and raise it after the forward
        if self.pending is None:
            self.pending = err

    def _tap(self, func, args, kwargs, out):
        if func in CONV_FUNCS:
            vals = _call_args(_CONV_ARGS, args, kwargs)
            rec = LayerRecord(_make_layer(CONV_FUNCS[func], vals), vals["input"], mode=self.zmode)
            # decides the z⁺ form: known for a ReLU's output (and its pooling), else one pass over the input
            rec.signed = not self._known_nonneg(vals["input"]) and bool((vals["input"] < 0).any())
            self.records.append(rec)
            tapped = ZPlusTap.apply(out, vals["input"], rec, "conv", self.zswitch, self.eps)
            # weak references: a tensor → record → tensor cycle through autograd nodes is never freed
            tapped._fisnet_tap = weakref.ref(rec)
            tapped._fisnet_branch = weakref.ref(rec)
            rec.tapped, rec.tap_version = tapped, tapped._version
            self._ztapped[id(tapped)] = (weakref.ref(tapped), rec, "conv")
            return tapped
        if func is F.batch_norm and self.records:
            x = args[0] if args else kwargs["input"]
            rec = self.records[-1]
            if _deref(getattr(x, "_fisnet_tap", None)) is rec and rec.bn is None:
                rec.bn = {**_call_args(_BN_ARGS, args, kwargs), **self._bn_stats}
                out = ZPlusTap.apply(out, rec.input, rec, "bn", self.zswitch, self.eps)
                rec.bn_tapped, rec.bn_tap_version = out, out._version
                out._fisnet_branch = weakref.ref(rec)
                self._ztapped[id(out)] = (weakref.ref(out), rec, "bn")
                return out
        return out

    def _residual(self, func, args, kwargs):
        """u + v with u the (BatchNorm) output of a conv: the z⁺ pass treats the sum as one layer
        (ZPlusSum).  None when the call is not such a sum."""
        if len(args) != 2 or kwargs.get("alpha", 1) != 1 or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        u, v = args
        ru, rv = self._branch(u), self._branch(v)
        inplace = func in (_T.add_, _T.__iadd__)
        if not inplace and self._tainted(u) != self._tainted(v) and u.dtype == v.dtype:
            return self._zplus_bias_add(u, v)
        if u.shape != v.shape or u.dtype != v.dtype:
            return None
        if ru is None and rv is None and not (self._tainted(u) and self._tainted(v)):
            return None  # (two input-dependent summands, neither a conv/BatchNorm output, are a z⁺ layer too)
        if inplace and ru is None:  # u += v with u not a branch: the sum needs u's value before it
            u_before = u.clone()
            a_v = rv.input if rv is not None else v
            out = ZPlusSum.apply(u_before, v, u_before, a_v, (None, rv), self.zswitch, self.eps, False, self.zmode)
            return u.copy_(out)
        a_u = ru.input if ru is not None else u
        a_v = rv.input if rv is not None else v
        for r in (ru, rv):
            if r is not None:
                r.branch = True  # its value, not a later ReLU's output, is what the sum's z⁺ rule needs
        return ZPlusSum.apply(u, v, a_u, a_v, (ru, rv), self.zswitch, self.eps, inplace, self.zmode)

    def _zplus_bias_add(self, u, v):
        """t + b, t input-dependent and b not (a bias such as a position embedding, maybe broadcast):
        the z⁺ pass is sign-matched, z⁺ = t⁺ + b⁺ for outputs ≥ 0, z⁻ = t⁻ + b⁻ for outputs < 0 (the
        bias absorbs its share); the ordinary and LRP-ε backwards are the sum's own.  None when b
        does not broadcast to t."""
        t, b = (u, v) if self._tainted(u) else (v, u)
        try:
            if torch.broadcast_shapes(t.shape, b.shape) != t.shape:
                return None
        except RuntimeError:
            return None
        bp, bn = b.clamp(min=0), b.clamp(max=0)
        self.zmode.matched = True  # a bias of either sign: outputs of either sign
        return self._zplus_split((lambda a: a + b) if t is u else (lambda a: b + a), t,
                                 zp_of=lambda a: a.clamp(min=0) + bp, zn_of=lambda a: a.clamp(max=0) + bn)

    @staticmethod
    def _branch(t):
        """The record of the conv whose output (after its BatchNorm, if any) `t` is, unmodified
        (an in-place ReLU keeps the tensor object but makes it another value)."""
        rec = _deref(getattr(t, "_fisnet_branch", None))
        if rec is None:
            return None
        if t is rec.bn_tapped:
            return rec if t._version == rec.bn_tap_version else None
        if t is rec.tapped and rec.bn is None:  # (with a BatchNorm, the branch ends at the BatchNorm)
            return rec if t._version == rec.tap_version else None
        return None

@dataclass
class LRPTrace:
    """One forward pass of a model under LRP-Flex.  `logits` is the model's output."""

    logits: torch.Tensor
    x: torch.Tensor
    switch: fisnet_ext.HeatmapSwitch
    eps: float
    zb: bool
    bounds: object
    layer_outputs: Dict[str, _LDSEntry] = field(default_factory=dict)
    zb_layers: List[_ZbLayer] = field(default_factory=list)
    x_in: Optional[torch.Tensor] = None  # the tensor the model read (the map's "x ⊙ G" term is taken there)
    zswitch: Optional[fisnet_ext.HeatmapSwitch] = None
    act_bytes: int = 0
    records: list = field(default_factory=list)  # the z⁺ layer records (autograd nodes hold them weakly)

    def seed_chunk(self, M: int) -> Optional[int]:
        """How many of M seeds one batched backward takes at a time: all on GPUs; on CPU as many
        as keep the largest activation of a chunk (chunk x batch x per-image bytes) within
        CPU_SEED_CHUNK_BYTES (cache and allocator friendly: measured in docs/status.md)."""
        if self.x.device.type != "cpu" or not self.act_bytes:
            return None
        per_seed = self.x.shape[0] * self.act_bytes
        chunk = max(1, CPU_SEED_CHUNK_BYTES // per_seed)
        return None if chunk >= M else int(chunk)

    def relevance_zplus(self, create_graph: bool = False, retain_graph: Optional[bool] = None):
        """The LRP-z⁺ map of the summed positive-weight logits (trace with zplus=True); (B, 1, ...)."""
        if self.zswitch is None:
            raise RuntimeError("this trace was made without zplus=True; the z⁺ map needs it")
        q = self.logits.sum(1, keepdim=True)
        with self.zswitch, self.switch.slot1_only():  # activations: the ε-free identity rule (ReLU: plain)
            return self._relevance(q, create_graph, retain_graph, lrp_switch=False)

    def relevance_dual(self, create_graph: bool = False):
        """Both Dual ISNet maps, (B, 2, ...) per tensor, from ONE backward over two rule slots:
        slot 0 the LRP-ε map of Σ_k z_k, slot 1 the z⁺ map (trace with zplus=True).  Equal to
        `relevance(logits.sum(1, keepdim=True))` next to `relevance_zplus()`."""
        if self.zswitch is None:
            raise RuntimeError("this trace was made without zplus=True; the Dual maps need it")
        q = self.logits.sum(1, keepdim=True)
        seeds = torch.ones((2,) + tuple(q.shape), dtype=q.dtype, device=q.device)
        targets = self._targets()
        with torch.enable_grad(), self.switch.two_slots(), self.zswitch.two_slots():
            grads = _batched_grad(q, [t[1] for t in targets], create_graph, seeds)
        return self._finish(targets, [g.transpose(0, 1) for g in grads], q.shape[0], 2, zplus_slots=(1,))

    def _targets(self):
        """(name, where the gradient is taken, the value it multiplies) for each map."""
        out = []
        if self.zb:
            for i, rec in enumerate(self.zb_layers):
                out.append((f"__zb{i}__", rec.target, rec.target))
            out.append(("__x__", self.x_in, self.x_in))  # every other use of the input: x ⊙ G
        else:
            out.append(("input", self.x_in, self.x_in))
        for name, e in self.layer_outputs.items():
            if e.pre is not None:  # modified in place later: the tensor the layer returned
                out.append((name, e.edge, e.pre))
            else:
                out.append((name, e.tensor, e.tensor))
            rec = _deref(getattr(e.tensor, "_fisnet_tap", None))
            if self.zswitch is not None and rec is not None and rec.bn_tapped is not None:
                # z⁺: a conv followed by BatchNorm is one folded layer; its relevance is that of
                # the folded layer's outputs (the BatchNorm output)
                out.append((f"__zp__{name}", rec.bn_tapped, rec.bn_tapped))
        return out

    def _finish(self, targets, grads, B: int, M: int, zplus_slots=()):
        """Relevance a ⊙ G at each target (z⁺ substitutes in the z⁺ slots); the Zb rule for the input."""
        out = {}
        for (name, _, a), g in zip(targets, grads):
            if g is None:  # the explained quantity does not depend on this tensor
                out[name] = None
                continue
            out[name] = a.unsqueeze(1) * g
        for name in list(out):
            if name.startswith("__zp__"):
                zp = out.pop(name)
                base = name[len("__zp__"):]
                if zp is not None and zplus_slots:
                    eps_map = out[base]
                    if eps_map is None:
                        eps_map = torch.zeros_like(zp)
                    parts = [zp[:, m:m + 1] if m in zplus_slots else eps_map[:, m:m + 1] for m in range(M)]
                    out[base] = parts[0] if M == 1 else torch.cat(parts, dim=1)
        if self.zb:
            r = out.pop("__x__")
            for i, rec in enumerate(self.zb_layers):
                if out.get(f"__zb{i}__") is None:
                    out.pop(f"__zb{i}__", None)
                    continue
                zb = self._zb(rec, out, f"__zb{i}__")  # pops R_out: no reference left here
                r = zb if r is None else r + zb
            out["input"] = r
        for name, _, a in targets:
            if name in out and out[name] is None:
                out[name] = torch.zeros((B, M) + tuple(a.shape[1:]), dtype=a.dtype, device=a.device)
        if out.get("input") is None:
            out["input"] = torch.zeros((B, M) + tuple(self.x.shape[1:]), dtype=self.x.dtype, device=self.x.device)
        return {"input": out.pop("input"), **out}

    def relevance(self, q: torch.Tensor, create_graph: bool = False, retain_graph: Optional[bool] = None):
        """Heatmaps of the per-image quantities `q` (B, M): map m explains q[:, m].

        Returns a dict {"input": (B, M, *x.shape[1:]), layer name: (B, M, *a.shape[1:])}.
        The M maps come from one backward call (batched over M when M > 1)."""
        return self._relevance(q, create_graph, retain_graph, lrp_switch=True)

    def _relevance(self, q, create_graph, retain_graph, lrp_switch):
        if q.dim() != 2 or q.shape[0] != self.x.shape[0]:
            raise ValueError(f"quantities to explain must have shape (B, M) with B = {self.x.shape[0]}, "
                             f"got {tuple(q.shape)}")
        B, M = q.shape
        targets = self._targets()
        wrt = [t[1] for t in targets]
        zp = () if lrp_switch else tuple(range(M))
        if retain_graph is None:
            retain_graph = True
        with torch.enable_grad(), (self.switch if lrp_switch else contextlib.nullcontext()):
            if M == 1:
                grads = torch.autograd.grad(q.sum(), wrt, create_graph=create_graph, retain_graph=retain_graph,
                                            allow_unused=True)
                grads = [None if g is None else g.unsqueeze(1) for g in grads]
            else:
                # seeds in chunks (one chunk on GPUs), each to its maps (Zb included), then joined
                chunk = self.seed_chunk(M) or M
                eye = torch.eye(M, dtype=q.dtype, device=q.device)
                parts = []
                for c0 in range(0, M, chunk):
                    seeds = eye[c0:c0 + chunk].unsqueeze(1).expand(-1, B, M)
                    g = [g.transpose(0, 1) for g in _batched_grad(q, wrt, create_graph, seeds)]
                    S = seeds.shape[0]
                    parts.append(self._finish(targets, g, B, S, tuple(range(S)) if zp else ()))
                return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
        return self._finish(targets, grads, B, M, zp)

    def _zb(self, rec: _ZbLayer, out: dict, key: str) -> torch.Tensor:
        """The Zb rule from R_out (popped from `out[key]`) at `rec`'s output to the input it read
        (mapped back through F.pad).  Zb's `z_full` is chosen in `_zb_ratio`; R_out and a recomputed
        z_full live only there: gone before the transposed convolution runs (at ResNet-18's 64-channel
        first layer they are the step's largest tensors)."""
        a = rec.input
        x = self.x
        low, high, low_b, high_b = bound_images(self.bounds, x)
        shape1 = (1,) + tuple(x.shape[1:])
        low, high = low.expand(shape1), high.expand(shape1)
        if rec.pad is not None:  # the layer read F.pad(x): pad the bound images alike
            pad, mode, value = rec.pad
            low = F.pad(low, pad, mode=mode, value=value) if mode == "constant" else F.pad(low, pad, mode=mode)
            high = F.pad(high, pad, mode=mode, value=value) if mode == "constant" else F.pad(high, pad, mode=mode)
        elif a.shape != x.shape:  # e.g. flattened input of a linear first layer
            low = low.reshape((1,) + tuple(a.shape[1:]))
            high = high.reshape((1,) + tuple(a.shape[1:]))
        layer, s, kept, BM = self._zb_ratio(rec, out, key, low, high, low_b, high_b)
        r = zb_transpose(layer, a, s, kept, BM)
        B, M = r.shape[:2]
        if rec.pad is not None:  # relevance of the padded copies goes back to the pixels they copy
            r = _pad_adjoint(r.reshape((B * M,) + tuple(a.shape[1:])), rec.pad, (B * M,) + tuple(x.shape[1:]))
        return r.reshape((B, M) + tuple(x.shape[1:]))

    def _zb_ratio(self, rec: _ZbLayer, out: dict, key: str, low, high, low_b, high_b):
        """(folded layer, s, kept, (B, M)) of `zb_ratio` for `rec`, with R_out popped from `out`.
        `z_full` is the layer's output as the forward computed it (one convolution saved), or the
        in-place ReLU's output that overwrote it (below), or else recomputed from the conv output in
        one element-wise pass (`fold_batchnorm_for_zb`; a convolution without BatchNorm)."""
        y = rec.relu_output
        # An in-place ReLU overwrote z (the layer / BatchNorm output) with y = max(z, 0).  Where the
        # ReLU is off, R_out = y·G = 0, so s = R_out / z_s = 0 whatever z is there, and so are the
        # derivatives through z_s (−R_out/z_s²) and, behind the ReLU's 0 derivative, through y: y
        # stands in for z exactly, with ε > 0 (with ε = 0, z_s = 0 − c could be 0/0 where z_s = z − c
        # was not).  No recomputation of z then (a full-size pass and its backward; a convolution
        # without BatchNorm).
        relu_stands_in = (y is not None and rec.relu_version is not None and y._version == rec.relu_version
                          and self.eps > 0)
        if rec.bn is None:
            layer = rec.layer
            z_full = rec.output if rec.output._version == rec.version else (y if relu_stands_in else None)
        elif rec.bn_output._version == rec.version:
            layer, z_full = fold_batchnorm_as_used(rec.layer, rec.bn, rec.output), rec.bn_output
        elif relu_stands_in:
            layer, z_full = fold_batchnorm_as_used(rec.layer, rec.bn, rec.output), y
        else:
            layer, z_full = fold_batchnorm_for_zb(rec.layer, rec.bn, rec.output)
        r_out = out.pop(key)
        if r_out.dim() == rec.input.dim():  # only when a layer is followed by nothing that keeps its shape
            r_out = r_out.unsqueeze(1)
        s, kept = zb_ratio(layer, rec.input, r_out, low, high, low_b, high_b, self.eps, z_full=z_full)
        return layer, s, kept, tuple(r_out.shape[:2])


def _pad_adjoint(r: torch.Tensor, pad_spec, shape) -> torch.Tensor:
    """The transpose of F.pad(·, pad, mode) applied to `r` (differentiable in r)."""
    pad, mode, value = pad_spec
    with torch.enable_grad():
        probe = torch.zeros(shape, dtype=r.dtype, device=r.device, requires_grad=True)
        padded = F.pad(probe, pad, mode=mode, value=value) if mode == "constant" else F.pad(probe, pad, mode=mode)
        return torch.autograd.grad(padded, probe, r, create_graph=True)[0]


def _batched_grad(q: torch.Tensor, wrt: List[torch.Tensor], create_graph: bool,
                  seeds: torch.Tensor) -> List[torch.Tensor]:
    """Gradients of q (B, M) at `wrt` for the S cotangents `seeds` (S, B, M) (e.g. one-hot
    columns), in one backward; each result has a leading seed axis.

    The backward runs under `torch.func.vmap`, whose batching rules fold the seed axis into the
    batch of every op (convolution and BatchNorm backward included), so with create_graph=True the
    recorded second-order graph is batched too.  `is_grads_batched=True` (the legacy vmap) falls
    back to per-seed calls for those ops and records a per-seed graph (measured 1.6x slower than
    a loop over seeds); it is kept only as a fallback for torch builds without torch.func."""
    def one(seed):
        return torch.autograd.grad(q, wrt, seed, create_graph=create_graph, retain_graph=True,
                                   materialize_grads=True)

    if hasattr(torch, "func"):
        return list(torch.func.vmap(one)(seeds))
    return list(torch.autograd.grad(q, wrt, seeds, create_graph=create_graph, retain_graph=True,
                                    is_grads_batched=True, materialize_grads=True))


def _find_module(model: nn.Module, name: str) -> nn.Module:
    mods = dict(model.named_modules())
    if name not in mods:
        near = [n for n in mods if n and (name in n or n in name)][:8]
        raise KeyError(f"the model has no module named {name!r}" + (f"; similar names: {near}" if near else "")
                       + "; see [n for n, _ in model.named_modules()] for all names")
    return mods[name]


@contextlib.contextmanager
def _capture_outputs(model: nn.Module, names: Sequence[str], store: Dict[str, "_LDSEntry"], mode: "_Interceptor"):
    """Forward hooks that record each named module's output (removed on exit).  The trace watches
    these tensors: an op that later modifies one in place makes it keep the returned value."""
    handles = []
    try:
        for name in names:
            mod = _find_module(model, name)

            def hook(_m, _inp, out, _name=name):
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"LDS layer {_name!r} returns {type(out).__name__}, not a tensor")
                e = _LDSEntry(out, out._version)
                store[_name] = e
                mode.watch[id(out)] = e

            handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _normalise(x, dims, eps: float, centre: bool, hold):
    """(x − mean) / σ over `dims` (no centring for RMSNorm), σ = sqrt(mean square + eps) passed
    through `hold` (held constant in heatmap backwards)."""
    if centre:
        x = x - x.mean(dims, keepdim=True)
    return x / hold(torch.sqrt(x.square().mean(dims, keepdim=True) + eps))


def _affine(y, weight, bias, ndim):
    """y·w + b; per trailing element (LayerNorm, ndim None) or per channel (axis 1)."""
    shape = None if ndim is None else (1, -1) + (1,) * (ndim - 2)
    if weight is not None:
        y = y * (weight if shape is None else weight.reshape(shape))
    if bias is not None:
        y = y + (bias if shape is None else bias.reshape(shape))
    return y


class _HeatmapScale(torch.autograd.Function):
    """Identity; its backward scales the gradient by `c` while a heatmap switch is on."""

    @staticmethod
    def forward(ctx, t, c, switches):
        ctx.c, ctx.switches = c, switches
        ctx.set_materialize_grads(False)
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None
        if any(s.active for s in ctx.switches):
            return g * ctx.c, None, None
        return g, None, None


class _ZPlusSelect(torch.autograd.Function):
    """Identity.  In the z⁺ pass the gradient is kept where the input is positive (`positive`) or
    negative (not `positive`); in the Dual two-slot pass slot 0 (the LRP-ε pass) passes unchanged
    on the positive path.  Elsewhere the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, a, zswitch, positive):
        ctx.zswitch, ctx.positive = zswitch, positive
        ctx.save_for_backward(a)
        ctx.set_materialize_grads(False)
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g):
        sw = ctx.zswitch
        if g is None or not sw.active:
            return g, None, None
        (a,) = ctx.saved_tensors
        keep = ((a > 0) if ctx.positive else (a < 0)).to(g.dtype)
        if sw.dual and ctx.positive:
            return fisnet_ext.slot_mask(g, 0) + fisnet_ext.slot_mask(g * keep, 1), None, None
        return g * keep, None, None


class _ZPlusSplit(torch.autograd.Function):
    """y (= y1 = y2 in value) of a linear op with non-negative coefficients (`_zplus_split`): the
    ordinary and LRP-ε gradient goes to y1; in the z⁺ pass s⁺ = R/(z⁺+ε) on y ≥ 0 goes to y1 (the
    positive inputs' graph) and s⁻ = R/(z⁻−ε) on y < 0 to y2 (the negative inputs').  z± are
    constants of the rule that stay functions of the weights in the double backward."""

    @staticmethod
    def forward(ctx, y1, y2, zp, zn, zswitch, eps):
        ctx.zswitch, ctx.eps = zswitch, eps
        ctx.save_for_backward(y1, zp, zn)
        ctx.set_materialize_grads(False)
        return y1.clone()  # not a view: the model may change it in place (an in-place dropout)

    @staticmethod
    def backward(ctx, g):
        sw = ctx.zswitch
        none = (None,) * 4
        if g is None or not sw.active:
            return (g, None) + none
        y, zp, zn = ctx.saved_tensors
        g_zp = fisnet_ext.slot_mask(g, 1) if sw.dual else g
        sp, sn = signed_ratios(g_zp, y, zp, zn, ctx.eps)
        return ((fisnet_ext.slot_mask(g, 0) + sp) if sw.dual else sp), sn, None, None, None, None


class _ZPlusElementwise(torch.autograd.Function):
    """y = f(x) element-wise in shape (a norm): `y` unchanged in the forward.  In the z⁺ pass
    relevance passes element by element, R_x = R_y · x/(x + ε·sign x), i.e.
    G_x = G_y ⊙ y / (x + ε·sign x) (sign 0 := +1) and nothing through f's own backward: the
    centring of a norm has no sign-preserving form, and this keeps the z⁺ map ≥ 0 and conserved
    as ε → 0.  Outside the z⁺ pass (the ordinary and the LRP-ε backward) the gradient goes to y.
    In the Dual ISNet's two-slot pass slot 0 is the LRP-ε pass, slot 1 the z⁺ pass."""

    @staticmethod
    def forward(ctx, x, y, zswitch, eps):
        ctx.zswitch, ctx.eps = zswitch, eps
        ctx.save_for_backward(x, y)
        ctx.set_materialize_grads(False)
        return y.clone()  # not a view: the model may change it in place

    @staticmethod
    def backward(ctx, g):
        sw = ctx.zswitch
        if g is None or not sw.active:
            return None, g, None, None
        x, y = ctx.saved_tensors
        den = x + ctx.eps * torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
        g_zp = fisnet_ext.slot_mask(g, 1) if sw.dual else g
        g_x = g_zp * (y / den)
        return g_x, (fisnet_ext.slot_mask(g, 0) if sw.dual else None), None, None


class _HeatmapBlock(torch.autograd.Function):
    """Identity; its backward passes the ordinary gradient and blocks heatmap backwards (None, or
    with `zero` a zero of the gradient's shape).

    `zero` for gates (the "constant_gate" rule): it keeps the gate branch's backward running on a
    gradient of the heatmap's own (slot-batched) shape, where `None` would let PyTorch hand the ops
    of the branch (the squeeze-excitation's SiLU/ReLU) a materialised zero without the rule-slot
    dimension of the Dual ISNet's two-slot pass. The branch is tiny (a pooled vector)."""

    @staticmethod
    def forward(ctx, t, switches, zero=False):
        ctx.switches, ctx.zero = switches, zero
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        if any(s.active for s in ctx.switches):
            return (torch.zeros_like(g) if ctx.zero else None), None, None
        return g, None, None


def trace(model: nn.Module, x: torch.Tensor, *, eps: float = 1e-2, zb: bool = True, bounds=(0.0, 1.0),
          layers: Optional[Sequence[str]] = None, zb_layer: Optional[str] = None,
          backend: Optional[str] = None, zplus: bool = False, rules=None) -> LRPTrace:
    """Run `model(x)` once under LRP-Flex; see `LRPTrace.relevance` for the heatmaps.  `rules`
    overrides entries of the rule table (fisnet.rules.DEFAULT_RULES), e.g. {"norm": "gradient"}."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point image tensor, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have a batch axis: (B, C, H, W) for images, got shape {tuple(x.shape)}")
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_activations(model)
    layers = list(layers or [])
    first_weight = None
    if zb and zb_layer is not None:
        mod = _find_module(model, zb_layer)
        first_weight = getattr(mod, "weight", None)
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or first_weight is None:
            raise TypeError(f"zb_layer {zb_layer!r} is {type(mod).__name__}; it must be a Conv or Linear module")
    switch = fisnet_ext.HeatmapSwitch()
    zswitch = fisnet_ext.HeatmapSwitch() if zplus else None
    params = list(model.parameters())
    frozen = not params or not all(p.requires_grad for p in params)
    # the map's x ⊙ G term is taken at the tensor the model reads: the caller's x when it carries
    # a graph of its own (its ordinary gradient then still reaches it), else a fresh leaf
    private = not (x.requires_grad and zb)
    x_in = x.detach().requires_grad_(True) if private else x
    # what a Zb layer reads in place of the input: a tensor whose gradient never reaches the input
    # in a heatmap backward (the Zb rule gives that path's relevance).  When nobody needs the
    # input's ordinary gradient and the weights carry the graph: the detached input (no
    # input-gradient work at all); otherwise a gate that blocks heatmap backwards only.
    switches = tuple(s for s in (switch, zswitch) if s is not None)
    if private and not frozen:
        def reader(t):
            return t.detach()
    else:
        def reader(t):
            return _HeatmapBlock.apply(t, switches)
    outputs: Dict[str, _LDSEntry] = {}
    mode = _Interceptor(eps, switch, backend, x_in, zb, zb_read=reader, first_weight=first_weight, zswitch=zswitch,
                        rules=rules)
    with torch.enable_grad(), _capture_outputs(model, layers, outputs, mode), mode:
        logits = model(x_in)
    if mode.pending is not None:
        raise mode.pending
    if isinstance(logits, torch.Tensor) and mode._in(mode._scores, logits):
        raise UnsupportedActivationError(
            "the model returns a product of two input-dependent tensors (q @ kᵀ): it " + _SCORES_HOW)
    outputs = {name: outputs[name] for name in layers if name in outputs}  # the order asked for
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(logits).__name__}; fisnet expects a logits tensor (B, K)")
    if mode.n_relu == 0 and mode.n_act == 0:
        raise ValueError("the model's forward called no ReLU (nor another activation of the rule table, "
                         "fisnet.rules): LRP-Flex needs a network with activations; ReLUs written as clamp/max are "
                         "not recognised: use F.relu or nn.ReLU")
    if zplus:
        if not mode.records:
            raise ValueError("the z⁺ rule needs conv/linear layers, and the forward called none")
        mode.records[-1].is_logits = True  # the classifier: the last conv/linear of the forward
    missing = [n for n in layers if n not in outputs]
    if missing:
        raise ValueError(f"LDS layers {missing} were not called during the forward pass")
    for name, e in outputs.items():
        if e.pre is None and e.tensor._version != e.version:
            raise ValueError(f"LDS layer {name!r}: its output was modified in place later in the forward by an op "
                             "fisnet could not intercept; name a module whose output is not modified in place "
                             "(e.g. the enclosing block)")
    if zb:
        where = f"layer {zb_layer!r}" if zb_layer else "a conv/linear layer"
        if not mode.zb_layers:
            raise ValueError(f"Zb rule: no conv/linear call read the model input (or a view or F.pad of it)"
                             + (f" through {where}" if zb_layer else "")
                             + "; the Zb rule needs the bounded pixels. If the model transforms the input first "
                             "(e.g. normalises it), move that out of the model and pass per-channel bounds, name "
                             "the layer with zb_layer=..., or pass zb=False")
        for rec in mode.zb_layers:
            if rec.relu_output is not None and rec.other_uses:
                raise ValueError(f"Zb rule: the output of a layer that reads the input goes to a ReLU and also to "
                                 f"{rec.other_uses[0]}; fisnet takes the Zb rule's relevance at that ReLU only. Pass "
                                 "zb=False, or name another first layer with zb_layer=...")
            if rec.relu_output is None and any(u not in optable.LINEAR_NAMES for u in rec.other_uses):
                bad = next(u for u in rec.other_uses if u not in optable.LINEAR_NAMES)
                raise ValueError(f"Zb rule: a layer that reads the input (optionally followed by BatchNorm) is not "
                                 f"followed directly by a ReLU but by {bad}; name the first layer with zb_layer=... "
                                 "or pass zb=False")
            if rec.relu_output is None and rec.neuron._version != rec.version:
                raise ValueError("Zb rule: the output of a layer that reads the input is modified in place later in "
                                 "the forward; write that op out of place, or pass zb=False")
    return LRPTrace(logits=logits, x=x, switch=switch, eps=eps, zb=zb, bounds=bounds, layer_outputs=outputs,
                    zb_layers=mode.zb_layers if zb else [], x_in=x_in, zswitch=zswitch, act_bytes=mode.act_bytes,
                    records=mode.records)


def select_logits(logits: torch.Tensor, target) -> torch.Tensor:
    """The per-image quantities (B, M) that `target` asks to explain."""
    B, K = logits.shape
    if target is None:
        idx = logits.detach().argmax(1)
        return logits.gather(1, idx[:, None])
    if isinstance(target, str):
        if target != "all":
            raise ValueError(f"target must be None, a class index, a LongTensor (B,) or 'all', got {target!r}")
        return logits
    idx = torch.as_tensor(target, device=logits.device)
    if idx.is_floating_point():
        raise TypeError(f"target must hold integer class indices, got dtype {idx.dtype}")
    if idx.dim() == 0:
        idx = idx.expand(B)
    if idx.shape != (B,):
        raise ValueError(f"target must have shape ({B},) (one class per image), got {tuple(idx.shape)}")
    bad = (idx < 0) | (idx >= K)
    if bool(bad.any()):
        raise IndexError(f"target class(es) {idx[bad].tolist()} out of range for a model with {K} classes")
    return logits.gather(1, idx.long()[:, None])


def explain(model: nn.Module, x: torch.Tensor, target=None, *, eps: float = 1e-2, zb: bool = True,
            bounds=(0.0, 1.0), create_graph: bool = False, layers: Optional[Sequence[str]] = None,
            zb_layer: Optional[str] = None, backend: Optional[str] = None, rules=None):
    """LRP-Flex heatmaps of `model` at `x` (docs/spec.md §2).

    target: None → the predicted class (M = 1); int or LongTensor (B,) → those classes (M = 1);
    "all" → every class (M = K), in one batched backward.  Returns a tensor (B, M, C, H, W), or,
    when `layers` names hidden modules (LDS), a dict {"input": ..., name: (B, M, ...)}.
    eps: the LRP-ε stabiliser (0 gives gradient × input).  zb: the Zb rule at the first layer
    with pixel `bounds` (low, high), scalars or per-channel; `zb_layer` names that layer when
    automatic detection fails.  create_graph=True keeps the maps differentiable in the weights.
    The model runs as it is (call model.eval() first for eval-mode BatchNorm) and is not modified.
    rules: overrides of the rule table, {op kind: rule name} (fisnet.rules.DEFAULT_RULES,
    fisnet.rules.describe_rules()).
    """
    with torch.enable_grad():
        t = trace(model, x, eps=eps, zb=zb, bounds=bounds, layers=layers, zb_layer=zb_layer, backend=backend,
                  rules=rules)
        q = select_logits(t.logits, target)
        maps = t.relevance(q, create_graph=create_graph, retain_graph=create_graph)
    if not create_graph:
        maps = {k: v.detach() for k, v in maps.items()}
    return maps if layers else maps["input"]
