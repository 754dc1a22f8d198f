"""One template for an element-wise fisnet op group with slots.

An op group is three ops on one backend,

* ``<fwd>(x, *P)``                  the forward,
* ``<bwd>(g, x, *P, eps)``          a backward (g may carry leading "slot" dims over x's shape),
* ``<bwd_bwd>(gg, g, x, *P, eps)``  its derivative contracted with gg: ``(d/dg, d/dx)``, g's shape,

where ``P`` are the group's non-tensor parameters (for lrp_act: ``kind, param``).  `OpGroup`
does, in one place, what every such group needs:

* the schemas and reference kernels when the C++ extension is missing (`define_fallback`);
* the Triton twins ``<op>_triton`` as custom ops around the Triton launchers;
* fake (meta) kernels, autograd (the forward's derivative is given by the group, the bwd's is
  the bwd_bwd op, the bwd_bwd's own derivative — third and higher derivatives — is autograd
  through the reference's differentiable bwd_bwd), vmap rules (a batched g becomes a leading slot
  dim, x stays unbatched: no copy of x per seed);
* backend choice (`choose`: the same choice and errors as `fisnet_ext.ops.family`);
* one Python argument check (`check_slot_args`) shared with the Triton launchers; the C++
  kernels check in csrc/fisnet_common.h.

The lrp_act family (fisnet_ext/act_ops.py) is built on it.  The older groups (lrp_relu in
ops.py, zplus_ratio, bn_train_bwd) still register themselves (see docs/ops.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import ops
from .ops import _front, _register_vmap


def check_slot_args(op: str, g: torch.Tensor, x: torch.Tensor, eps: float, gg: Optional[torch.Tensor] = None) -> None:
    """The Python twin of csrc/fisnet_common.h's check_slot_args / check_slot_args2."""
    if not x.is_floating_point():
        raise TypeError(f"fisnet: x must be a floating-point tensor, got {x.dtype}")
    if g.dtype != x.dtype:
        raise TypeError(f"fisnet.{op}: g is {g.dtype} but x is {x.dtype}; pass tensors of one dtype")
    if g.device != x.device:
        raise ValueError(f"fisnet.{op}: g is on {g.device} but x is on {x.device}")
    if not eps >= 0.0:
        raise ValueError(f"fisnet.{op}: eps must be >= 0, got {eps}")
    if g.dim() < x.dim() or tuple(g.shape[g.dim() - x.dim():]) != tuple(x.shape):
        raise ValueError(f"fisnet.{op}: g has shape {tuple(g.shape)}, x has shape {tuple(x.shape)}; "
                         "g must have x's shape, optionally with leading slot dimensions")
    if gg is not None:
        if gg.shape != g.shape:
            raise ValueError(f"fisnet.{op}: gg has shape {tuple(gg.shape)} but g has shape {tuple(g.shape)}; "
                             "they must be equal")
        if gg.dtype != g.dtype:
            raise TypeError(f"fisnet.{op}: gg is {gg.dtype} but g is {g.dtype}; pass tensors of one dtype")
        if gg.device != g.device:
            raise ValueError(f"fisnet.{op}: gg is on {gg.device} but g is on {g.device}")


def sum_slots(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reduce a gradient with leading slot dims to x's shape."""
    extra = t.dim() - x.dim()
    return t.sum(dim=tuple(range(extra))) if extra > 0 else t


@dataclass(frozen=True)
class Backend:
    """The three ops of one backend of a group."""

    name: str
    fwd: Callable
    bwd: Callable
    bwd_bwd: Callable


@dataclass
class OpGroup:
    """An element-wise op group with slots (see the module docstring).

    names:       (fwd, bwd, bwd_bwd) op names in the ``fisnet`` namespace (schemas in C++)
    params:      schema text of the non-tensor parameters P, e.g. ``"int kind, float param"``
    reference:   (fwd, bwd, bwd_bwd) pure-PyTorch functions with the ops' signatures, written in
                 differentiable torch ops (the bwd_bwd op's own derivative is taken through them)
    fwd_grad:    ``fwd_grad(grad, x, *P)``: the forward's ordinary derivative (differentiable)
    triton:      a function returning the module of Triton launchers ``fwd, bwd, bwd_bwd``
                 (imported lazily), or None
    """

    names: Sequence[str]
    params: str
    reference: Sequence[Callable]
    fwd_grad: Callable
    triton: Optional[Callable] = None

    def __post_init__(self):
        fwd, bwd, bwd_bwd = self.names
        p = (", " + self.params) if self.params else ""
        self.schemas = (f"(Tensor x{p}) -> Tensor", f"(Tensor g, Tensor x{p}, float eps) -> Tensor",
                        f"(Tensor gg, Tensor g, Tensor x{p}, float eps) -> (Tensor, Tensor)")
        self.n_params = len([s for s in self.params.split(",") if s.strip()])
        if not ops.HAVE_C:
            self._define_fallback()
        self.native = self._register("native", list(self.names))
        self.triton_ops = None
        if ops.HAVE_TRITON and self.triton is not None:
            tnames = [f"{n}_triton" for n in self.names]
            launch = self.triton
            impls = (lambda *a: launch().fwd(*a), lambda *a: launch().bwd(*a), lambda *a: launch().bwd_bwd(*a))
            for name, schema, impl in zip(tnames, self.schemas, impls):
                torch.library.define(f"fisnet::{name}", schema)
                torch.library.impl(f"fisnet::{name}", ("CPU", "CUDA"))(impl)
            self.triton_ops = self._register("triton", tnames)
        self.reference_ops = Backend("reference", *self.reference)

    def _define_fallback(self):
        """Without fisnet_ext._C: the schemas here, with the reference as the CPU/CUDA kernels."""
        lib = torch.library.Library("fisnet", "FRAGMENT")
        for name, schema, impl in zip(self.names, self.schemas, self.reference):
            lib.define(name + schema)
            for key in ("CPU", "CUDA"):
                lib.impl(name, impl, key)
        self._fallback_lib = lib  # keep the registrations alive

    def choose(self, device: torch.device, backend: Optional[str] = None) -> Backend:
        """The backend's ops on `device` (same rule and errors as fisnet_ext.ops.family)."""
        return ops.same_choice(device, backend, self.native, self.triton_ops, self.reference_ops)

    # ---- registration ------------------------------------------------------------------------
    def _register(self, name: str, names: list) -> Backend:
        fwd_name, bwd_name, bwd_bwd_name = names
        fwd = getattr(torch.ops.fisnet, fwd_name).default
        bwd = getattr(torch.ops.fisnet, bwd_name).default
        bwd_bwd = getattr(torch.ops.fisnet, bwd_bwd_name).default
        k = self.n_params
        group = self

        # fake kernels
        @torch.library.register_fake(f"fisnet::{fwd_name}")
        def _(x, *P):
            return torch.empty_like(x)

        @torch.library.register_fake(f"fisnet::{bwd_name}")
        def _(g, x, *rest):
            torch._check(g.dim() >= x.dim() and tuple(g.shape[g.dim() - x.dim():]) == tuple(x.shape),
                         lambda: f"g of shape {tuple(g.shape)} must end with x's shape {tuple(x.shape)}")
            return torch.empty_like(g)

        @torch.library.register_fake(f"fisnet::{bwd_bwd_name}")
        def _(gg, g, x, *rest):
            torch._check(gg.shape == g.shape, lambda: f"gg {tuple(gg.shape)} and g {tuple(g.shape)} differ")
            return torch.empty_like(g), torch.empty_like(g)

        # autograd
        def fwd_setup(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.P = tuple(inputs[1:])

        def fwd_backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return (group.fwd_grad(grad, x, *ctx.P),) + (None,) * k

        torch.library.register_autograd(f"fisnet::{fwd_name}", fwd_backward, setup_context=fwd_setup)

        def bwd_setup(ctx, inputs, output):
            g, x = inputs[:2]
            ctx.save_for_backward(g, x)
            ctx.rest = tuple(inputs[2:])

        def bwd_backward(ctx, grad):
            g, x = ctx.saved_tensors
            d_g, d_x = bwd_bwd(grad, g, x, *ctx.rest)
            return (d_g, sum_slots(d_x, x)) + (None,) * (k + 1)

        torch.library.register_autograd(f"fisnet::{bwd_name}", bwd_backward, setup_context=bwd_setup)

        def bwd_bwd_setup(ctx, inputs, output):
            gg, g, x = inputs[:3]
            ctx.save_for_backward(gg, g, x)
            ctx.rest = tuple(inputs[3:])

        def bwd_bwd_backward(ctx, a, b):
            """Autograd of the bwd_bwd op (third derivatives): the vector-Jacobian product of the
            reference's bwd_bwd, which is written in differentiable torch ops.  When a graph is
            being built (create_graph=True) the saved tensors enter it as they are, so every
            further order is exact too."""
            gg, g, x = ctx.saved_tensors
            create = torch.is_grad_enabled()
            a = torch.zeros_like(g) if a is None else a
            b = torch.zeros_like(g) if b is None else b
            with torch.enable_grad():
                ins = [t if (create and t.requires_grad) else t.detach().requires_grad_() for t in (gg, g, x)]
                outs = group.reference[2](*ins, *ctx.rest)
                grads = torch.autograd.grad(outs, ins, (a, b), create_graph=create, allow_unused=True,
                                            materialize_grads=True)
            return tuple(grads) + (None,) * (k + 1)

        torch.library.register_autograd(f"fisnet::{bwd_bwd_name}", bwd_bwd_backward, setup_context=bwd_bwd_setup)

        # vmap: element-wise forward; a batched g (gg) becomes a leading slot dim, x unbatched
        @_register_vmap(f"fisnet::{fwd_name}")
        def _(info, in_dims, x, *P):
            return fwd(x, *P), in_dims[0]

        def slot_inputs(info, gs, gdims, x, xd):
            n = info.batch_size
            gs = [_front(t, d, n) for t, d in zip(gs, gdims)]
            if xd is not None:  # x itself batched: materialise it to g's batched shape
                x = x.movedim(xd, 0)
                extra = gs[0].dim() - x.dim()
                x = x.reshape(x.shape[:1] + (1,) * extra + x.shape[1:]).expand(gs[0].shape).contiguous()
            return gs, x

        @_register_vmap(f"fisnet::{bwd_name}")
        def _(info, in_dims, g, x, *rest):
            (g,), x = slot_inputs(info, [g], in_dims[:1], x, in_dims[1])
            return bwd(g, x, *rest), 0

        @_register_vmap(f"fisnet::{bwd_bwd_name}")
        def _(info, in_dims, gg, g, x, *rest):
            (gg, g), x = slot_inputs(info, [gg, g], in_dims[:2], x, in_dims[2])
            return bwd_bwd(gg, g, x, *rest), (0, 0)

        return Backend(name, fwd, bwd, bwd_bwd)
