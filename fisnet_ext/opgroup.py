"""One template for every fisnet op group: lrp_relu, lrp_act, zplus_ratio and bn_train_bwd.

An op group is a short chain of custom ops on one backend, each op's derivative being the next
op of the chain:

* the element-wise groups (lrp_relu in ops.py, lrp_act in act_ops.py; `elementwise`):
  ``<fwd>(x, *P)``, ``<bwd>(g, x, *P, eps)``, ``<bwd_bwd>(gg, g, x, *P, eps)``, where g may carry
  leading "slot" dims over x's shape and P are the group's non-tensor parameters;
* zplus_ratio (zplus_ops.py): ``zplus_ratio(g, num, zp, eps)``, ``zplus_ratio_bwd(gs, g, num, zp, eps)``;
* bn_train_bwd (bn_ops.py): ``bn_train_bwd(g, x, w, eps)``, ``bn_train_bwd_bwd(h, g, x, w, eps)``.

Each op is described by an `Op` (its name, schema, reference function, fake kernel, vmap rule and
derivative); `OpGroup` then does, in one place, what every group needs:

* the schemas, with the reference as the kernels, when the C++ extension is missing;
* the Triton twins ``<op>_triton`` as custom ops around the Triton launchers;
* fake (meta) kernels, autograd and vmap rules, registered for the native and the Triton ops
  alike.  Autograd: an op's derivative is the next op of the chain (``Op.grad = NEXT``, with an
  optional `finish` step, e.g. summing slot dims), a function of the saved tensors (``Op.grad =
  callable``: the forward's ordinary derivative, a closed-form third derivative) or, by default,
  autograd through the reference's differentiable version of the op (third and higher
  derivatives);
* backend choice (`OpGroup.choose`, one rule and one set of errors for every group);
* the Python argument checks shared by the public functions and the Triton launchers
  (`check_slot_args`, `check_tensors`, `check_eps`); the C++ kernels check in
  csrc/fisnet_common.h.

This module also loads the C++ extension (`HAVE_C`, `C_ERROR`, `WITH_CUDA`), so that every op
module can import it without an import cycle.  The vmap rules in use (`vmap_pointwise`,
`vmap_slots`, `vmap_expand`, `vmap_loop`) are here too.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, make_dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .backend import current_backend

try:
    from . import _C  # noqa: F401  (registers the schemas and the C++ kernels)

    HAVE_C = True
    C_ERROR: Optional[str] = None
    WITH_CUDA = bool(_C.with_cuda)
except ImportError as exc:  # extension not built: each group defines its schemas, reference kernels
    HAVE_C = False
    C_ERROR = str(exc)
    WITH_CUDA = False

HAVE_TRITON = importlib.util.find_spec("triton") is not None

NEXT = "next"  # Op.grad: the derivative is the next op of the chain


# ---- small shared pieces -----------------------------------------------------------------------
def register_vmap(name):
    """torch.library.register_vmap where this torch has it; otherwise a no-op (batched heatmaps
    of several maps per image then need a torch with it)."""
    if hasattr(torch.library, "register_vmap"):
        return torch.library.register_vmap(name)
    return lambda fn: fn


def front(t: torch.Tensor, d: Optional[int], n: int) -> torch.Tensor:
    """A vmap argument with its batch dim `d` moved to the front (expanded when unbatched)."""
    return t.unsqueeze(0).expand(n, *t.shape) if d is None else t.movedim(d, 0)


def sum_slots(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reduce a gradient with leading slot dims to x's shape."""
    extra = t.dim() - x.dim()
    return t.sum(dim=tuple(range(extra))) if extra > 0 else t


def _dims0(out):
    """vmap out_dims: batch dim 0 for one output or for each of several."""
    return 0 if isinstance(out, torch.Tensor) else (0,) * len(out)


# ---- the Python argument checks ----------------------------------------------------------------
def check_slot_args(op: str, g: torch.Tensor, x: torch.Tensor, eps: float, gg: Optional[torch.Tensor] = None) -> None:
    """The Python twin of csrc/fisnet_common.h's check_slot_args / check_slot_args2."""
    if not x.is_floating_point():
        raise TypeError(f"fisnet: x must be a floating-point tensor, got {x.dtype}")
    if g.dtype != x.dtype:
        raise TypeError(f"fisnet.{op}: g is {g.dtype} but x is {x.dtype}; pass tensors of one dtype")
    if g.device != x.device:
        raise ValueError(f"fisnet.{op}: g is on {g.device} but x is on {x.device}")
    check_eps(op, eps)
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


def check_eps(op: str, eps) -> float:
    """eps as a float; a ValueError unless eps >= 0 (NaN included)."""
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"fisnet.{op}: eps must be >= 0, got {eps}")
    return eps


def check_tensors(op: str, ref: Optional[str] = None, same_shape: bool = False, any_dtype: Sequence[str] = (),
                  **tensors) -> None:
    """Each argument a floating-point tensor, all of the dtype (but those named in `any_dtype`) and
    device of the one named `ref` (default: the first); with `same_shape`, of its shape too."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"fisnet.{op}: {name} must be a floating-point tensor, got {type(t).__name__}"
                            + (f" of dtype {t.dtype}" if isinstance(t, torch.Tensor) else ""))
    ref = ref or next(iter(tensors))
    r = tensors[ref]
    for name, t in tensors.items():
        if t.dtype != r.dtype and name not in any_dtype:
            raise TypeError(f"fisnet.{op}: {name} is {t.dtype} but {ref} is {r.dtype}; pass tensors of one dtype")
        if t.device != r.device:
            raise ValueError(f"fisnet.{op}: {name} is on {t.device} but {ref} is on {r.device}")
        if same_shape and t.shape != r.shape:
            raise ValueError(f"fisnet.{op}: {name} has shape {tuple(t.shape)} but {ref} has shape "
                             f"{tuple(r.shape)}; all tensors must have one shape")


# ---- vmap rules: rule(op, info, in_dims, *args) -> (output, out_dims) ------------------------------
def vmap_pointwise(op, info, in_dims, x, *params):
    """An element-wise op of one tensor: the batch dim stays where it is."""
    return op(x, *params), in_dims[0]


def vmap_slots(n_maps: int):
    """The first `n_maps` tensors (g, or gg and g) are maps over the next one, x: a batched map
    becomes a leading slot dim and x stays unbatched (no copy of x per seed); a batched x is
    materialised to the maps' batched shape."""

    def rule(op, info, in_dims, *args):
        n = info.batch_size
        maps = [front(t, d, n) for t, d in zip(args[:n_maps], in_dims[:n_maps])]
        x, xd = args[n_maps], in_dims[n_maps]
        if xd is not None:
            x = x.movedim(xd, 0)
            extra = maps[0].dim() - x.dim()
            x = x.reshape(x.shape[:1] + (1,) * extra + x.shape[1:]).expand(maps[0].shape).contiguous()
        out = op(*maps, x, *args[n_maps + 1:])
        return out, _dims0(out)

    return rule


def vmap_expand(n_tensors: int):
    """Every tensor argument may be batched; the unbatched ones are expanded to the batch."""

    def rule(op, info, in_dims, *args):
        ts = [front(t, d, info.batch_size) for t, d in zip(args[:n_tensors], in_dims[:n_tensors])]
        out = op(*ts, *args[n_tensors:])
        return out, _dims0(out)

    return rule


def vmap_loop(n_tensors: int):
    """One call per batch entry, stacked."""

    def rule(op, info, in_dims, *args):
        n = info.batch_size
        ts = [front(t, d, n) for t, d in zip(args[:n_tensors], in_dims[:n_tensors])]
        parts = [op(*(t[i] for t in ts), *args[n_tensors:]) for i in range(n)]
        if isinstance(parts[0], torch.Tensor):
            return torch.stack(parts), 0
        out = tuple(torch.stack([p[k] for p in parts]) for k in range(len(parts[0])))
        return out, _dims0(out)

    return rule


# ---- one op, one group -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    """One op of a group.

    field:      its attribute on a backend of the group (``fam.bwd``, ``fam.ratio``)
    name:       the op name in the ``fisnet`` namespace (schema in csrc/fisnet_ops.cpp)
    schema:     its schema text, ``"(Tensor g, Tensor x, float eps) -> Tensor"`` (used for the Triton
                twin and for the fallback when the extension is missing)
    reference:  the pure-PyTorch function with the op's signature, in differentiable torch ops
    fake:       the fake (meta) kernel
    vmap:       a vmap rule ``rule(op, info, in_dims, *args) -> (out, out_dims)``
    n_tensors:  how many leading arguments are tensors (the rest are non-tensor parameters)
    grad:       the derivative: `NEXT` (the next op of the chain, called as
                ``next(grad, *tensors, *params)``), a function ``grad(saved, params, *cotangents) ->
                tensor grads``, or None (autograd through `reference`)
    finish:     with `NEXT`: ``finish(grads, saved) -> grads`` (e.g. sum x's gradient over slots)
    """

    field: str
    name: str
    schema: str
    reference: Callable
    fake: Callable
    vmap: Callable
    n_tensors: int
    grad: Union[str, Callable, None] = None
    finish: Optional[Callable] = None


def reference_grad(reference: Callable, saved, params, cotangents):
    """Autograd of an op through its reference (third and higher derivatives): the vector-Jacobian
    product of `reference`, written in differentiable torch ops.  When a graph is being built
    (create_graph=True) the saved tensors enter it as they are, so every further order is exact."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        ins = [t if (create and t.requires_grad) else t.detach().requires_grad_() for t in saved]
        outs = reference(*ins, *params)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        cots = [torch.zeros_like(o) if c is None else c for o, c in zip(outs, cotangents)]
        return torch.autograd.grad(outs, ins, cots, create_graph=create, allow_unused=True, materialize_grads=True)


class OpGroup:
    """An op group (see the module docstring): `native`, `triton_ops` (None without Triton) and
    `reference_ops` are its backends, each a `Backend` with one attribute per op.

    kind:    the name of the group's Backend class (``"Family"``, ``"BNFamily"``, ...)
    ops:     the `Op`s of the chain, in order
    triton:  a function returning the Triton launchers, one per op in order (imported lazily:
             importing triton is slow), or None
    """

    def __init__(self, kind: str, ops: Sequence[Op], triton: Optional[Callable] = None):
        self.ops = tuple(ops)
        self.Backend = make_dataclass(kind, ["name"] + [op.field for op in self.ops], frozen=True)
        self.Backend.__doc__ = f"The ops of one backend of the group {', '.join(op.name for op in self.ops)}."
        if not HAVE_C:
            self._define_fallback()
        self.native = self._register("native", [op.name for op in self.ops])
        self.triton_ops = None
        if HAVE_TRITON and triton is not None:
            tnames = [f"{op.name}_triton" for op in self.ops]
            for i, (name, op) in enumerate(zip(tnames, self.ops)):
                torch.library.define(f"fisnet::{name}", op.schema)
                torch.library.impl(f"fisnet::{name}", ("CPU", "CUDA"))(_launch(triton, i))
            self.triton_ops = self._register("triton", tnames)
        self.reference_ops = self.Backend("reference", *[op.reference for op in self.ops])

    def _define_fallback(self):
        """Without fisnet_ext._C: the schemas here, with the reference as the CPU/CUDA kernels."""
        lib = torch.library.Library("fisnet", "FRAGMENT")
        for op in self.ops:
            lib.define(op.name + op.schema)
            for key in ("CPU", "CUDA"):
                lib.impl(op.name, op.reference, key)
        self._fallback_lib = lib  # keep the registrations alive

    def choose(self, device, backend: Optional[str] = None):
        """The group's backend that runs on `device` under `backend` (default: the current
        backend, `fisnet_ext.backend.current_backend()`)."""
        key = choose_backend(torch.device(device), backend)
        return {"native": self.native, "triton": self.triton_ops, "reference": self.reference_ops}[key]

    def _register(self, label: str, names: list):
        fns = [getattr(torch.ops.fisnet, name).default for name in names]
        for i, (op, name, fn) in enumerate(zip(self.ops, names, fns)):
            qual = f"fisnet::{name}"
            torch.library.register_fake(qual)(op.fake)
            nxt = fns[i + 1] if i + 1 < len(fns) else None
            torch.library.register_autograd(qual, _backward(op, nxt), setup_context=_setup(op.n_tensors))
            register_vmap(qual)(_vmap_rule(op.vmap, fn))
        return self.Backend(label, *fns)


def _launch(triton: Callable, i: int) -> Callable:
    return lambda *args: triton()[i](*args)


def _setup(k: int) -> Callable:
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:k])
        ctx.params = tuple(inputs[k:])

    return setup_context


def _backward(op: Op, nxt: Optional[Callable]) -> Callable:
    if op.grad == NEXT and nxt is None:
        raise ValueError(f"fisnet: op {op.name} has grad=NEXT but is the last op of its group")

    def backward(ctx, *cotangents):
        saved = ctx.saved_tensors
        if op.grad == NEXT:
            grads = nxt(*cotangents, *saved, *ctx.params)
            if op.finish is not None:
                grads = op.finish(grads, saved)
        elif op.grad is None:
            grads = reference_grad(op.reference, saved, ctx.params, cotangents)
        else:
            grads = op.grad(saved, ctx.params, *cotangents)
        return tuple(grads) + (None,) * len(ctx.params)

    return backward


def _vmap_rule(rule: Callable, fn: Callable) -> Callable:
    return lambda info, in_dims, *args: rule(fn, info, in_dims, *args)


# ---- backend choice ----------------------------------------------------------------------------------
def choose_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """Which backend of a group runs on `device` under `backend` (default: the current backend):
    "native" (the C++/CUDA kernels), "triton" or "reference"; the errors name the fix."""
    name = backend or current_backend()
    is_cuda = device.type == "cuda"
    if name == "auto":
        if not is_cuda:
            return "native" if device.type == "cpu" else "reference"
        if WITH_CUDA:
            return "native"
        return "triton" if HAVE_TRITON else "reference"
    if name == "reference":
        return "reference"
    if name == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("fisnet backend 'triton' was asked for but triton is not installed: pip install triton")
        return "triton"
    if name == "cpp":
        if is_cuda:
            raise RuntimeError("fisnet backend 'cpp' runs on CPU tensors only; use 'cuda' or 'triton' for GPU tensors")
        return "native"
    if name == "cuda":
        if not is_cuda:
            raise RuntimeError("fisnet backend 'cuda' runs on CUDA tensors only; use 'cpp' for CPU tensors")
        if not WITH_CUDA:
            raise RuntimeError(
                "fisnet backend 'cuda' was asked for but the CUDA kernels are not built: reinstall with "
                "FISNET_CUDA=1 pip install --no-build-isolation -e . (needs a CUDA build of torch and nvcc)"
            )
        return "native"
    raise ValueError(f"unknown fisnet backend {name!r}")


# ---- the element-wise groups -------------------------------------------------------------------------
def _fake_fwd(x, *params):
    return torch.empty_like(x)


def _fake_bwd(g, x, *rest):
    torch._check(g.dim() >= x.dim() and tuple(g.shape[g.dim() - x.dim():]) == tuple(x.shape),
                 lambda: f"g of shape {tuple(g.shape)} must end with x's shape {tuple(x.shape)}")
    return torch.empty_like(g)


def _fake_bwd_bwd(gg, g, x, *rest):
    torch._check(gg.shape == g.shape, lambda: f"gg {tuple(gg.shape)} and g {tuple(g.shape)} differ")
    return torch.empty_like(g), torch.empty_like(g)


def _sum_x_over_slots(grads, saved):
    d_g, d_x = grads
    return d_g, sum_slots(d_x, saved[1])


def elementwise(kind: str, names: Sequence[str], params: str, reference: Sequence[Callable], fwd_grad: Callable,
                triton: Optional[Callable] = None, bwd_bwd_grad: Optional[Callable] = None) -> OpGroup:
    """An element-wise group with slots: ops ``names = (fwd, bwd, bwd_bwd)``.

    params:        schema text of the non-tensor parameters P, e.g. ``"int kind, float param"``
    reference:     (fwd, bwd, bwd_bwd) pure-PyTorch functions with the ops' signatures
    fwd_grad:      ``fwd_grad(grad, x, *P)``: the forward's ordinary derivative (differentiable)
    bwd_bwd_grad:  ``(saved=(gg, g, x), params, a, b) -> (d_gg, d_g, d_x)``, the bwd_bwd op's own
                   derivative; None: autograd through the reference's bwd_bwd
    """
    fwd, bwd, bwd_bwd = names
    p = (", " + params) if params else ""
    return OpGroup(kind, [
        Op("fwd", fwd, f"(Tensor x{p}) -> Tensor", reference[0], _fake_fwd, vmap_pointwise, 1,
           grad=lambda saved, P, grad: (fwd_grad(grad, saved[0], *P),)),
        Op("bwd", bwd, f"(Tensor g, Tensor x{p}, float eps) -> Tensor", reference[1], _fake_bwd, vmap_slots(1), 2,
           grad=NEXT, finish=_sum_x_over_slots),
        Op("bwd_bwd", bwd_bwd, f"(Tensor gg, Tensor g, Tensor x{p}, float eps) -> (Tensor, Tensor)", reference[2],
           _fake_bwd_bwd, vmap_slots(2), 3, grad=bwd_bwd_grad),
    ], triton)
