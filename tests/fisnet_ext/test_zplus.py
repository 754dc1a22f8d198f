"""The z⁺ ratio op family (fisnet_ext.zplus_ops): ``zplus_ratio(g, num, zp, eps) = g*num/(zp+eps)``
and its backward ``zplus_ratio_bwd``, every backend against fisnet_ext.reference on fresh random
data (poisoned outputs, odd sizes over the vector tail and the C++ parallel grain, zero
denominators), argument errors, fp64 gradcheck/gradgradcheck, opcheck, vmap and backends: the
ladder of tests/README.md, in class TestZPlus.

Families: NATIVE ("cpp" on CPU, the CUDA kernels on GPUs), TRITON (on GPUs, or on CPU under
TRITON_INTERPRET=1 with tiny shapes only: the interpreter is slow) and REFERENCE.
"""
import itertools

import pytest
import torch

import fisnet_ext
from fisnet_ext import ops, reference, zplus_ops
from fisnet_ext.zplus_ops import NATIVE, REFERENCE, TRITON

from tests.fisnet_ext.conftest import (ERRS, HAVE_CUDA, INTERPRETED, check_close as _check_close, family_cases,
                                       family_getter, poisoned, skip_no_interp as _skip_no_interp, tiny,
                                       triton_on_cpu)

TRITON_ON_CPU = triton_on_cpu(TRITON)
skip_no_interp = _skip_no_interp(TRITON)

FAMILY_CASES = family_cases(TRITON, ops.WITH_CUDA)
WITH_REFERENCE = FAMILY_CASES + [pytest.param("reference", "cpu", id="reference-cpu")]
KERNEL_FAMILIES = [pytest.param("cpp", id="cpp"), pytest.param("triton", id="triton", marks=skip_no_interp)]
GRAD_FAMILIES = KERNEL_FAMILIES + [pytest.param("reference", id="reference")]
get_family = family_getter(NATIVE, TRITON, REFERENCE)


# Odd sizes around the 4/8/16-lane vector tails, around and over the C++ grain (32768, several
# parallel chunks with a ragged last one), multi-dim and empty shapes.
SHAPES_TINY = [(), (1,), (3,), (7,), (17,), (3, 5, 7), (0, 3)]
SHAPES_BIG = [(15,), (33,), (1000,), (32767,), (32769,), (100003,), (3, 40001)]
EPSES = [0.0, 1e-2, 1.0]


def shapes_for(name, device):
    return SHAPES_TINY + ([] if tiny(name, device) else SHAPES_BIG)


def dtypes_for(device):
    dts = [torch.float32, torch.float64]
    if device == "cuda":
        dts += [torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
    return dts


def tol(dtype):
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=2e-6, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    }[dtype]


def make_inputs(shape, dtype, device, eps, n=3):
    """(gs, g, num, zp) drawn fresh: zp mostly >= 0 (as z⁺ is), some negatives, and some entries
    with zp + eps == 0 exactly (zp = -eps in the compute dtype, or 0 when eps == 0)."""
    ts = [torch.randn(shape, dtype=torch.float64) for _ in range(n - 1)]
    zp = torch.rand(shape, dtype=torch.float64) * 2
    if zp.numel():
        flat = zp.view(-1)
        flat[torch.rand(flat.shape) < 0.1] *= -1
        flat[torch.rand(flat.shape) < 0.15] = -eps
        flat[0] = -eps
    out = [t.to(dtype=dtype, device=device) for t in ts]
    zp = zp.to(dtype=dtype, device=device)
    return (*out, zp)  # in half precision -eps may round: zero_den() says where den is 0


def zero_den(zp, eps):
    acc = zp.float() if zp.dtype in (torch.float16, torch.bfloat16) else zp
    return (acc + eps) == 0


def check_close(got, want, dtype, seed, what):
    _check_close(got, want, tol(dtype), seed, what)


def check_zero_where(out, mask, what):
    vals = out[mask]
    assert bool((vals == 0).all()), f"{what}: nonzero output where zp + eps == 0: {vals[vals != 0][:5]}"


# ---------------------------------------------------------------------------------------------
# Argument errors
def _err_cases(call, op):
    t = torch.randn(3, 4, dtype=torch.float64)
    n = 3 if op == "ratio" else 4
    base = [t.clone() for _ in range(n)]
    for i in range(n):  # every argument position
        args = list(base)
        args[i] = t.float()
        with pytest.raises(ERRS, match="one dtype"):
            call(*args, 0.1)
        args = list(base)
        args[i] = torch.randn(4, 3, dtype=torch.float64)
        with pytest.raises(ERRS, match=r"has shape .*one shape"):
            call(*args, 0.1)
        args[i] = torch.randn(2, 3, 4, dtype=torch.float64)  # no broadcasting either
        with pytest.raises(ERRS, match="one shape"):
            call(*args, 0.1)
    with pytest.raises(ERRS, match="eps must be >= 0"):
        call(*base, -0.5)
    with pytest.raises(ERRS, match="eps must be >= 0"):
        call(*base, float("nan"))
    with pytest.raises(ERRS, match="floating-point"):
        call(*[torch.ones(3, 4, dtype=torch.long)] * n, 0.1)


# ---------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (fp64), zp + eps away from 0
def grad_inputs(shape=(2, 3), n=4):
    ts = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(n - 1)]
    zp = (torch.rand(shape, dtype=torch.float64) + 0.3).requires_grad_()
    return (*ts, zp)


# ---------------------------------------------------------------------------------------------
# vmap
VMAP_FAMILIES = KERNEL_FAMILIES


class TestZPlus:
    """The z⁺ ratio ladder."""

    # ---------------------------------------------------------------------------------------------
    # Kernels against the reference
    @pytest.mark.parametrize("name, device", FAMILY_CASES)
    def test_ratio_matches_reference(self, name, device, seed):
        fam = get_family(name)
        for dtype, shape, eps in itertools.product(dtypes_for(device), shapes_for(name, device), EPSES):
            g, num, zp = make_inputs(shape, dtype, device, eps)
            out = poisoned(fam.ratio, g, num, zp, eps, n_outputs=1)
            what = f"{name}.zplus_ratio {shape} eps={eps} {dtype}"
            check_close(out, reference.zplus_ratio(g, num, zp, eps), dtype, seed, what)
            mask = zero_den(zp, eps)
            check_zero_where(out, mask, what)
            if dtype == torch.float64 and mask.numel():
                want = (g * num / (zp + eps))[~mask]
                torch.testing.assert_close(out[~mask], want, rtol=1e-14, atol=0)

    @pytest.mark.parametrize("name, device", FAMILY_CASES)
    def test_ratio_bwd_matches_reference(self, name, device, seed):
        fam = get_family(name)
        for dtype, shape, eps in itertools.product(dtypes_for(device), shapes_for(name, device), EPSES):
            gs, g, num, zp = make_inputs(shape, dtype, device, eps, n=4)
            got = poisoned(fam.ratio_bwd, gs, g, num, zp, eps, n_outputs=3)
            want = reference.zplus_ratio_bwd(gs, g, num, zp, eps)
            mask = zero_den(zp, eps)
            for label, a, b in zip(("dg", "dnum", "dzp"), got, want):
                what = f"{name}.zplus_ratio_bwd {label} {shape} eps={eps} {dtype}"
                check_close(a, b, dtype, seed, what)
                check_zero_where(a, mask, what)

    def test_reference_closed_form(self):
        g = torch.tensor([2.0, 3.0, -1.0, 5.0], dtype=torch.float64)
        num = torch.tensor([1.0, 4.0, 2.0, 7.0], dtype=torch.float64)
        zp = torch.tensor([0.75, 1.75, -0.25, 3.0], dtype=torch.float64)
        gs = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
        eps = 0.25  # den = [1, 2, 0, 3.25]
        want = torch.tensor([2.0, 6.0, 0.0, 35.0 / 3.25], dtype=torch.float64)
        torch.testing.assert_close(reference.zplus_ratio(g, num, zp, eps), want, rtol=1e-15, atol=0)
        dg, dnum, dzp = reference.zplus_ratio_bwd(gs, g, num, zp, eps)
        torch.testing.assert_close(dg, torch.tensor([1.0, -4.0, 0.0, 3.5 / 3.25], dtype=torch.float64), rtol=1e-15, atol=0)
        torch.testing.assert_close(dnum, torch.tensor([2.0, -3.0, 0.0, 2.5 / 3.25], dtype=torch.float64),
                                   rtol=1e-15, atol=0)
        torch.testing.assert_close(dzp, torch.tensor([-2.0, 24.0 / 4, 0.0, -17.5 / 3.25**2], dtype=torch.float64),
                                   rtol=1e-15, atol=0)
        for fam in [NATIVE] + ([TRITON] if TRITON_ON_CPU else []):
            torch.testing.assert_close(fam.ratio(g, num, zp, eps), want, rtol=1e-15, atol=0)
            for a, b in zip(fam.ratio_bwd(gs, g, num, zp, eps), (dg, dnum, dzp)):
                torch.testing.assert_close(a, b, rtol=1e-15, atol=0)

    def test_reference_half_computes_in_float32(self, seed):
        g, num, zp = (torch.randn(60) for _ in range(3))
        for dt in (torch.float16, torch.bfloat16):
            a = [t.to(dt) for t in (g, num, zp)]
            out = reference.zplus_ratio(*a, 0.1)
            assert out.dtype == dt
            assert torch.equal(out, reference.zplus_ratio(*[t.float() for t in a], 0.1).to(dt))
            for u, v in zip(reference.zplus_ratio_bwd(a[0], *a, 0.1),
                            reference.zplus_ratio_bwd(*[t.float() for t in (a[0], *a)], 0.1)):
                assert u.dtype == dt and torch.equal(u, v.to(dt))

    @pytest.mark.parametrize("name, device", FAMILY_CASES)
    def test_noncontiguous_inputs(self, name, device, seed):
        fam = get_family(name)
        g = torch.randn(6, 5, dtype=torch.float64, device=device).t()
        num = torch.randn(5, 12, dtype=torch.float64, device=device)[:, ::2]
        zp = torch.rand(6, 5, 2, dtype=torch.float64, device=device)[..., 0].t()
        gs = torch.randn(5, 6, dtype=torch.float64, device=device)
        check_close(poisoned(fam.ratio, g, num, zp, 0.1, n_outputs=1), reference.zplus_ratio(g, num, zp, 0.1),
                    torch.float64, seed, f"{name} noncontiguous ratio")
        for a, b in zip(fam.ratio_bwd(gs, g, num, zp, 0.1), reference.zplus_ratio_bwd(gs, g, num, zp, 0.1)):
            check_close(a, b, torch.float64, seed, f"{name} noncontiguous ratio_bwd")

    @pytest.mark.parametrize("name, device", WITH_REFERENCE)
    def test_nonfinite_and_zero_denominators(self, name, device):
        """eps = 0 with zp = 0 gives 0 (no NaN from 0/0); NaN/inf inputs propagate elsewhere."""
        fam = get_family(name)
        nan, inf = float("nan"), float("inf")
        g = torch.tensor([1.0, nan, 2.0, inf, 1.0, 0.0] * 3, dtype=torch.float64, device=device)
        num = torch.tensor([0.0, 1.0, 3.0, 1.0, 2.0, 5.0] * 3, dtype=torch.float64, device=device)
        zp = torch.tensor([0.0, 1.0, 0.0, 2.0, nan, 0.0] * 3, dtype=torch.float64, device=device)
        out = fam.ratio(g, num, zp, 0.0)
        torch.testing.assert_close(out, reference.zplus_ratio(g, num, zp, 0.0), equal_nan=True)
        assert out[0] == 0 and out[2] == 0 and out[5] == 0
        assert torch.isnan(out[1]) and torch.isinf(out[3]) and torch.isnan(out[4])
        for a, b in zip(fam.ratio_bwd(g, g, num, zp, 0.0), reference.zplus_ratio_bwd(g, g, num, zp, 0.0)):
            torch.testing.assert_close(a, b, equal_nan=True)
            assert a[0] == 0 and a[2] == 0

    @pytest.mark.parametrize("name", KERNEL_FAMILIES)
    def test_argument_errors(self, name):
        fam = get_family(name)
        _err_cases(fam.ratio, "ratio")
        _err_cases(fam.ratio_bwd, "bwd")

    @pytest.mark.parametrize("backend", ["cpp", "reference", pytest.param("triton", marks=skip_no_interp)])
    def test_public_function_errors(self, backend):
        _err_cases(lambda *a: zplus_ops.zplus_ratio(*a, backend=backend), "ratio")
        _err_cases(lambda *a: zplus_ops.zplus_ratio_bwd(*a, backend=backend), "bwd")
        with pytest.raises(TypeError, match="floating-point"):
            fisnet_ext.zplus_ratio([1.0], torch.ones(1), torch.ones(1), 0.1, backend=backend)
        msg = torch.randn(2)
        with pytest.raises(ValueError, match="num has shape \\(3,\\) but g has shape \\(2,\\)"):
            fisnet_ext.zplus_ratio(msg, torch.randn(3), torch.randn(2), 0.1, backend=backend)

    @pytest.mark.parametrize("name", GRAD_FAMILIES)
    @pytest.mark.parametrize("eps", [0.0, 0.3])
    def test_gradcheck(self, name, eps, seed):
        fam = get_family(name)
        gs, g, num, zp = grad_inputs()

        def ratio(g, num, zp):
            return fam.ratio(g, num, zp, eps)

        def ratio_bwd(gs, g, num, zp):
            return fam.ratio_bwd(gs, g, num, zp, eps)

        assert torch.autograd.gradcheck(ratio, (g, num, zp))
        assert torch.autograd.gradgradcheck(ratio, (g, num, zp))
        assert torch.autograd.gradcheck(ratio_bwd, (gs, g, num, zp))
        assert torch.autograd.gradgradcheck(ratio_bwd, (gs, g, num, zp))  # third derivatives of the ratio

    def test_gradcheck_detects_a_wrong_derivative(self):
        class Wrong(torch.autograd.Function):
            @staticmethod
            def forward(ctx, g, num, zp):
                ctx.save_for_backward(g, num, zp)
                return NATIVE.ratio(g, num, zp, 0.3)

            @staticmethod
            def backward(ctx, grad):
                dg, dn, dz = NATIVE.ratio_bwd(grad, *ctx.saved_tensors, 0.3)
                return dg, dn, 0.5 * dz

        assert not torch.autograd.gradcheck(Wrong.apply, grad_inputs(n=3), raise_exception=False)

    @pytest.mark.parametrize("backend", ["cpp", "reference", pytest.param("triton", marks=skip_no_interp)])
    def test_public_function_matches_plain_torch_to_second_order(self, backend, seed):
        """zplus_ratio inside a small graph: value, gradient and a gradient of the gradient equal
        those of the plain expression g * num / (zp + eps)."""
        eps = 0.05
        W = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        a = torch.rand(3, 5, dtype=torch.float64)
        g = torch.randn(3, 4, dtype=torch.float64)

        def run(ratio):
            z = a @ W.t()
            zp = a @ W.clamp(min=0).t() + 0.1
            s = ratio(g * z.tanh(), z, zp)
            (dW,) = torch.autograd.grad((s ** 2).sum(), W, create_graph=True)
            (ddW,) = torch.autograd.grad((dW * dW.sin()).sum(), W)
            return s, dW, ddW

        got = run(lambda g, n, z: fisnet_ext.zplus_ratio(g, n, z, eps, backend=backend))
        want = run(lambda g, n, z: g * n / (z + eps))
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)

    # ---------------------------------------------------------------------------------------------
    # opcheck and fake kernels
    @pytest.mark.parametrize("name", KERNEL_FAMILIES)
    @pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
    def test_opcheck(self, name, requires_grad, seed):
        fam = get_family(name)
        gs, g, num, zp = (t.detach().requires_grad_(requires_grad) for t in grad_inputs((3, 4)))
        torch.library.opcheck(fam.ratio, (g, num, zp, 0.1))
        torch.library.opcheck(fam.ratio, (g, num, zp, 0.0))
        torch.library.opcheck(fam.ratio_bwd, (gs, g, num, zp, 0.1))
        f32 = [t.detach().float().requires_grad_(requires_grad) for t in (gs, g, num, zp)]
        torch.library.opcheck(fam.ratio, (*f32[1:], 0.1))
        torch.library.opcheck(fam.ratio_bwd, (*f32, 0.1))

    def test_fake_kernels_propagate_shapes(self):
        t = torch.empty(5, 3, 4, device="meta")
        for fam in [NATIVE] + ([TRITON] if TRITON is not None else []):
            assert fam.ratio(t, t, t, 0.1).shape == (5, 3, 4)
            outs = fam.ratio_bwd(t, t, t, t, 0.1)
            assert len(outs) == 3 and all(o.shape == (5, 3, 4) for o in outs)
            with pytest.raises(Exception, match="one shape"):
                fam.ratio(t, torch.empty(5, 4, 3, device="meta"), t, 0.1)

    @pytest.mark.parametrize("name", VMAP_FAMILIES)
    def test_vmap_equals_loop(self, name, seed):
        fam = get_family(name)
        eps, B, shape = 0.2, 3, (2, 5)
        batched = [torch.randn(B, *shape, dtype=torch.float64) for _ in range(4)]
        batched[3] = batched[3].abs() + 0.1
        single = [torch.randn(shape, dtype=torch.float64) for _ in range(4)]
        single[3] = single[3].abs() + 0.1
        for n_args, op in ((3, fam.ratio), (4, fam.ratio_bwd)):
            for which in itertools.product([False, True], repeat=n_args):
                if not any(which):
                    continue
                args = [batched[i + 4 - n_args] if w else single[i + 4 - n_args] for i, w in enumerate(which)]
                dims = [0 if w else None for w in which]
                loop = [op(*[a[b] if d is not None else a for a, d in zip(args, dims)], eps) for b in range(B)]
                got = torch.vmap(lambda *a: op(*a, eps), in_dims=tuple(dims))(*args)
                if n_args == 3:
                    torch.testing.assert_close(got, torch.stack(loop), rtol=1e-13, atol=0)
                else:
                    for k in range(3):
                        torch.testing.assert_close(got[k], torch.stack([l[k] for l in loop]), rtol=1e-13, atol=0)
                # batch dim not in front (and the op's own dims under a second vmap level)
                moved = [a.movedim(0, 2) if d is not None else a for a, d in zip(args, dims)]
                got2 = torch.vmap(lambda *a: op(*a, eps), in_dims=tuple(2 if d is not None else None for d in dims))(*moved)
                torch.testing.assert_close(got2, got, rtol=1e-13, atol=0)
        # nested vmap
        G = torch.randn(2, B, *shape, dtype=torch.float64)
        nested = torch.vmap(torch.vmap(lambda g: fam.ratio(g, single[1], single[3], eps)))(G)
        torch.testing.assert_close(nested, reference.zplus_ratio(G, single[1].expand_as(G), single[3].expand_as(G), eps),
                                   rtol=1e-13, atol=0)

    @pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=skip_no_interp)])
    def test_is_grads_batched_equals_loop(self, backend, seed):
        g, num, zp = grad_inputs((3, 4), n=3)
        s = fisnet_ext.zplus_ratio(g, num, zp, 0.1, backend=backend)
        seeds = torch.randn(5, 3, 4, dtype=torch.float64)
        batched = torch.autograd.grad(s, (g, num, zp), seeds, retain_graph=True, is_grads_batched=True)
        for i in range(5):
            loop = torch.autograd.grad(s, (g, num, zp), seeds[i], retain_graph=True)
            for a, b in zip(batched, loop):
                torch.testing.assert_close(a[i], b, rtol=1e-13, atol=0)

    # ---------------------------------------------------------------------------------------------
    # backends
    def test_backend_selection(self, seed):
        cpu = torch.device("cpu")
        assert zplus_ops.zplus_family(cpu, "cpp") is NATIVE
        assert zplus_ops.zplus_family(cpu, "auto") is NATIVE
        assert zplus_ops.zplus_family(cpu, "reference") is REFERENCE
        if TRITON is not None:
            assert zplus_ops.zplus_family(cpu, "triton") is TRITON
        with fisnet_ext.use_backend("reference"):
            assert zplus_ops.zplus_family(cpu) is REFERENCE
        g, num, zp = grad_inputs((3, 7), n=3)
        res = {}
        for name in ("reference", "cpp", "auto") + (("triton",) if TRITON_ON_CPU else ()):
            with fisnet_ext.use_backend(name):
                s = fisnet_ext.zplus_ratio(g, num, zp, 0.2)
                res[name] = (s, *torch.autograd.grad(s.sum(), (g, num, zp)))
        for name, r in res.items():
            for a, b in zip(r, res["reference"]):
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=name)

    def test_backend_errors(self, monkeypatch):
        t = torch.randn(4, dtype=torch.float64)
        with pytest.raises(ValueError, match="unknown fisnet backend 'nope'"):
            fisnet_ext.zplus_ratio(t, t, t, 0.1, backend="nope")
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            fisnet_ext.zplus_ratio(t, t, t, 0.1, backend="cuda")
        if not HAVE_CUDA:
            with pytest.raises(RuntimeError, match="CPU tensors only"):
                zplus_ops.zplus_family(torch.device("cuda"), "cpp")
        monkeypatch.setenv("FISNET_BACKEND", "reference")
        assert zplus_ops.zplus_family(torch.device("cpu")) is REFERENCE
