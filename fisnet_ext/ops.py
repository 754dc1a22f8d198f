"""The fisnet custom ops and their autograd.

Ops (namespace ``torch.ops.fisnet``; schemas in csrc/fisnet_ops.cpp):

* ``lrp_relu_fwd(x)``                 plain ReLU forward
* ``lrp_relu_bwd(g, x, eps)``         heatmap backward: ``g * y / (y + eps)``, y = relu(x)
* ``lrp_relu_bwd_bwd(gg, g, x, eps)`` its derivative, contracted with ``gg``: ``(d/dg, d/dx)``

Each op has a C++ CPU kernel, a CUDA kernel (when built with FISNET_CUDA=1), a Triton kernel
(registered as ``fisnet::*_triton`` ops, usable on GPUs and on CPU under TRITON_INTERPRET=1)
and the pure-PyTorch reference (fisnet_ext/reference.py).  Their registration -- fake (meta)
kernels, autograd (the backward op's autograd is the double-backward op, whose own autograd is
written in PyTorch so third derivatives exist too), vmap rules (a batched heatmap backward,
``torch.autograd.grad(..., is_grads_batched=True)``, reaches the kernels with x broadcast over
the batch of seeds instead of copied) and the backend choice (`family`) -- comes from the op-group
template, `fisnet_ext.opgroup.elementwise`, as for every op family.  This module also holds
`HeatmapSwitch` and `slot_mask`, which every family's differentiable function reads.

``lrp_relu(x, eps, switch)`` is the differentiable ReLU that fisnet puts in a model: its forward
is ReLU; its backward is the ReLU derivative, except while its ``HeatmapSwitch`` is on, when it
is the LRP-Flex factor.  One forward pass thus serves both the classification gradient and the
heatmap.  Without a switch the op always uses the LRP-Flex factor.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import reference
from .opgroup import C_ERROR, HAVE_C, HAVE_TRITON, WITH_CUDA, elementwise, register_vmap, sum_slots  # noqa: F401

__all__ = ["HAVE_C", "C_ERROR", "WITH_CUDA", "HAVE_TRITON", "GROUP", "NATIVE", "TRITON", "REFERENCE", "Family",
           "family", "slot_mask", "HeatmapSwitch", "relu_backward", "lrp_relu", "lrp_relu_", "LRPReLU",
           "lrp_relu_bwd", "lrp_relu_bwd_bwd"]


def _triton():
    from .triton import lrp_relu as tl  # imported lazily: importing triton is slow

    return tl.lrp_relu_fwd, tl.lrp_relu_bwd, tl.lrp_relu_bwd_bwd


def _relu_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The ReLU derivative (PyTorch's own)."""
    return torch.ops.aten.threshold_backward(grad, x, 0)


def _bwd_bwd_grad(saved, params, a, b):
    """Autograd of the double-backward op, in PyTorch (third derivatives; rarely used).

    dg = gg*f(x), dx = gg*g*h(x) with f = x/(x+e), h = e/(x+e)^2, h' = -2e/(x+e)^3 (x > 0)."""
    gg, g, x = saved
    (eps,) = params
    pos = x > 0
    den = torch.where(pos, x + eps, torch.ones_like(x))
    f = torch.where(pos, x / den, torch.zeros_like(x))
    h = torch.where(pos, eps / den**2, torch.zeros_like(x))
    hp = torch.where(pos, -2.0 * eps / den**3, torch.zeros_like(x))
    a = torch.zeros_like(g) if a is None else a
    b = torch.zeros_like(g) if b is None else b
    d_gg = a * f + b * g * h
    d_g = b * gg * h
    d_x = sum_slots(a * gg * h + b * gg * g * hp, x)
    return d_gg, d_g, d_x


GROUP = elementwise(
    "Family",
    names=("lrp_relu_fwd", "lrp_relu_bwd", "lrp_relu_bwd_bwd"),
    params="",
    reference=(reference.lrp_relu_fwd, reference.lrp_relu_bwd, reference.lrp_relu_bwd_bwd),
    fwd_grad=_relu_grad,
    triton=_triton,
    bwd_bwd_grad=_bwd_bwd_grad,
)
NATIVE, TRITON, REFERENCE = GROUP.native, GROUP.triton_ops, GROUP.reference_ops
Family = GROUP.Backend  # the three ops of one backend: name, fwd, bwd, bwd_bwd


def family(device: torch.device, backend: Optional[str] = None) -> Family:
    """The lrp_relu ops that run on `device` under `backend` (default: the current backend)."""
    return GROUP.choose(device, backend)


# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fisnet::slot_mask", mutates_args=())
def _slot_mask(t: torch.Tensor, slot: int) -> torch.Tensor:
    raise RuntimeError("fisnet.slot_mask selects one rule slot of a backward run under torch.func.vmap "
                       "over rule slots; it has no meaning outside such a vmap")


@_slot_mask.register_fake
def _(t, slot):
    return torch.empty_like(t)


@register_vmap("fisnet::slot_mask")
def _(info, in_dims, t, slot):
    td, _ = in_dims
    t = t.unsqueeze(0).expand((info.batch_size,) + tuple(t.shape)) if td is None else t.movedim(td, 0)
    keep = torch.zeros(info.batch_size, dtype=t.dtype, device=t.device)
    keep[slot] = 1
    return t * keep.reshape((-1,) + (1,) * (t.dim() - 1)), 0


def slot_mask(t: torch.Tensor, slot: int) -> torch.Tensor:
    """Under `torch.func.vmap` over rule slots: `t` in slot `slot`, zero in the others."""
    return _slot_mask(t, slot)


def relu_backward(switch: Optional["HeatmapSwitch"], fam: Family, grad: torch.Tensor, x: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """The backward of a ReLU under `switch` (x: its input, or its output — same sign pattern)."""
    if switch is not None and switch.active and switch.ident:  # the z⁺ map alone: slot 1's rule
        return _relu_grad(grad, x)
    if switch is None or switch.active:
        g_lrp = fam.bwd(grad, x, eps)
        if switch is not None and switch.dual:  # slot 0: LRP-ε factor; slot 1: plain derivative
            return slot_mask(g_lrp, 0) + slot_mask(_relu_grad(grad, x), 1)
        return g_lrp
    return _relu_grad(grad, x)


class HeatmapSwitch:
    """Decides whether the `lrp_relu` ops that share it backpropagate the LRP-Flex factor.

    Off (the default), their backward is the ReLU derivative: ordinary training gradients.
    Inside ``with switch:`` a backward pass uses ``y / (y + eps)``: a heatmap.  The switch is
    read when the backward runs, so one forward pass serves both.  Each explained forward pass
    gets its own switch: nothing is global, and models with different eps do not interact.
    """

    __slots__ = ("_depth", "dual", "ident")

    def __init__(self):
        self._depth = 0
        self.dual = False  # two rule slots (Dual ISNet): see `two_slots`
        self.ident = False  # slot 1's rule everywhere (the z⁺ map alone): see `slot1_only`

    @property
    def active(self) -> bool:
        return self._depth > 0

    def __enter__(self):
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        return False

    @contextlib.contextmanager
    def two_slots(self):
        """On, for a backward run under `torch.func.vmap` over two rule slots: the ops sharing
        the switch apply their heatmap rule to slot 0 and their ordinary backward to slot 1."""
        old = self.dual
        self.dual = True
        try:
            with self:
                yield self
        finally:
            self.dual = old

    @contextlib.contextmanager
    def slot1_only(self):
        """On, for a backward that applies, in every op sharing the switch, the rule that slot 1
        gets under `two_slots` (the z⁺ map's pass-through: lrp_relu's plain derivative,
        lrp_act's ε-free identity rule φ(z)/z) to the whole backward, without slots."""
        old = self.ident
        self.ident = True
        try:
            with self:
                yield self
        finally:
            self.ident = old

    def __repr__(self):
        return f"HeatmapSwitch(active={self.active})"


class _LRPReLU(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, eps, switch, fam):
        # the forward is a plain ReLU: on the native family ATen's (bit-equal, and 2-3x faster than
        # the C++ lrp_relu_fwd kernel on CPU: pytest bench --benchmark-only, docs/ops.md)
        return torch.relu(x) if fam is NATIVE else fam.fwd(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, eps, switch, fam = inputs
        ctx.save_for_backward(x)
        ctx.eps = eps
        ctx.switch = switch
        ctx.fam = fam
        ctx.set_materialize_grads(False)  # no gradient at the output: none to the input, no kernel

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        (x,) = ctx.saved_tensors
        return relu_backward(ctx.switch, ctx.fam, grad, x, ctx.eps), None, None, None


class _LRPReLUInplace(torch.autograd.Function):
    """In-place form: rectifies x in place (autograd sees an in-place op) and saves the output.

    y > 0 exactly where x > 0 and y = x there, so the backward kernels take y in place of x; the
    gradient of the saved y flows back through this node, whose backward is the ReLU derivative
    while the switch is off (the double backward of a training step)."""

    @staticmethod
    def forward(ctx, x, eps, switch, fam):
        torch.relu_(x)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        ctx.eps, ctx.switch, ctx.fam = eps, switch, fam
        ctx.set_materialize_grads(False)
        return x

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        (y,) = ctx.saved_tensors
        return relu_backward(ctx.switch, ctx.fam, grad, y, ctx.eps), None, None, None


def _check_args(x, eps):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"lrp_relu expects a floating-point tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"lrp_relu: eps must be >= 0 (eps = 0 gives the plain gradient), got {eps}")
    return eps


def lrp_relu_(x: torch.Tensor, eps: float = 1e-2, switch: Optional[HeatmapSwitch] = None,
              backend: Optional[str] = None) -> torch.Tensor:
    """In-place `lrp_relu` (what `nn.ReLU(inplace=True)` / `x.relu_()` become under fisnet)."""
    eps = _check_args(x, eps)
    return _LRPReLUInplace.apply(x, eps, switch, family(x.device, backend))


def lrp_relu(x: torch.Tensor, eps: float = 1e-2, switch: Optional[HeatmapSwitch] = None,
             backend: Optional[str] = None) -> torch.Tensor:
    """ReLU whose backward is the LRP-Flex factor ``y/(y+eps)`` (always when `switch` is None,
    else only while the switch is on); differentiable twice (the heatmap can be trained on)."""
    eps = _check_args(x, eps)
    return _LRPReLU.apply(x, eps, switch, family(x.device, backend))


class LRPReLU(torch.nn.Module):
    """Drop-in for ``nn.ReLU`` whose backward is the LRP-Flex factor (see `lrp_relu`)."""

    def __init__(self, eps: float = 1e-2, switch: Optional[HeatmapSwitch] = None, inplace: bool = False):
        super().__init__()
        self.eps = float(eps)
        self.switch = switch
        self.inplace = inplace  # accepted for nn.ReLU compatibility; the op is never in place

    def forward(self, x):
        return lrp_relu(x, self.eps, self.switch)

    def extra_repr(self):
        return f"eps={self.eps}"


def lrp_relu_bwd(g, x, eps, backend: Optional[str] = None):
    """Heatmap backward through the chosen backend (differentiable)."""
    return family(x.device, backend).bwd(g, x, float(eps))


def lrp_relu_bwd_bwd(gg, g, x, eps, backend: Optional[str] = None):
    """Double backward through the chosen backend."""
    return family(x.device, backend).bwd_bwd(gg, g, x, float(eps))
