"""The lrp_act op family (fisnet_ext/act_ops.py): element-wise activations with the identity-rule
heatmap backward.

The ladder of tests/README.md (as for lrp_relu), in class TestAct: every kind x (C++ kernels and Triton kernels against
the reference on fresh random data with exact zeros, negatives and the kinks; outputs poisoned
first), the forward against torch.nn.functional, the factor against a direct formula, fp64
gradcheck / gradgradcheck in both switch modes, opcheck, vmap, the Dual ISNet slots, and an
oracle: the heatmap gradient equals gradient x input of the same network in which each
activation is replaced by z * gate(z).detach(), gate = φ(z) / (z + ε sign z), written here from
torch.nn.functional alone.  Triton runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py
sets it before triton is imported), tiny shapes only.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fisnet_ext
from fisnet_ext import act_ops, reference
from fisnet_ext.act_ops import KINDS, NATIVE, REFERENCE, TRITON

from tests.fisnet_ext.conftest import INTERPRETED, check_close as _check_close, poisoned, skip_no_interp

KIND_NAMES = list(KINDS)
PARAMS = {"leaky_relu": 0.13, "elu": 1.7, "softplus": 1.6}  # non-default values, to catch an ignored param


pytestmark = pytest.mark.usefixtures("one_thread")


def param_of(kind):
    return PARAMS.get(kind, 0.0)


def torch_phi(kind, z, p):
    """φ from torch.nn.functional (independent of fisnet_ext)."""
    return {
        "relu": lambda: F.relu(z),
        "relu6": lambda: F.relu6(z),
        "leaky_relu": lambda: F.leaky_relu(z, p),
        "gelu": lambda: F.gelu(z),
        "gelu_tanh": lambda: F.gelu(z, approximate="tanh"),
        "silu": lambda: F.silu(z),
        "hardswish": lambda: F.hardswish(z),
        "elu": lambda: F.elu(z, p),
        "mish": lambda: F.mish(z),
        "softplus": lambda: F.softplus(z, p, 20.0),
    }[kind]()


def same(a, b):
    """Equal values (signed zeros alike: torch.equal tells -0.0 from 0.0)."""
    return torch.equal(a + 0.0, b + 0.0)


def sgn(z):
    """sign z with sign 0 = +1, in z's dtype."""
    return torch.where(z < 0, -torch.ones_like(z), torch.ones_like(z))


def epses(kind):
    return [1e-2, 0.7] if kind == "softplus" else [0.0, 1e-2, 0.7]


# the kinks and thresholds of the kinds, hit exactly
SPECIAL = [0.0, -0.0, 6.0, 3.0, -3.0, 20.0 / 1.6, 12.5, -1e-9, 1e-9, -0.03, 0.04, 30.0, -30.0, -100.0, 100.0]


def make_x(shape, dtype, zero_frac=0.15):
    x = torch.randn(shape, dtype=torch.float64) * 3
    if x.numel():
        flat = x.view(-1)
        x[torch.rand(shape) < zero_frac] = 0.0
        flat[0] = 0.0
        k = min(len(SPECIAL), flat.numel() - 1)
        if k > 0:
            flat[1:1 + k] = torch.tensor(SPECIAL[:k], dtype=torch.float64)
    return x.to(dtype)


TOL = {torch.float64: dict(rtol=1e-11, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
if torch.cuda.is_available():  # --use_fast_math CUDA kernels and Triton's approximate fp32 exp
    TOL[torch.float32] = dict(rtol=1e-4, atol=1e-5)


def check_close(got, want, dtype, seed, what):
    _check_close(got, want, TOL[dtype], seed, what)


FAMILIES = [
    pytest.param("cpp", id="cpp"),
    pytest.param("triton", id="triton-interpreter", marks=skip_no_interp(TRITON)),
]
# on a GPU machine: the CUDA kernels (built with FISNET_CUDA=1) and Triton on CUDA tensors
GPU_FAMILIES = [
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not fisnet_ext.WITH_CUDA, reason="CUDA kernels not built")]),
    pytest.param("triton-gpu", id="triton-cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        TRITON is None, reason="triton not installed")]),
]


def family(name):
    return {"cpp": NATIVE, "triton": TRITON, "cuda": NATIVE, "triton-gpu": TRITON}[name]


def device_of(name):
    return "cuda" if name in ("cuda", "triton-gpu") else "cpu"


def shape_cases(name):
    if name == "triton":
        return [((), ()), ((33,), ()), ((3, 7), (2,)), ((0, 3), ()), ((4,), (0,))]
    return [((), ()), ((33,), ()), ((3, 7), (2,)), ((5, 5), (2, 3)), ((40001,), (3,)), ((0, 3), ()), ((4,), (0,))]


# ---- oracle: gradient x input of the network with detached gates -------------------------------
def _net(seed_gen, dtype=torch.float64, din=6, dh=9, dout=3):
    w1 = torch.randn(dh, din, dtype=dtype, generator=seed_gen)
    b1 = torch.randn(dh, dtype=dtype, generator=seed_gen) * 0.5
    w2 = torch.randn(dout, dh, dtype=dtype, generator=seed_gen)
    w0 = torch.randn(din, din, dtype=dtype, generator=seed_gen)
    return w0, w1, b1, w2


def _forward(params, x, act):
    w0, w1, b1, w2 = params
    h0 = x @ w0.T
    return act(act(h0) @ w1.T + b1) @ w2.T  # two activations in a row (the second sees the first)


# ---- fp64 gradcheck / gradgradcheck -------------------------------------------------------------
def away_from_kinks(n, kind, gen):
    """Points where φ and the factor are smooth (finite differences across a kink are not)."""
    z = torch.randn(n, dtype=torch.float64, generator=gen) * 3
    kinks = torch.tensor([0.0, 6.0, 3.0, -3.0, 20.0 / PARAMS["softplus"]], dtype=torch.float64)
    near = (z[:, None] - kinks).abs().min(1).values < 0.05
    return torch.where(near, z + 0.2, z)


class TestAct:
    """The lrp_act ladder, every activation kind."""

    # ---- kernels against the reference ------------------------------------------------------------
    @pytest.mark.parametrize("fam", FAMILIES + GPU_FAMILIES)
    @pytest.mark.parametrize("kind", KIND_NAMES)
    def test_kernels_match_reference(self, fam, kind, seed):
        ops = family(fam)
        dev = device_of(fam)
        code, p = KINDS[kind], param_of(kind)
        for (xshape, slots), dtype in itertools.product(shape_cases(fam), [torch.float32, torch.float64]):
            x = make_x(xshape, dtype).to(dev)
            g = torch.randn(tuple(slots) + tuple(xshape), dtype=dtype).to(dev)
            gg = torch.randn_like(g)
            what = f"{fam} {kind} x{tuple(xshape)} slots{tuple(slots)} {dtype}"
            if not slots:
                check_close(poisoned(ops.fwd, x, code, p, n_outputs=1, like=x), reference.act_fwd(x, code, p), dtype, seed,
                            what + " fwd")
            for eps in epses(kind):
                got = poisoned(ops.bwd, g, x, code, p, eps, n_outputs=1, like=g)
                check_close(got, reference.act_bwd(g, x, code, p, eps), dtype, seed, f"{what} eps={eps} bwd")
                dg, dx = poisoned(ops.bwd_bwd, gg, g, x, code, p, eps, n_outputs=2, like=g)
                rdg, rdx = reference.act_bwd_bwd(gg, g, x, code, p, eps)
                check_close(dg, rdg, dtype, seed, f"{what} eps={eps} bwd_bwd d/dg")
                check_close(dx, rdx, dtype, seed, f"{what} eps={eps} bwd_bwd d/dx")

    @pytest.mark.parametrize("kind", KIND_NAMES)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_forward_is_pytorchs(self, kind, dtype, seed):
        x = make_x((2000,), dtype)
        p = param_of(kind)
        want = torch_phi(kind, x, p)
        for backend in ["cpp", "reference"] + (["triton"] if TRITON is not None and INTERPRETED else []):
            xx = x[:64] if backend == "triton" else x
            got = fisnet_ext.lrp_act(xx, kind, 0.1, backend=backend, param=p)
            ulp = torch.finfo(dtype).eps
            # fp32: PyTorch's own F.gelu is up to ~10 ulp(1) off the exact value near z = -3 (1 + erf)
            torch.testing.assert_close(got, want[:xx.numel()], rtol=8 * ulp, atol=(8 if dtype == torch.float64 else 16) * ulp,
                                       msg=lambda m: f"{backend} {kind} (seed {seed}): {m}")
        # C++: the piecewise-linear kinds' own loop and PyTorch's kernels for the others: bit-equal
        assert torch.equal(fisnet_ext.lrp_act(x, kind, 0.1, backend="cpp", param=p), want)

    def test_forward_propagates_nan(self):
        x = torch.tensor([float("nan"), 1.0, -1.0])
        for kind in KIND_NAMES:
            y = fisnet_ext.lrp_act(x, kind, 0.1, backend="cpp")
            assert torch.isnan(y[0]) and not torch.isnan(y[1:]).any(), kind

    # ---- the factor against a direct formula (independent of the kernels' product form) -----------
    @pytest.mark.parametrize("kind", KIND_NAMES)
    def test_factor_is_phi_over_stabilised_z(self, kind, seed):
        p = param_of(kind)
        z = (torch.randn(3000, dtype=torch.float64) * 4)
        z = z[(z.abs() > 1e-3) & ((z - 6).abs() > 1e-6) & ((z.abs() - 3).abs() > 1e-6)].requires_grad_()
        for eps in epses(kind):
            direct = torch_phi(kind, z, p) / (z + eps * sgn(z))
            (ddirect,) = torch.autograd.grad(direct.sum(), z)
            h, hp = reference.act_factor(z.detach(), KINDS[kind], p, eps)
            torch.testing.assert_close(h, direct.detach(), rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(hp, ddirect, rtol=1e-9, atol=1e-10, msg=lambda m: f"{kind} eps={eps}: {m}")
            g = torch.randn_like(h)
            got = fisnet_ext.act_ops.act_bwd(g, z.detach(), kind, eps, backend="cpp", param=p)
            torch.testing.assert_close(got, g * direct.detach(), rtol=1e-12, atol=1e-13)

    @pytest.mark.parametrize("kind", [k for k in KIND_NAMES if k != "softplus"])
    def test_eps_zero_at_zero_is_pytorchs_derivative(self, kind):
        """φ(z)/z at z = 0 (0/0) is defined as PyTorch's φ'(0); with eps > 0, h(0) = φ(0)/eps = 0."""
        p = param_of(kind)
        z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        (d0,) = torch.autograd.grad(torch_phi(kind, z, p).sum(), z)
        g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        for backend in ["cpp", "reference"]:
            got = fisnet_ext.act_ops.act_bwd(g, z.detach(), kind, 0.0, backend=backend, param=p)
            torch.testing.assert_close(got, g * d0, rtol=5e-16, atol=0, msg=lambda m: f"{kind} {backend}: {m}")
            got = fisnet_ext.act_ops.act_bwd(g, z.detach(), kind, 0.1, backend=backend, param=p)
            assert torch.equal(got, torch.zeros_like(g)), (kind, backend)

    def test_elu_double_backward_near_zero_without_eps(self):
        """h'(z) = d/dz (α expm1(z)/z) near 0 with eps = 0: the series branch, no cancellation."""
        z = torch.tensor([-1e-7, -1e-4, -0.049, -0.051, -0.24, -0.26, -0.5], dtype=torch.float64)
        want = torch.tensor([sum((m + 1) * zz**m / math.factorial(m + 2) for m in range(30)) for zz in z.tolist()],
                            dtype=torch.float64) * 1.7
        g = torch.ones_like(z)
        _, dx = torch.ops.fisnet.act_bwd_bwd(g, g, z, KINDS["elu"], 1.7, 0.0)
        torch.testing.assert_close(dx, want, rtol=1e-12, atol=0)
        zf = z.float()
        _, dxf = torch.ops.fisnet.act_bwd_bwd(g.float(), g.float(), zf, KINDS["elu"], 1.7, 0.0)
        torch.testing.assert_close(dxf, want.float(), rtol=1e-5, atol=0)

    # ---- the switch: ordinary backward is PyTorch's, heatmap backward the factor ------------------
    @pytest.mark.parametrize("kind", KIND_NAMES)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_switch_off_is_pytorchs_gradient(self, kind, dtype, seed):
        p = param_of(kind)
        x = make_x((500,), dtype).requires_grad_()
        g = torch.randn(500, dtype=dtype)
        sw = fisnet_ext.HeatmapSwitch()
        (got,) = torch.autograd.grad(fisnet_ext.lrp_act(x, kind, 0.1, sw, param=p), x, g)
        (want,) = torch.autograd.grad(torch_phi(kind, x, p), x, g)
        assert torch.equal(got, want), f"{kind}: {(got - want).abs().max()}"
        # second order (a training step's double backward): equal to PyTorch's too
        (g1,) = torch.autograd.grad(fisnet_ext.lrp_act(x, kind, 0.1, sw, param=p), x, g, create_graph=True)
        (w1,) = torch.autograd.grad(torch_phi(kind, x, p), x, g, create_graph=True)
        if w1.requires_grad:
            (g2,) = torch.autograd.grad((g1 * g1).sum(), x)
            (w2,) = torch.autograd.grad((w1 * w1).sum(), x)
            torch.testing.assert_close(g2, w2, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-12, equal_nan=True)

    @pytest.mark.parametrize("kind", KIND_NAMES)
    def test_switch_on_is_the_factor(self, kind, seed):
        p = param_of(kind)
        x = make_x((300,), torch.float64).requires_grad_()
        g = torch.randn(300, dtype=torch.float64)
        sw = fisnet_ext.HeatmapSwitch()
        y = fisnet_ext.lrp_act(x, kind, 0.05, sw, param=p)
        with sw:
            (got,) = torch.autograd.grad(y, x, g, retain_graph=True)
        torch.testing.assert_close(got, reference.act_bwd(g, x.detach(), KINDS[kind], p, 0.05), rtol=1e-13, atol=1e-14)
        (off,) = torch.autograd.grad(y, x, g)  # the switch is read at backward time
        (want,) = torch.autograd.grad(torch_phi(kind, x, p), x, g)
        assert torch.equal(off, want)
        # no switch: always the factor
        (nosw,) = torch.autograd.grad(fisnet_ext.lrp_act(x, kind, 0.05, param=p), x, g)
        assert torch.equal(nosw, got)

    @pytest.mark.parametrize("kind", KIND_NAMES)
    @pytest.mark.parametrize("backend", ["cpp", "reference"])
    def test_heatmap_equals_detached_gate_oracle(self, kind, backend, seed):
        gen = torch.Generator().manual_seed(seed)
        params = _net(gen)
        p = param_of(kind)
        eps = 0.03
        x = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)

        def gate_act(z):
            """Forward φ(z); gradient the detached gate (a constant correction keeps the value)."""
            phi = torch_phi(kind, z, p)
            gate = (phi / (z + eps * sgn(z))).detach()
            return z * gate + (phi - z * gate).detach()

        sw = fisnet_ext.HeatmapSwitch()
        out = _forward(params, x, lambda z: fisnet_ext.lrp_act(z, kind, eps, sw, backend, param=p))
        ref_out = _forward(params, x, lambda z: torch_phi(kind, z, p))
        torch.testing.assert_close(out, ref_out, rtol=1e-13, atol=1e-13)
        with sw:
            (got,) = torch.autograd.grad(out[:, 1].sum(), x)
        (want,) = torch.autograd.grad(_forward(params, x, gate_act)[:, 1].sum(), x)
        torch.testing.assert_close(got * x, want * x, rtol=1e-11, atol=1e-12)

    @pytest.mark.parametrize("kind", KIND_NAMES)
    def test_heatmap_double_backward_differentiates_the_factor(self, kind, seed):
        """d(loss of the heatmap)/d(weights) equals autograd of an explicit heatmap in which the gate
        is NOT detached (∂factor/∂z included): the ISNet training gradient."""
        gen = torch.Generator().manual_seed(seed)
        params = [t.requires_grad_() for t in _net(gen)]
        p = param_of(kind)
        eps = 0.05
        x = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
        sw = fisnet_ext.HeatmapSwitch()
        out = _forward(params, x, lambda z: fisnet_ext.lrp_act(z, kind, eps, sw, "cpp", param=p))
        with sw:
            (hm,) = torch.autograd.grad(out[:, 0].sum(), x, create_graph=True)
        loss = ((hm * x) ** 2).sum()
        got = torch.autograd.grad(loss, params)

        def gate(z):
            return torch_phi(kind, z, p) / (z + eps * sgn(z))

        w0, w1, b1, w2 = params
        z1 = x @ w0.T
        z2 = torch_phi(kind, z1, p) @ w1.T + b1
        g2 = w2[0].expand(3, -1) * gate(z2)
        g1 = (g2 @ w1) * gate(z1)
        hm_explicit = g1 @ w0
        want = torch.autograd.grad(((hm_explicit * x) ** 2).sum(), params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)

    @pytest.mark.parametrize("kind", KIND_NAMES)
    @pytest.mark.parametrize("mode", ["off", "on"])
    def test_gradcheck_public_function(self, kind, mode, seed):
        gen = torch.Generator().manual_seed(seed)
        p = param_of(kind)
        x = away_from_kinks(7, kind, gen).requires_grad_()
        sw = fisnet_ext.HeatmapSwitch()

        def f(t):
            if mode == "on":
                sw._depth += 1
                try:
                    return fisnet_ext.lrp_act(t, kind, 0.1, sw, param=p)
                finally:
                    sw._depth -= 1
            return fisnet_ext.lrp_act(t, kind, 0.1, sw, param=p)

        if mode == "on":
            # the heatmap backward is not the derivative of φ, so check it as a function: x -> grad
            g = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)

            def hm(t, gi):
                y = fisnet_ext.lrp_act(t, kind, 0.1, sw, param=p)
                with sw:
                    return torch.autograd.grad(y, t, gi, create_graph=True)[0]

            assert torch.autograd.gradcheck(hm, (x, g))
            assert torch.autograd.gradgradcheck(hm, (x, g))
        else:
            assert torch.autograd.gradcheck(f, (x,))
            assert torch.autograd.gradgradcheck(f, (x,))

    @pytest.mark.parametrize("kind", KIND_NAMES)
    @pytest.mark.parametrize("slots", [(), (2,)])
    def test_gradcheck_bwd_op(self, kind, slots, seed):
        gen = torch.Generator().manual_seed(seed)
        p, code = param_of(kind), KINDS[kind]
        x = away_from_kinks(5, kind, gen).requires_grad_()
        g = torch.randn(slots + (5,), dtype=torch.float64, generator=gen, requires_grad=True)
        for eps in epses(kind)[-2:]:
            fn = lambda gi, xi: torch.ops.fisnet.act_bwd(gi, xi, code, p, eps)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (g, x))
            assert torch.autograd.gradgradcheck(fn, (g, x))  # the bwd_bwd op and its (third-order) backward

    def test_gradcheck_detects_a_wrong_factor(self):
        """The ladder can fail: a bwd_bwd that drops ∂factor/∂z fails gradcheck of the bwd op."""
        x = torch.tensor([0.3, -1.2, 2.2], dtype=torch.float64, requires_grad=True)
        g = torch.randn(3, dtype=torch.float64, requires_grad=True)

        class Wrong(torch.autograd.Function):
            @staticmethod
            def forward(ctx, gi, xi):
                ctx.save_for_backward(gi, xi)
                return torch.ops.fisnet.act_bwd(gi, xi, KINDS["gelu"], 0.0, 0.1)

            @staticmethod
            def backward(ctx, a):
                gi, xi = ctx.saved_tensors
                h, _ = reference.act_factor(xi, KINDS["gelu"], 0.0, 0.1)
                return a * h, torch.zeros_like(xi)  # the factor treated as a constant

        assert not torch.autograd.gradcheck(Wrong.apply, (g, x), raise_exception=False)

    # ---- opcheck, fake kernels, vmap ----------------------------------------------------------------
    @pytest.mark.parametrize("kind", ["gelu", "elu", "softplus", "relu6"])
    @pytest.mark.parametrize("fam", FAMILIES)
    def test_opcheck(self, kind, fam, seed):
        code, p = KINDS[kind], param_of(kind)
        name = "act_{}" + ("_triton" if fam == "triton" else "")
        x = make_x((3, 4), torch.float64)
        g = torch.randn(2, 3, 4, dtype=torch.float64)
        gg = torch.randn_like(g)
        for rg in (False, True):
            xx, gx, ggx = (t.clone().requires_grad_(rg) for t in (x, g, gg))
            torch.library.opcheck(getattr(torch.ops.fisnet, name.format("fwd")), (xx, code, p))
            torch.library.opcheck(getattr(torch.ops.fisnet, name.format("bwd")), (gx, xx, code, p, 0.1))
            torch.library.opcheck(getattr(torch.ops.fisnet, name.format("bwd_bwd")), (ggx, gx, xx, code, p, 0.1))

    def test_fake_kernels_propagate_shapes(self):
        x = torch.empty(3, 4, device="meta")
        g = torch.empty(2, 3, 4, device="meta")
        assert torch.ops.fisnet.act_fwd(x, 3, 0.0).shape == (3, 4)
        assert torch.ops.fisnet.act_bwd(g, x, 3, 0.0, 0.1).shape == (2, 3, 4)
        a, b = torch.ops.fisnet.act_bwd_bwd(g, g, x, 3, 0.0, 0.1)
        assert a.shape == b.shape == (2, 3, 4)

    @pytest.mark.skipif(not hasattr(torch.library, "register_vmap"), reason="torch without register_vmap")
    @pytest.mark.parametrize("kind", ["gelu", "leaky_relu", "mish"])
    def test_vmap_equals_loop(self, kind, seed):
        code, p = KINDS[kind], param_of(kind)
        x = make_x((4, 5), torch.float64)
        g = torch.randn(3, 4, 5, dtype=torch.float64)
        gg = torch.randn_like(g)
        out = torch.func.vmap(lambda gi: torch.ops.fisnet.act_bwd(gi, x, code, p, 0.1))(g)
        assert torch.equal(out, torch.stack([torch.ops.fisnet.act_bwd(gi, x, code, p, 0.1) for gi in g]))
        dg, dx = torch.func.vmap(lambda a, b: torch.ops.fisnet.act_bwd_bwd(a, b, x, code, p, 0.1))(gg, g)
        loop = [torch.ops.fisnet.act_bwd_bwd(a, b, x, code, p, 0.1) for a, b in zip(gg, g)]
        assert torch.equal(dg, torch.stack([t[0] for t in loop])) and torch.equal(dx, torch.stack([t[1] for t in loop]))
        xs = make_x((3, 4, 5), torch.float64)  # x batched too
        out = torch.func.vmap(lambda gi, xi: torch.ops.fisnet.act_bwd(gi, xi, code, p, 0.1))(g, xs)
        assert torch.equal(out, torch.stack([torch.ops.fisnet.act_bwd(gi, xi, code, p, 0.1) for gi, xi in zip(g, xs)]))
        assert torch.equal(torch.func.vmap(lambda xi: torch.ops.fisnet.act_fwd(xi, code, p))(xs),
                           torch.ops.fisnet.act_fwd(xs, code, p))

    @pytest.mark.parametrize("kind", KIND_NAMES)
    def test_two_slots_dual_isnet(self, kind, seed):
        """Under two_slots(): slot 0 the factor with eps, slot 1 the eps-free identity rule φ(z)/z
        (softplus: eps kept); slot1_only() applies slot 1's rule to the whole backward."""
        p, code = param_of(kind), KINDS[kind]
        x = make_x((40,), torch.float64).requires_grad_()
        sw = fisnet_ext.HeatmapSwitch()
        y = fisnet_ext.lrp_act(x, kind, 0.2, sw, param=p)
        seeds = torch.randn(2, 40, dtype=torch.float64)
        with sw.two_slots():
            out = torch.func.vmap(lambda s: torch.autograd.grad(y, x, s, retain_graph=True)[0])(seeds)
        eps1 = 0.2 if kind == "softplus" else 0.0
        close = dict(rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(out[0], reference.act_bwd(seeds[0], x.detach(), code, p, 0.2), **close)
        torch.testing.assert_close(out[1], reference.act_bwd(seeds[1], x.detach(), code, p, eps1), **close)
        with sw.slot1_only():
            (s1,) = torch.autograd.grad(y, x, seeds[1], retain_graph=True)
        assert torch.equal(s1, out[1])
        if kind == "relu":  # lrp_relu's slot 1: the plain derivative
            (plain,) = torch.autograd.grad(torch.relu(x), x, seeds[1])
            assert same(out[1], plain)

    def test_relu_kind_equals_lrp_relu(self, seed):
        """Up to rounding: lrp_relu computes g x / (x + eps), lrp_act (x / (x + eps)) g (with eps = 0
        exactly g, where lrp_relu's g x / x may be 1 ulp off)."""
        x = make_x((200,), torch.float64).requires_grad_()
        g = torch.randn(2, 200, dtype=torch.float64)
        gg = torch.randn_like(g)
        for eps in (0.0, 0.01, 0.5):
            torch.testing.assert_close(torch.ops.fisnet.act_bwd(g, x.detach(), 0, 0.0, eps),
                                       torch.ops.fisnet.lrp_relu_bwd(g, x.detach(), eps), rtol=5e-16, atol=0)
            a = torch.ops.fisnet.act_bwd_bwd(gg, g, x.detach(), 0, 0.0, eps)
            b = torch.ops.fisnet.lrp_relu_bwd_bwd(gg, g, x.detach(), eps)
            torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
        sw, sw2 = fisnet_ext.HeatmapSwitch(), fisnet_ext.HeatmapSwitch()
        ya, yb = fisnet_ext.lrp_act(x, "relu", 0.1, sw), fisnet_ext.lrp_relu(x, 0.1, sw2)
        with sw.two_slots(), sw2.two_slots():
            a = torch.func.vmap(lambda s: torch.autograd.grad(ya, x, s, retain_graph=True)[0])(g)
            b = torch.func.vmap(lambda s: torch.autograd.grad(yb, x, s, retain_graph=True)[0])(g)
        torch.testing.assert_close(a, b, rtol=5e-16, atol=0)

    @pytest.mark.parametrize("kind", ["gelu", "softplus"])
    def test_is_grads_batched(self, kind, seed):
        p = param_of(kind)
        x = make_x((6, 5), torch.float64).requires_grad_()
        sw = fisnet_ext.HeatmapSwitch()
        y = fisnet_ext.lrp_act(x, kind, 0.1, sw, param=p)
        seeds = torch.randn(3, 6, 5, dtype=torch.float64)
        with sw:
            (b,) = torch.autograd.grad(y, x, seeds, is_grads_batched=True, retain_graph=True)
            loop = torch.stack([torch.autograd.grad(y, x, s, retain_graph=True)[0] for s in seeds])
        assert torch.equal(b, loop)

    # ---- backends and errors -----------------------------------------------------------------------
    def test_backend_choice(self):
        assert act_ops.choose("cpu") is NATIVE
        assert act_ops.choose("cpu", "reference") is REFERENCE
        with fisnet_ext.use_backend("reference"):
            assert act_ops.choose("cpu") is REFERENCE
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            act_ops.choose("cpu", "cuda")
        with pytest.raises(ValueError, match="unknown fisnet backend"):
            act_ops.choose("cpu", "nope")

    def test_argument_errors(self):
        x = torch.randn(4)
        with pytest.raises(ValueError, match="unknown activation 'swish'.*choose one of"):
            fisnet_ext.lrp_act(x, "swish", 0.1)
        with pytest.raises(TypeError, match="activation name"):
            fisnet_ext.lrp_act(x, 3, 0.1)
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            fisnet_ext.lrp_act(x, "gelu", -0.1)
        with pytest.raises(ValueError, match="softplus needs eps > 0"):
            fisnet_ext.lrp_act(x, "softplus", 0.0)
        with pytest.raises(ValueError, match="beta"):
            fisnet_ext.lrp_act(x, "softplus", 0.1, param=0.0)
        with pytest.raises(TypeError, match="floating-point"):
            fisnet_ext.lrp_act(torch.arange(3), "gelu", 0.1)
        with pytest.raises(ValueError, match="param must be finite"):
            fisnet_ext.lrp_act(x, "elu", 0.1, param=float("inf"))
        # the C++ ops check too
        with pytest.raises(RuntimeError, match="unknown activation kind 10"):
            torch.ops.fisnet.act_fwd(x, 10, 0.0)
        with pytest.raises(RuntimeError, match="softplus needs eps > 0"):
            torch.ops.fisnet.act_bwd(x, x, 9, 1.0, 0.0)
        with pytest.raises(RuntimeError, match="must have x's shape"):
            torch.ops.fisnet.act_bwd(torch.randn(3), x, 3, 0.0, 0.1)
        with pytest.raises(RuntimeError, match="gg has shape"):
            torch.ops.fisnet.act_bwd_bwd(torch.randn(2, 4), torch.randn(4), x, 3, 0.0, 0.1)
        with pytest.raises(RuntimeError, match="one dtype"):
            torch.ops.fisnet.act_bwd(x.double(), x, 3, 0.0, 0.1)

    def test_default_params_are_pytorchs(self):
        x = make_x((100,), torch.float64)
        assert torch.equal(fisnet_ext.lrp_act(x, "leaky_relu", 0.1), F.leaky_relu(x))
        assert torch.equal(fisnet_ext.lrp_act(x, "elu", 0.1, backend="reference"), F.elu(x))
        assert torch.equal(fisnet_ext.lrp_act(x, "softplus", 0.1, backend="reference"), F.softplus(x))

    def test_third_and_fourth_derivatives(self, seed):
        """The bwd_bwd op's own backward (third derivatives) is exact, and differentiable again."""
        gen = torch.Generator().manual_seed(seed)
        x = away_from_kinks(4, "gelu", gen).requires_grad_()
        g = torch.randn(2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        gg = torch.randn(2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        fn = lambda a, b, c: torch.ops.fisnet.act_bwd_bwd(a, b, c, KINDS["gelu"], 0.0, 0.1)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (gg, g, x))
        assert torch.autograd.gradgradcheck(fn, (gg, g, x))
