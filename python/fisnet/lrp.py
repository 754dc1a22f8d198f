"""LRP-Flex: LRP-ε heatmaps for any ReLU network by one modified backward pass (SPEC §2).

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
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fisnet_ext

from .rules import LinearLayer, bound_images, fold_batchnorm_as_used, zb_relevance
from .traced import _FUNCS as TRACED_CONV_FUNCS, traced_batch_norm, traced_conv
from .zplus import LayerRecord, ZPlusTap

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

UNSUPPORTED_MODULES = tuple(
    getattr(nn, n) for n in ("GELU", "SiLU", "LeakyReLU", "ELU", "SELU", "CELU", "Mish", "Hardswish",
                             "Hardsigmoid", "Hardtanh", "ReLU6", "PReLU", "RReLU", "Softplus", "Tanh",
                             "Sigmoid", "Softsign", "Tanhshrink", "Threshold", "LogSigmoid", "GLU",
                             "Softshrink", "Hardshrink", "Softmax", "LogSoftmax", "Softmax2d",
                             "MultiheadAttention")
    if hasattr(nn, n)
)


def check_activations(model: nn.Module) -> None:
    """Raise `UnsupportedActivationError` naming the first non-ReLU activation module."""
    for name, mod in model.named_modules():
        if isinstance(mod, UNSUPPORTED_MODULES):
            raise UnsupportedActivationError(
                f"module {name or '<root>'!r} is {type(mod).__name__}: LRP-Flex (and so fisnet) supports ReLU "
                f"networks only. Replace it with nn.ReLU"
                + (" or return logits instead of probabilities" if "Softmax" in type(mod).__name__ else "")
                + ", or explain a model without it.")


# ---------------------------------------------------------------------------------------------
@dataclass
class _FirstLayer:
    layer: LinearLayer
    input: torch.Tensor
    output: torch.Tensor
    bn: Optional[dict] = None
    bn_output: Optional[torch.Tensor] = None


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


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
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same" (stride 1)
            k = vals["weight"].shape[2:]
            dil = tup(vals.get("dilation"), 1)
            padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dil, k))
    return LinearLayer(kind, vals["weight"], vals.get("bias"), tup(vals.get("stride"), 1), tup(padding, 0),
                       tup(vals.get("dilation"), 1), int(vals.get("groups", 1) or 1))


class _Interceptor(TorchFunctionMode):
    def __init__(self, eps, switch, backend, record_first, first_weight=None, zswitch=None):
        super().__init__()
        self.zswitch = zswitch  # set for the Dual ISNet: conv/linear outputs get z⁺ taps
        self.records: List[LayerRecord] = []
        self.eps = eps
        self.switch = switch
        self.backend = backend
        self.recording = record_first
        self.first_weight = first_weight  # a Parameter, when the user named the Zb layer
        self.first: Optional[_FirstLayer] = None
        self.relu0_output: Optional[torch.Tensor] = None
        self.n_relu = 0
        self.act_bytes = 0  # the largest ReLU output per image, in bytes (sizes the seed chunks)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RELU_FUNCS:
            x = args[0] if args else kwargs["input"]
            inplace = func in INPLACE_RELU_FUNCS or (func is F.relu and bool(
                args[1] if len(args) > 1 else kwargs.get("inplace", False)))
            if inplace:
                y = fisnet_ext.lrp_relu_(x, self.eps, self.switch, self.backend)
            else:
                y = fisnet_ext.lrp_relu(x, self.eps, self.switch, self.backend)
            self.n_relu += 1
            if y.dim() > 0 and y.shape[0] > 0:
                self.act_bytes = max(self.act_bytes, y.numel() // y.shape[0] * y.element_size())
            if self.recording and self.first is not None:
                src = self.first.bn_output if self.first.bn_output is not None else self.first.output
                if x is src:
                    self.relu0_output = y
                    self.recording = False
            return y
        if func in UNSUPPORTED_FUNCS:
            raise UnsupportedActivationError(
                f"the model's forward calls {UNSUPPORTED_FUNCS[func]}: LRP-Flex (and so fisnet) supports ReLU "
                f"networks only; replace it with F.relu / nn.ReLU, or return logits rather than probabilities.")
        if func in TRACED_CONV_FUNCS:
            out = traced_conv(func, args, kwargs, (self.switch, self.zswitch))
        elif func is F.batch_norm and TRACED_BATCH_NORM:
            out = traced_batch_norm(args, kwargs, (self.switch, self.zswitch), self.backend)
        else:
            out = func(*args, **kwargs)
        if self.zswitch is not None:
            out = self._tap(func, args, kwargs, out)
        if self.recording:
            self._record(func, args, kwargs, out)
        return out

    def _tap(self, func, args, kwargs, out):
        if func in CONV_FUNCS:
            vals = _call_args(_CONV_ARGS, args, kwargs)
            rec = LayerRecord(_make_layer(CONV_FUNCS[func], vals), vals["input"], conv_out=out)
            self.records.append(rec)
            tapped = ZPlusTap.apply(out, vals["input"], rec, "conv", self.zswitch, self.eps)
            tapped._fisnet_tap = rec
            return tapped
        if func is F.batch_norm and self.records:
            x = args[0] if args else kwargs["input"]
            rec = self.records[-1]
            if getattr(x, "_fisnet_tap", None) is rec and rec.bn is None:
                rec.bn = _call_args(_BN_ARGS, args, kwargs)
                return ZPlusTap.apply(out, rec.input, rec, "bn", self.zswitch, self.eps)
        return out

    def _record(self, func, args, kwargs, out):
        if func in CONV_FUNCS:
            vals = _call_args(_CONV_ARGS, args, kwargs)
            if self.first is None and (self.first_weight is None or vals["weight"] is self.first_weight):
                self.first = _FirstLayer(_make_layer(CONV_FUNCS[func], vals), vals["input"], out)
        elif func is F.batch_norm and self.first is not None and self.first.bn is None:
            x = args[0] if args else kwargs["input"]
            if x is self.first.output:
                self.first.bn = _call_args(_BN_ARGS, args, kwargs)
                self.first.bn_output = out


@dataclass
class LRPTrace:
    """One forward pass of a model under LRP-Flex.  `logits` is the model's output."""

    logits: torch.Tensor
    x: torch.Tensor
    switch: fisnet_ext.HeatmapSwitch
    eps: float
    zb: bool
    bounds: object
    layer_outputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    first: Optional[_FirstLayer] = None
    relu0_output: Optional[torch.Tensor] = None
    x_leaf: Optional[torch.Tensor] = None
    zswitch: Optional[fisnet_ext.HeatmapSwitch] = None
    act_bytes: int = 0

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
        with self.zswitch:
            return self._relevance(q, create_graph, retain_graph, lrp_switch=False)

    def relevance_dual(self, create_graph: bool = False):
        """Both Dual ISNet maps, (B, 2, ...) per tensor, from ONE backward over two rule slots:
        slot 0 the LRP-ε map of Σ_k z_k, slot 1 the z⁺ map (trace with zplus=True).  Equal to
        `relevance(logits.sum(1, keepdim=True))` next to `relevance_zplus()`."""
        if self.zswitch is None:
            raise RuntimeError("this trace was made without zplus=True; the Dual maps need it")
        q = self.logits.sum(1, keepdim=True)
        seeds = torch.ones((2,) + tuple(q.shape), dtype=q.dtype, device=q.device)
        names, wrt = self._targets()
        with torch.enable_grad(), self.switch.two_slots(), self.zswitch.two_slots():
            grads = _batched_grad(q, wrt, create_graph, seeds)
        return self._finish(names, wrt, [g.transpose(0, 1) for g in grads], q.shape[0], 2)

    def _targets(self):
        names: List[str] = []
        wrt: List[torch.Tensor] = []
        if self.zb:
            names.append("__relu0__")
            wrt.append(self.relu0_output)
        else:
            names.append("input")
            wrt.append(self.x_leaf)
        for name, t in self.layer_outputs.items():
            names.append(name)
            wrt.append(t)
        return names, wrt

    def _finish(self, names, wrt, grads, B: int, M: int):
        """Relevance a ⊙ G at each target; the Zb rule for the input."""
        out = {}
        for name, a, g in zip(names, wrt, grads):
            if g is None:  # the explained quantity does not depend on this tensor
                g = torch.zeros((B, M) + tuple(a.shape[1:]), dtype=a.dtype, device=a.device)
            out[name] = a.unsqueeze(1) * g
        if self.zb:
            out["input"] = self._zb(out.pop("__relu0__"))
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
        names, wrt = self._targets()
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
                    parts.append(self._finish(names, wrt, g, B, seeds.shape[0]))
                return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
        return self._finish(names, wrt, grads, B, M)

    def _zb(self, r_out: torch.Tensor) -> torch.Tensor:
        first = self.first
        layer = first.layer if first.bn is None else fold_batchnorm_as_used(first.layer, first.bn, first.output)
        a = first.input
        low, high, low_b, high_b = bound_images(self.bounds, self.x)
        if a.shape != self.x.shape:  # e.g. flattened input of a linear first layer
            shape1 = (1,) + tuple(self.x.shape[1:])
            low = low.expand(shape1).reshape((1,) + tuple(a.shape[1:]))
            high = high.expand(shape1).reshape((1,) + tuple(a.shape[1:]))
        r = zb_relevance(layer, a, r_out, low, high, low_b, high_b, self.eps)
        return r.reshape(r.shape[:2] + tuple(self.x.shape[1:]))


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
def _capture_outputs(model: nn.Module, names: Sequence[str], store: Dict[str, torch.Tensor]):
    handles = []
    try:
        for name in names:
            mod = _find_module(model, name)

            def hook(_m, _inp, out, _name=name):
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"LDS layer {_name!r} returns {type(out).__name__}, not a tensor")
                store[_name] = out

            handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def trace(model: nn.Module, x: torch.Tensor, *, eps: float = 1e-2, zb: bool = True, bounds=(0.0, 1.0),
          layers: Optional[Sequence[str]] = None, zb_layer: Optional[str] = None,
          backend: Optional[str] = None, zplus: bool = False) -> LRPTrace:
    """Run `model(x)` once under LRP-Flex; see `LRPTrace.relevance` for the heatmaps."""
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
    x_leaf = None
    x_in = x
    params = list(model.parameters())
    frozen = not params or not all(p.requires_grad for p in params)
    if not zb or frozen:
        # the input itself needs grad when the map is taken there, or when frozen layers would
        # leave the tensors the maps are taken at without a graph
        x_leaf = x.detach().requires_grad_(True)
        x_in = x_leaf
    outputs: Dict[str, torch.Tensor] = {}
    zswitch = fisnet_ext.HeatmapSwitch() if zplus else None
    mode = _Interceptor(eps, switch, backend, record_first=zb, first_weight=first_weight, zswitch=zswitch)
    with torch.enable_grad(), _capture_outputs(model, layers, outputs), mode:
        logits = model(x_in)
    outputs = {name: outputs[name] for name in layers if name in outputs}  # the order asked for
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(logits).__name__}; fisnet expects a logits tensor (B, K)")
    if mode.n_relu == 0:
        raise ValueError("the model's forward called no ReLU: LRP-Flex needs a ReLU network "
                         "(ReLUs written as clamp/max are not recognised; use F.relu or nn.ReLU)")
    if zplus:
        if not mode.records:
            raise ValueError("the z⁺ rule needs conv/linear layers, and the forward called none")
        mode.records[-1].is_logits = True  # the classifier: the last conv/linear of the forward
    missing = [n for n in layers if n not in outputs]
    if missing:
        raise ValueError(f"LDS layers {missing} were not called during the forward pass")
    if zb:
        first = mode.first
        where = f"layer {zb_layer!r}" if zb_layer else "the first conv/linear layer"
        if first is None:
            raise ValueError(f"Zb rule: could not find {where} in the forward pass; name it with zb_layer=... "
                             "or pass zb=False")
        if mode.relu0_output is None:
            raise ValueError(f"Zb rule: {where} (optionally followed by BatchNorm) is not followed directly by a "
                             "ReLU; name the first layer with zb_layer=... or pass zb=False")
        a = first.input
        same = a.numel() == x.numel() and a.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        if not same:
            raise ValueError(f"Zb rule: {where} does not take the model input (its input has shape "
                             f"{tuple(a.shape)}, the model input {tuple(x.shape)}); the Zb rule needs the "
                             "bounded pixels: name the right layer with zb_layer=... or pass zb=False")
    return LRPTrace(logits=logits, x=x, switch=switch, eps=eps, zb=zb, bounds=bounds, layer_outputs=outputs,
                    first=mode.first if zb else None, relu0_output=mode.relu0_output, x_leaf=x_leaf,
                    zswitch=zswitch, act_bytes=mode.act_bytes)


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
            zb_layer: Optional[str] = None, backend: Optional[str] = None):
    """LRP-Flex heatmaps of `model` at `x` (SPEC §2).

    target: None → the predicted class (M = 1); int or LongTensor (B,) → those classes (M = 1);
    "all" → every class (M = K), in one batched backward.  Returns a tensor (B, M, C, H, W), or,
    when `layers` names hidden modules (LDS), a dict {"input": ..., name: (B, M, ...)}.
    eps: the LRP-ε stabiliser (0 gives gradient × input).  zb: the Zb rule at the first layer
    with pixel `bounds` (low, high), scalars or per-channel; `zb_layer` names that layer when
    automatic detection fails.  create_graph=True keeps the maps differentiable in the weights.
    The model runs as it is (call model.eval() first for eval-mode BatchNorm) and is not modified.
    """
    with torch.enable_grad():
        t = trace(model, x, eps=eps, zb=zb, bounds=bounds, layers=layers, zb_layer=zb_layer, backend=backend)
        q = select_logits(t.logits, target)
        maps = t.relevance(q, create_graph=create_graph, retain_graph=create_graph)
    if not create_graph:
        maps = {k: v.detach() for k, v in maps.items()}
    return maps if layers else maps["input"]
