"""The lrp_act family: element-wise activations y = φ(z) with the identity-rule heatmap backward.

Ops (namespace ``torch.ops.fisnet``; schemas in csrc/fisnet_ops.cpp, formulas in csrc/act_math.h
and fisnet_ext/reference.py):

* ``act_fwd(x, kind, param)``                 φ(x), PyTorch's forward of that activation
* ``act_bwd(g, x, kind, param, eps)``         heatmap backward ``g * h(x)``,
  ``h(z) = φ(z) / (z + eps * sign z)``, sign 0 := +1 (for relu: y / (y + eps))
* ``act_bwd_bwd(gg, g, x, kind, param, eps)`` its derivative contracted with gg:
  ``(gg * h(x), gg * g * h'(x))``

Kinds: ``KINDS`` (name -> integer code of the schema).  ``param``: leaky_relu's negative slope,
elu's alpha, softplus's beta (softplus's threshold is PyTorch's 20); the other kinds ignore it.
With eps = 0 the factor is the identity rule φ(z)/z, whose 0/0 at z = 0 is defined as φ'(0)
(PyTorch's derivative there).  Softplus has φ(0) = ln 2 / beta > 0, so φ(z)/z has a pole at 0:
it needs eps > 0.

Backends (chosen as for lrp_relu): C++ CPU kernels, CUDA kernels (FISNET_CUDA=1), Triton
(``fisnet::act_*_triton``; GPUs, or CPU tensors under TRITON_INTERPRET=1), the reference.
Registration, fake kernels, autograd, double/third derivatives and vmap come from the
`fisnet_ext.opgroup.elementwise` template.

``lrp_act(x, kind, eps, switch=None, backend=None, *, param=None)`` is the differentiable
activation that the method layer puts in a model (like ``lrp_relu``): forward φ; backward
PyTorch's φ' while its `HeatmapSwitch` is off, the identity-rule factor while it is on (always,
without a switch).  Under ``switch.two_slots()`` (Dual ISNet) slot 0 gets the factor with
`eps`, slot 1 (the z⁺ map) the identity rule with eps = 0, φ(z)/z — for relu exactly the
plain derivative, as in lrp_relu — except softplus, whose slot 1 keeps `eps` (no pole).
Under ``switch.slot1_only()`` the whole backward gets slot 1's rule (the z⁺ map alone).
The op saves its input z; it has no in-place form (an in-place change of z after the call is
caught by autograd's version check).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops, reference  # noqa: F401  (ops: HeatmapSwitch, slot_mask; bench/kernels.py reads ops.WITH_CUDA)
from .opgroup import check_slot_args, elementwise
from .ops import HeatmapSwitch, slot_mask

KINDS = {
    "relu": 0,
    "relu6": 1,
    "leaky_relu": 2,
    "gelu": 3,
    "gelu_tanh": 4,
    "silu": 5,
    "hardswish": 6,
    "elu": 7,
    "mish": 8,
    "softplus": 9,
}
SOFTPLUS = KINDS["softplus"]
# PyTorch's defaults of the parameter (F.leaky_relu's slope, F.elu's alpha, F.softplus's beta)
DEFAULT_PARAM = {"leaky_relu": 0.01, "elu": 1.0, "softplus": 1.0}
_A = torch.ops.aten


def plain_grad(grad: torch.Tensor, x: torch.Tensor, kind: int, param: float) -> torch.Tensor:
    """PyTorch's own derivative of the activation (what autograd of F.* computes), differentiable.

    silu and mish: ATen's fused backward when no graph is being built, else the differentiable
    composite that PyTorch's autograd itself switches to (its fused ones have no derivative)."""
    if kind == 0:
        return _A.threshold_backward(grad, x, 0)
    if kind == 1:
        return _A.hardtanh_backward(grad, x, 0.0, 6.0)
    if kind == 2:
        return _A.leaky_relu_backward(grad, x, param, False)
    if kind == 3:
        return _A.gelu_backward(grad, x)
    if kind == 4:
        return _A.gelu_backward(grad, x, approximate="tanh")
    if kind == 5:
        if torch.is_grad_enabled():
            s = x.sigmoid()
            return grad * s * (1.0 + x * (1.0 - s))
        return _A.silu_backward(grad, x)
    if kind == 6:
        return _A.hardswish_backward(grad, x)
    if kind == 7:
        return _A.elu_backward(grad, param, 1.0, 1.0, False, x)
    if kind == 8:
        if torch.is_grad_enabled():
            s = x.sigmoid()
            t = x.exp().log1p().tanh()
            return grad * (t + x * s * (1.0 - t * t))
        return _A.mish_backward(grad, x)
    if kind == 9:
        return _A.softplus_backward(grad, x, param, 20.0)
    raise ValueError(f"fisnet: unknown activation kind {kind}")


def _triton():
    from .triton import act  # imported lazily: importing triton is slow

    return act.fwd, act.bwd, act.bwd_bwd


GROUP = elementwise(
    "ActFamily",
    names=("act_fwd", "act_bwd", "act_bwd_bwd"),
    params="int kind, float param",
    reference=(reference.act_fwd, reference.act_bwd, reference.act_bwd_bwd),
    fwd_grad=plain_grad,
    triton=_triton,
)
NATIVE, TRITON, REFERENCE = GROUP.native, GROUP.triton_ops, GROUP.reference_ops


def choose(device, backend: Optional[str] = None):
    """The lrp_act ops of `backend` (default: the current one) on `device`."""
    return GROUP.choose(torch.device(device), backend)


# ---- the one Python argument check -----------------------------------------------------------
def check_act(x, kind, eps, param=None):
    """(kind code, param, eps) for valid arguments; else a TypeError/ValueError naming the fix."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("lrp_act expects a floating-point tensor, got " + type(x).__name__
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if isinstance(kind, str):
        if kind not in KINDS:
            raise ValueError(f"lrp_act: unknown activation {kind!r}; choose one of {', '.join(KINDS)}")
        name = kind
    else:
        raise TypeError(f"lrp_act: kind must be an activation name (one of {', '.join(KINDS)}), got {kind!r}")
    code = KINDS[name]
    eps = float(eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"lrp_act: eps must be finite and >= 0 (eps = 0: the identity rule φ(z)/z), got {eps}")
    param = DEFAULT_PARAM.get(name, 0.0) if param is None else float(param)
    if not math.isfinite(param):
        raise ValueError(f"lrp_act: param must be finite, got {param}")
    if code == SOFTPLUS:
        if not param > 0.0:
            raise ValueError(f"lrp_act: softplus needs beta (param) > 0, got {param}")
        if not eps > 0.0:
            raise ValueError("lrp_act: softplus needs eps > 0 (softplus(0) > 0, so φ(z)/z has a pole at z = 0); "
                             f"got eps = {eps}")
    return code, param, eps


def check_act_launch(op: str, g, x, kind: int, param: float, eps: float, gg=None) -> None:
    """Checks of the op-level launchers (Triton): slots, dtypes, devices, kind, param, eps."""
    if g is not None:
        check_slot_args(op, g, x, eps, gg)
    elif not x.is_floating_point():
        raise TypeError(f"fisnet: x must be a floating-point tensor, got {x.dtype}")
    if not (isinstance(kind, int) and 0 <= kind < len(KINDS)):
        raise ValueError(f"fisnet.{op}: unknown activation kind {kind} (0..{len(KINDS) - 1}; see KINDS)")
    if not math.isfinite(param):
        raise ValueError(f"fisnet.{op}: param must be finite, got {param}")
    if kind == SOFTPLUS and not param > 0.0:
        raise ValueError(f"fisnet.{op}: softplus needs beta (param) > 0, got {param}")
    if g is not None:
        if not math.isfinite(eps):
            raise ValueError(f"fisnet.{op}: eps must be finite, got {eps}")
        if kind == SOFTPLUS and not eps > 0.0:
            raise ValueError(f"fisnet.{op}: softplus needs eps > 0 (softplus(0) > 0, so phi(z)/z has a pole "
                             f"at z = 0), got {eps}")


# ---- the differentiable activation -------------------------------------------------------------
def act_backward(switch: Optional[HeatmapSwitch], ops, grad, x, kind: int, param: float, eps: float):
    """The backward of an lrp_act under `switch` (x: the activation's input)."""
    if switch is not None and switch.active and switch.ident:  # the z⁺ map alone: slot 1's rule
        return ops.bwd(grad, x, kind, param, eps if kind == SOFTPLUS else 0.0)
    if switch is None or switch.active:
        g_lrp = ops.bwd(grad, x, kind, param, eps)
        if switch is not None and switch.dual:  # slot 0: identity rule with eps; slot 1: eps = 0
            g_id = ops.bwd(grad, x, kind, param, eps if kind == SOFTPLUS else 0.0)
            return slot_mask(g_lrp, 0) + slot_mask(g_id, 1)
        return g_lrp
    return plain_grad(grad, x, kind, param)


class _LRPAct(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, kind, param, eps, switch, ops):
        return ops.fwd(x, kind, param)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kind, param, eps, switch, ops = inputs
        ctx.save_for_backward(x)
        ctx.args = (kind, param, eps)
        ctx.switch, ctx.ops = switch, ops
        ctx.set_materialize_grads(False)  # no gradient at the output: none to the input, no kernel

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 6
        (x,) = ctx.saved_tensors
        return (act_backward(ctx.switch, ctx.ops, grad, x, *ctx.args),) + (None,) * 5


def lrp_act(x: torch.Tensor, kind: str, eps: float, switch: Optional[HeatmapSwitch] = None,
            backend: Optional[str] = None, *, param: Optional[float] = None) -> torch.Tensor:
    """Activation `kind` (see KINDS) whose backward is the identity-rule factor
    ``φ(z) / (z + eps * sign z)`` (always when `switch` is None, else only while the switch is
    on; PyTorch's derivative otherwise); differentiable twice (the heatmap can be trained on).
    `param`: leaky_relu's slope, elu's alpha, softplus's beta (None: PyTorch's default)."""
    code, param, eps = check_act(x, kind, eps, param)
    return _LRPAct.apply(x, code, param, eps, switch, choose(x.device, backend))


def act_bwd(g, x, kind: str, eps: float, backend: Optional[str] = None, *, param: Optional[float] = None):
    """Heatmap backward ``g * h(x)`` through the chosen backend (differentiable)."""
    code, param, eps = check_act(x, kind, eps, param)
    return choose(x.device, backend).bwd(g, x, code, param, eps)


def act_bwd_bwd(gg, g, x, kind: str, eps: float, backend: Optional[str] = None, *, param: Optional[float] = None):
    """Double backward ``(gg * h(x), gg * g * h'(x))`` through the chosen backend."""
    code, param, eps = check_act(x, kind, eps, param)
    return choose(x.device, backend).bwd_bwd(gg, g, x, code, param, eps)
