"""The fisnet custom ops and their autograd.

Ops (namespace ``torch.ops.fisnet``; schemas in csrc/fisnet_ops.cpp):

* ``lrp_relu_fwd(x)``                 plain ReLU forward
* ``lrp_relu_bwd(g, x, eps)``         heatmap backward: ``g * y / (y + eps)``, y = relu(x)
* ``lrp_relu_bwd_bwd(gg, g, x, eps)`` its derivative, contracted with ``gg``: ``(d/dg, d/dx)``

Each op has a C++ CPU kernel, a CUDA kernel (when built with FISNET_CUDA=1), a Triton kernel
(registered as ``fisnet::*_triton`` ops, usable on GPUs and on CPU under TRITON_INTERPRET=1)
and the pure-PyTorch reference (fisnet_ext/reference.py).  This module registers, for every
family: fake (meta) kernels, autograd (the backward op's autograd is the double-backward op,
whose own autograd is written in PyTorch so third derivatives exist too) and vmap rules (so a
batched heatmap backward, ``torch.autograd.grad(..., is_grads_batched=True)``, reaches the
kernels with x broadcast over the batch of seeds instead of copied).

``lrp_relu(x, eps, switch)`` is the differentiable ReLU that fisnet puts in a model: its forward
is ReLU; its backward is the ReLU derivative, except while its ``HeatmapSwitch`` is on, when it
is the LRP-Flex factor.  One forward pass thus serves both the classification gradient and the
heatmap.  Without a switch the op always uses the LRP-Flex factor.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import reference
from .backend import current_backend

try:
    from . import _C  # noqa: F401  (registers the schemas and the C++ kernels)

    HAVE_C = True
    C_ERROR: Optional[str] = None
    WITH_CUDA = bool(_C.with_cuda)
except ImportError as exc:  # extension not built: define the schemas here, reference kernels
    HAVE_C = False
    C_ERROR = str(exc)
    WITH_CUDA = False
    _fallback_lib = torch.library.Library("fisnet", "DEF")
    _fallback_lib.define("lrp_relu_fwd(Tensor x) -> Tensor")
    _fallback_lib.define("lrp_relu_bwd(Tensor g, Tensor x, float eps) -> Tensor")
    _fallback_lib.define("lrp_relu_bwd_bwd(Tensor gg, Tensor g, Tensor x, float eps) -> (Tensor, Tensor)")
    _fallback_lib.define("zplus_ratio(Tensor g, Tensor num, Tensor zp, float eps) -> Tensor")
    _fallback_lib.define(
        "zplus_ratio_bwd(Tensor gs, Tensor g, Tensor num, Tensor zp, float eps) -> (Tensor, Tensor, Tensor)")
    _fallback_lib.define("bn_train_bwd(Tensor g, Tensor x, Tensor weight, float eps) -> Tensor")
    _fallback_lib.define(
        "bn_train_bwd_bwd(Tensor h, Tensor g, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)")
    for _key in ("CPU", "CUDA"):
        _fallback_lib.impl("lrp_relu_fwd", reference.lrp_relu_fwd, _key)
        _fallback_lib.impl("lrp_relu_bwd", reference.lrp_relu_bwd, _key)
        _fallback_lib.impl("lrp_relu_bwd_bwd", reference.lrp_relu_bwd_bwd, _key)
        _fallback_lib.impl("zplus_ratio", reference.zplus_ratio, _key)
        _fallback_lib.impl("zplus_ratio_bwd", reference.zplus_ratio_bwd, _key)
        _fallback_lib.impl("bn_train_bwd", reference.bn_train_bwd, _key)
        _fallback_lib.impl("bn_train_bwd_bwd", reference.bn_train_bwd_bwd, _key)

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _register_vmap(name):
    """torch.library.register_vmap where this torch has it; otherwise a no-op (batched heatmaps
    of several maps per image then need a torch with it)."""
    if hasattr(torch.library, "register_vmap"):
        return torch.library.register_vmap(name)
    return lambda fn: fn


def _front(t: torch.Tensor, d: Optional[int], n: int) -> torch.Tensor:
    """A vmap argument with its batch dim `d` moved to the front (expanded when unbatched)."""
    return t.unsqueeze(0).expand(n, *t.shape) if d is None else t.movedim(d, 0)


def _triton():
    from .triton import lrp_relu as tl  # imported lazily: importing triton is slow

    return tl


# --------------------------------------------------------------------------------------------
# Triton family: custom ops defined in Python around the Triton launchers.
if HAVE_TRITON:

    @torch.library.custom_op("fisnet::lrp_relu_fwd_triton", mutates_args=())
    def _fwd_triton(x: torch.Tensor) -> torch.Tensor:
        return _triton().lrp_relu_fwd(x)

    @torch.library.custom_op("fisnet::lrp_relu_bwd_triton", mutates_args=())
    def _bwd_triton(g: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        return _triton().lrp_relu_bwd(g, x, eps)

    @torch.library.custom_op("fisnet::lrp_relu_bwd_bwd_triton", mutates_args=())
    def _bwd_bwd_triton(gg: torch.Tensor, g: torch.Tensor, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton().lrp_relu_bwd_bwd(gg, g, x, eps)


def _sum_slots(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reduce a gradient with leading slot dims to x's shape."""
    extra = t.dim() - x.dim()
    return t.sum(dim=tuple(range(extra))) if extra > 0 else t


def _bwd_bwd_backward_torch(ctx, a, b):
    """Autograd of the double-backward op, in PyTorch (third derivatives; rarely used).

    dg = gg*f(x), dx = gg*g*h(x) with f = x/(x+e), h = e/(x+e)^2, h' = -2e/(x+e)^3 (x > 0)."""
    gg, g, x = ctx.saved_tensors
    eps = ctx.eps
    pos = x > 0
    den = torch.where(pos, x + eps, torch.ones_like(x))
    f = torch.where(pos, x / den, torch.zeros_like(x))
    h = torch.where(pos, eps / den**2, torch.zeros_like(x))
    hp = torch.where(pos, -2.0 * eps / den**3, torch.zeros_like(x))
    a = torch.zeros_like(g) if a is None else a
    b = torch.zeros_like(g) if b is None else b
    d_gg = a * f + b * g * h
    d_g = b * gg * h
    d_x = _sum_slots(a * gg * h + b * gg * g * hp, x)
    return d_gg, d_g, d_x, None


@dataclass(frozen=True)
class Family:
    """The three ops of one backend."""

    name: str
    fwd: Callable
    bwd: Callable
    bwd_bwd: Callable


def _register_family(fwd_name: str, bwd_name: str, bwd_bwd_name: str) -> Family:
    fwd = getattr(torch.ops.fisnet, fwd_name).default
    bwd = getattr(torch.ops.fisnet, bwd_name).default
    bwd_bwd = getattr(torch.ops.fisnet, bwd_bwd_name).default

    # ---- fake kernels (shape/dtype propagation for torch.compile, meta tensors, opcheck)
    @torch.library.register_fake(f"fisnet::{fwd_name}")
    def _(x):
        return torch.empty_like(x)

    @torch.library.register_fake(f"fisnet::{bwd_name}")
    def _(g, x, eps):
        torch._check(g.dim() >= x.dim() and tuple(g.shape[g.dim() - x.dim():]) == tuple(x.shape),
                     lambda: f"g of shape {tuple(g.shape)} must end with x's shape {tuple(x.shape)}")
        return torch.empty_like(g)

    @torch.library.register_fake(f"fisnet::{bwd_bwd_name}")
    def _(gg, g, x, eps):
        return torch.empty_like(g), torch.empty_like(g)

    # ---- autograd
    def fwd_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def fwd_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, x, 0)

    torch.library.register_autograd(f"fisnet::{fwd_name}", fwd_backward, setup_context=fwd_setup)

    def bwd_setup(ctx, inputs, output):
        g, x, eps = inputs
        ctx.save_for_backward(g, x)
        ctx.eps = eps

    def bwd_backward(ctx, grad):
        g, x = ctx.saved_tensors
        d_g, d_x = bwd_bwd(grad, g, x, ctx.eps)
        return d_g, _sum_slots(d_x, x), None

    torch.library.register_autograd(f"fisnet::{bwd_name}", bwd_backward, setup_context=bwd_setup)

    def bwd_bwd_setup(ctx, inputs, output):
        gg, g, x, eps = inputs
        ctx.save_for_backward(gg, g, x)
        ctx.eps = eps

    torch.library.register_autograd(f"fisnet::{bwd_bwd_name}", _bwd_bwd_backward_torch, setup_context=bwd_bwd_setup)

    # ---- vmap: the batched dim of g becomes a leading slot dim; x stays unbatched (no copy)
    @_register_vmap(f"fisnet::{fwd_name}")
    def _(info, in_dims, x):
        (xd,) = in_dims
        return fwd(x), xd

    def _vmap_inputs(info, gs, gdims, x, xd):
        n = info.batch_size
        gs = [_front(t, d, n) for t, d in zip(gs, gdims)]
        if xd is not None:  # x itself batched: materialise it to g's batched shape
            x = x.movedim(xd, 0)
            extra = gs[0].dim() - x.dim()
            x = x.reshape(x.shape[:1] + (1,) * extra + x.shape[1:]).expand(gs[0].shape).contiguous()
        return gs, x

    @_register_vmap(f"fisnet::{bwd_name}")
    def _(info, in_dims, g, x, eps):
        gd, xd, _ = in_dims
        (g,), x = _vmap_inputs(info, [g], [gd], x, xd)
        return bwd(g, x, eps), 0

    @_register_vmap(f"fisnet::{bwd_bwd_name}")
    def _(info, in_dims, gg, g, x, eps):
        ggd, gd, xd, _ = in_dims
        (gg, g), x = _vmap_inputs(info, [gg, g], [ggd, gd], x, xd)
        return bwd_bwd(gg, g, x, eps), (0, 0)

    return Family(fwd_name.replace("lrp_relu_fwd", "").lstrip("_") or "native", fwd, bwd, bwd_bwd)


NATIVE = _register_family("lrp_relu_fwd", "lrp_relu_bwd", "lrp_relu_bwd_bwd")
TRITON = _register_family("lrp_relu_fwd_triton", "lrp_relu_bwd_triton", "lrp_relu_bwd_bwd_triton") if HAVE_TRITON else None
REFERENCE = Family("reference", reference.lrp_relu_fwd, reference.lrp_relu_bwd, reference.lrp_relu_bwd_bwd)


def family(device: torch.device, backend: Optional[str] = None) -> Family:
    """The op family that runs on `device` under `backend` (default: the current backend)."""
    name = backend or current_backend()
    is_cuda = device.type == "cuda"
    if name == "auto":
        if not is_cuda:
            return NATIVE if device.type == "cpu" else REFERENCE
        if WITH_CUDA:
            return NATIVE
        return TRITON if TRITON is not None else REFERENCE
    if name == "reference":
        return REFERENCE
    if name == "triton":
        if TRITON is None:
            raise RuntimeError("fisnet backend 'triton' was asked for but triton is not installed: pip install triton")
        return TRITON
    if name == "cpp":
        if is_cuda:
            raise RuntimeError("fisnet backend 'cpp' runs on CPU tensors only; use 'cuda' or 'triton' for GPU tensors")
        return NATIVE
    if name == "cuda":
        if not is_cuda:
            raise RuntimeError("fisnet backend 'cuda' runs on CUDA tensors only; use 'cpp' for CPU tensors")
        if not WITH_CUDA:
            raise RuntimeError(
                "fisnet backend 'cuda' was asked for but the CUDA kernels are not built: reinstall with "
                "FISNET_CUDA=1 pip install --no-build-isolation -e . (needs a CUDA build of torch and nvcc)"
            )
        return NATIVE
    raise ValueError(f"unknown fisnet backend {name!r}")


def same_choice(device: torch.device, backend: Optional[str], native, triton, reference):
    """Of one op group's families, the one `family(device, backend)` picks for lrp_relu (the same
    choice and the same errors for every op group)."""
    fam = family(torch.device(device), backend)
    if fam is REFERENCE:
        return reference
    if TRITON is not None and fam is TRITON:
        return triton
    return native


# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fisnet::slot_mask", mutates_args=())
def _slot_mask(t: torch.Tensor, slot: int) -> torch.Tensor:
    raise RuntimeError("fisnet.slot_mask selects one rule slot of a backward run under torch.func.vmap "
                       "over rule slots; it has no meaning outside such a vmap")


@_slot_mask.register_fake
def _(t, slot):
    return torch.empty_like(t)


@_register_vmap("fisnet::slot_mask")
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
        return torch.ops.aten.threshold_backward(grad, x, 0)
    if switch is None or switch.active:
        g_lrp = fam.bwd(grad, x, eps)
        if switch is not None and switch.dual:  # slot 0: LRP-ε factor; slot 1: plain derivative
            return slot_mask(g_lrp, 0) + slot_mask(torch.ops.aten.threshold_backward(grad, x, 0), 1)
        return g_lrp
    return torch.ops.aten.threshold_backward(grad, x, 0)


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
        return fam.fwd(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, eps, switch, fam = inputs
        ctx.save_for_backward(x)
        ctx.eps = eps
        ctx.switch = switch
        ctx.fam = fam

    @staticmethod
    def backward(ctx, grad):
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
        return x

    @staticmethod
    def backward(ctx, grad):
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
