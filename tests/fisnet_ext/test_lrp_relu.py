"""The lrp_relu op family (fisnet_ext/ops.py, csrc/*/lrp_relu.*, fisnet_ext/triton/lrp_relu.py):
``lrp_relu_fwd`` (ReLU), ``lrp_relu_bwd`` (g·y/(y+ε)) and ``lrp_relu_bwd_bwd``, and the
differentiable `lrp_relu` / `LRPReLU` / `HeatmapSwitch`.

The ladder (tests/README.md), in class TestLrpRelu: every family against fisnet_ext.reference on
fresh random data with poisoned outputs, argument errors, fp64 gradcheck/gradgradcheck, opcheck,
vmap, the switch semantics and backends, the double backward through a small net against plain
PyTorch, and the Triton launchers on their own (``test_launcher_*``: their outputs poisoned
through torch.empty_like, int64 offsets, the slot-tiled grid).

Families: NATIVE ("cpp" on CPU, the CUDA kernels on GPUs), TRITON (on GPUs, or on CPU under
TRITON_INTERPRET=1 with tiny shapes only: the interpreter is slow) and REFERENCE.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fisnet_ext
from fisnet_ext import ops, reference
from fisnet_ext.ops import NATIVE, REFERENCE, TRITON

from tests.fisnet_ext.conftest import (ERRS, HAVE_CUDA, INTERPRETED, check_close as _check_close,
                                       check_written, family_cases, family_getter, kernel_threads,
                                       poisoned, tiny, triton_on_cpu)

# One intra-op thread by default; kernel calls on big inputs run under `kernel_threads` instead.
pytestmark = pytest.mark.usefixtures("one_thread")

TRITON_ON_CPU = triton_on_cpu(TRITON)

# (family name, device); the families that can run here are resolved at run time.
FAMILY_CASES = family_cases(TRITON, ops.WITH_CUDA)
get_family = family_getter(NATIVE, TRITON, REFERENCE)


X_SHAPES_TINY = [(), (1,), (7,), (33,), (3, 5, 7)]
SLOTS_TINY = [(), (2,)]
X_SHAPES_BIG = [(1000,), (100003,), (40001,), (0, 3)]  # over the C++ parallel grain (32768)
SLOTS_BIG = [(), (3,)]
EPSES = [0.0, 1e-2, 1.0]


def shape_cases(name, device):
    cases = list(itertools.product(X_SHAPES_TINY, SLOTS_TINY))
    if not tiny(name, device):
        cases += list(itertools.product(X_SHAPES_TINY, [(2, 3)]))
        cases += list(itertools.product(X_SHAPES_BIG, SLOTS_BIG))
        cases += [((40001,), (2, 3))]  # parallel chunks that start and end inside a slot
        cases += [((4,), (0,))]
    else:
        cases += [((0, 3), ()), ((4,), (0,))]
    return cases


def dtypes_for(name, device):
    dts = [torch.float32, torch.float64]
    if device == "cuda":
        dts.append(torch.float16)
        if not INTERPRETED:
            dts.append(torch.bfloat16)
    return dts


def tol(dtype):
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-6, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    }[dtype]


def make_x(shape, dtype, device, zero_frac=0.2):
    """Random x with negatives, positives and exact zeros."""
    x = torch.randn(shape, dtype=torch.float64) * 2
    if x.numel():
        x[torch.rand(shape) < zero_frac] = 0.0
        x.view(-1)[0] = 0.0  # at least one exact zero
    return x.to(dtype=dtype, device=device)


def inputs(xshape, slots, dtype, device):
    x = make_x(xshape, dtype, device)
    g = torch.randn(tuple(slots) + tuple(xshape), dtype=torch.float64).to(dtype=dtype, device=device)
    gg = torch.randn(tuple(slots) + tuple(xshape), dtype=torch.float64).to(dtype=dtype, device=device)
    return gg, g, x


def check_close(got, want, dtype, seed, what):
    _check_close(got, want, tol(dtype), seed, what)


def check_zero_where_nonpositive(out, x, what):
    mask = (x <= 0).expand_as(out)
    vals = out[mask]
    assert bool((vals == 0).all()), f"{what}: nonzero output where x <= 0: {vals[vals != 0][:5]}"


# ---------------------------------------------------------------------------------------------
# Argument errors
ERROR_FAMILIES = [pytest.param("cpp", id="cpp"),
                  pytest.param("triton", id="triton",
                               marks=pytest.mark.skipif(not TRITON_ON_CPU, reason="triton interpreter not active"))]


# ---------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (fp64), x away from the kink
GRAD_FAMILIES = [pytest.param("cpp", id="cpp"), pytest.param("reference", id="reference"),
                 pytest.param("triton", id="triton",
                              marks=pytest.mark.skipif(not TRITON_ON_CPU, reason="triton interpreter not active"))]


def away_from_kink(shape, device="cpu"):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    return torch.where(x >= 0, x + 0.1, x - 0.1)


# ---------------------------------------------------------------------------------------------
# opcheck
OPCHECK_FAMILIES = [pytest.param("cpp", id="native"),
                    pytest.param("triton", id="triton",
                                 marks=pytest.mark.skipif(not TRITON_ON_CPU, reason="triton interpreter not active"))]


# ---------------------------------------------------------------------------------------------
# vmap
VMAP_FAMILIES = GRAD_FAMILIES


def _small_net_params(seed_dtype=torch.float64, din=5, dh=6, dout=3):
    W1 = torch.randn(dh, din, dtype=seed_dtype, requires_grad=True)
    b1 = torch.randn(dh, dtype=seed_dtype, requires_grad=True)
    W2 = torch.randn(dout, dh, dtype=seed_dtype, requires_grad=True)
    return W1, b1, W2


# ---------------------------------------------------------------------------------------------
# lrp_relu / LRPReLU / HeatmapSwitch
def lrp_factor_grad(g, x, eps):
    y = torch.relu(x)
    return torch.where(x > 0, g * y / (y + eps), torch.zeros_like(g))


# ---------------------------------------------------------------------------------------------
# The double backward through a small net, against plain-PyTorch LRP-Flex
def net_params(x, dtype=torch.float64):
    """Random weights for which every image has active and inactive units in both hidden layers
    (so the heatmap is not trivially zero and both sides of every kink are exercised)."""
    for _ in range(1000):
        ps = [torch.randn(6, 4, dtype=dtype) * 0.7, torch.randn(6, dtype=dtype) * 0.3,
              torch.randn(5, 6, dtype=dtype) * 0.7, torch.randn(5, dtype=dtype) * 0.3,
              torch.randn(3, 5, dtype=dtype) * 0.7, torch.randn(3, dtype=dtype) * 0.3]
        z1 = F.linear(x, ps[0], ps[1])
        z2 = F.linear(torch.relu(z1), ps[2], ps[3])
        if all(bool((z > 0).any(1).all() and (z <= 0).any(1).all()) for z in (z1, z2)):
            return ps
    raise AssertionError("could not draw a live network")


def heatmap_ops(params, x, c, eps, backend):
    """x ⊙ (LRP-Flex gradient of logit c) via lrp_relu and autograd (create_graph)."""
    W1, b1, W2, b2, W3, b3 = params
    s = fisnet_ext.HeatmapSwitch()
    x = x.detach().requires_grad_()
    h = fisnet_ext.lrp_relu(F.linear(x, W1, b1), eps, s, backend=backend)
    h = fisnet_ext.lrp_relu(F.linear(h, W2, b2), eps, s, backend=backend)
    out = F.linear(h, W3, b3)
    with s:
        (G,) = torch.autograd.grad(out[:, c].sum(), x, create_graph=True)
    return x * G


def heatmap_torch(params, x, c, eps):
    """The same, written with the LRP factor y/(y+eps) in plain torch ops."""
    W1, b1, W2, b2, W3, b3 = params
    z1 = F.linear(x, W1, b1)
    y1 = torch.relu(z1)
    z2 = F.linear(y1, W2, b2)
    y2 = torch.relu(z2)
    G = W3[c].expand(x.shape[0], -1)
    G = G * torch.where(z2 > 0, y2 / (y2 + eps), torch.zeros_like(y2))
    G = G @ W2
    G = G * torch.where(z1 > 0, y1 / (y1 + eps), torch.zeros_like(y1))
    G = G @ W1
    return x * G


# ---------------------------------------------------------------------------------------------
# The Triton launchers on their own (fisnet_ext.triton.lrp_relu): with CUDA on the GPU, bf16/fp16
# included; without, on CPU tensors under TRITON_INTERPRET=1.
try:
    from fisnet_ext.triton import lrp_relu as tl
except ImportError:  # triton not installed
    tl = None

ON_GPU = HAVE_CUDA
_launcher_marks = [pytest.mark.skipif(tl is None, reason="could not import 'triton'"),
                   pytest.mark.skipif(not ON_GPU and not INTERPRETED,
                                      reason="no CUDA device and TRITON_INTERPRET is not 1")]

L_DEVICE = "cuda" if ON_GPU else "cpu"
# The interpreter has no bf16/fp16 arithmetic: test those on GPUs only.
L_DTYPES = [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if ON_GPU else [])
L_EPS = [0.0, 1e-2, 0.7]

# (x shape, slot dims): tiny shapes, odd sizes, a shape over one BLOCK, one large enough for the
# slot-tiled grid (x.numel() >= 4 * BLOCK with slots), and empty tensors.
L_SHAPES = [
    ((), ()),
    ((1,), ()),
    ((7,), ()),
    ((3, 5), ()),
    ((2, 3, 4, 5), ()),
    ((7,), (3,)),
    ((3, 5), (2, 2)),
    ((4, 1031), ()),            # crosses a BLOCK boundary, numel not a multiple of BLOCK
    ((5, 1025), (3,)),          # flat grid with x broadcast (i % nx)
    ((4 * 4096 + 13,), (2,)),   # slot-tiled grid
    ((0, 3), ()),
    ((0, 3), (2,)),
    ((4,), (0,)),
]


def _l_tol(dtype):
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=2e-3)
    if dtype == torch.bfloat16:
        return dict(rtol=1.6e-2, atol=1e-2)
    return {}  # assert_close's defaults: fp32 rtol 1.3e-6 / atol 1e-5, fp64 rtol 1e-7 / atol 1e-7


def _l_inputs(xshape, slots, dtype):
    x = torch.randn(xshape, dtype=torch.float64)
    if x.numel():
        flat = x.view(-1)
        flat[torch.rand(flat.shape) < 0.2] = 0.0  # exact zeros: the x > 0 boundary
        flat[torch.rand(flat.shape) < 0.1] = 1e-4  # close above 0, where eps matters most
    g = torch.randn((*slots, *xshape), dtype=torch.float64)
    gg = torch.randn((*slots, *xshape), dtype=torch.float64)
    return (t.to(L_DEVICE, dtype) for t in (x, g, gg))


def _l_check(out, expected, dtype, seed, what):
    check_written(out, expected, seed, what)
    torch.testing.assert_close(out, expected, **_l_tol(dtype), msg=lambda m: f"{what} (seed {seed}): {m}")


def _launchers(fn):
    """The marks of a launcher test."""
    for m in _launcher_marks:
        fn = m(fn)
    return fn


class TestLrpRelu:
    """The lrp_relu ladder."""

    # ---------------------------------------------------------------------------------------------
    # Kernels against the reference
    @pytest.mark.parametrize("name, device", FAMILY_CASES)
    def test_fwd_matches_reference(self, name, device, seed):
        fam = get_family(name)
        for dtype in dtypes_for(name, device):
            for xshape, _ in shape_cases(name, device):
                x = make_x(xshape, dtype, device)
                with kernel_threads(x.numel()):
                    y = poisoned(fam.fwd, x, n_outputs=1)
                what = f"{name}.fwd x{xshape} {dtype}"
                check_close(y, reference.lrp_relu_fwd(x), dtype, seed, what)
                torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=0)

    @pytest.mark.parametrize("name, device", FAMILY_CASES)
    def test_bwd_matches_reference(self, name, device, seed):
        fam = get_family(name)
        for dtype in dtypes_for(name, device):
            for (xshape, slots), eps in itertools.product(shape_cases(name, device), EPSES):
                gg, g, x = inputs(xshape, slots, dtype, device)
                with kernel_threads(g.numel()):
                    out = poisoned(fam.bwd, g, x, eps, n_outputs=1)
                what = f"{name}.bwd x{xshape} slots{slots} eps={eps} {dtype}"
                check_close(out, reference.lrp_relu_bwd(g, x, eps), dtype, seed, what)
                check_zero_where_nonpositive(out, x, what)

    @pytest.mark.parametrize("name, device", FAMILY_CASES)
    def test_bwd_bwd_matches_reference(self, name, device, seed):
        fam = get_family(name)
        for dtype in dtypes_for(name, device):
            for (xshape, slots), eps in itertools.product(shape_cases(name, device), EPSES):
                gg, g, x = inputs(xshape, slots, dtype, device)
                with kernel_threads(g.numel()):
                    dg, dx = poisoned(fam.bwd_bwd, gg, g, x, eps, n_outputs=2)
                rdg, rdx = reference.lrp_relu_bwd_bwd(gg, g, x, eps)
                what = f"{name}.bwd_bwd x{xshape} slots{slots} eps={eps} {dtype}"
                check_close(dg, rdg, dtype, seed, what + " dg")
                check_close(dx, rdx, dtype, seed, what + " dx")
                check_zero_where_nonpositive(dg, x, what + " dg")
                check_zero_where_nonpositive(dx, x, what + " dx")

    def test_reference_closed_form(self, seed):
        """The oracle itself against the formulas written out (docs/spec.md §2)."""
        x = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
        g = torch.tensor([3.0, 5.0, 7.0, -11.0], dtype=torch.float64)
        gg = torch.tensor([0.5, 2.0, -1.0, 4.0], dtype=torch.float64)
        eps = 0.25
        want = torch.tensor([0.0, 0.0, 7.0 * 0.5 / 0.75, -11.0 * 2.0 / 2.25], dtype=torch.float64)
        torch.testing.assert_close(reference.lrp_relu_bwd(g, x, eps), want, rtol=1e-15, atol=0)
        dg, dx = reference.lrp_relu_bwd_bwd(gg, g, x, eps)
        torch.testing.assert_close(dg, torch.tensor([0.0, 0.0, -0.5 / 0.75, 4.0 * 2.0 / 2.25], dtype=torch.float64),
                                   rtol=1e-15, atol=0)
        torch.testing.assert_close(dx, torch.tensor([0.0, 0.0, -7.0 * eps / 0.75**2, 4.0 * -11.0 * eps / 2.25**2],
                                                    dtype=torch.float64), rtol=1e-15, atol=0)
        # all families agree on it
        for fam in [NATIVE] + ([TRITON] if TRITON_ON_CPU else []):
            torch.testing.assert_close(fam.bwd(g, x, eps), want, rtol=1e-15, atol=0)

    def test_reference_half_computes_in_float32(self, seed):
        x = make_x((50,), torch.float32, "cpu")
        g = torch.randn(50)
        for dt in (torch.float16, torch.bfloat16):
            out = reference.lrp_relu_bwd(g.to(dt), x.to(dt), 0.1)
            assert out.dtype == dt
            want = reference.lrp_relu_bwd(g.to(dt).float(), x.to(dt).float(), 0.1).to(dt)
            assert torch.equal(out, want)

    @pytest.mark.parametrize("name, device", FAMILY_CASES)
    def test_noncontiguous_inputs(self, name, device, seed):
        fam = get_family(name)
        x = make_x((6, 5), torch.float64, device).t()           # (5, 6) non-contiguous
        g = torch.randn(6, 5, 3, dtype=torch.float64, device=device).permute(2, 1, 0)  # (3, 5, 6)
        gg = torch.randn_like(g)
        check_close(poisoned(fam.bwd, g, x, 0.1, n_outputs=1), reference.lrp_relu_bwd(g, x, 0.1),
                    torch.float64, seed, f"{name}.bwd noncontiguous")
        dg, dx = fam.bwd_bwd(gg, g, x, 0.1)
        rdg, rdx = reference.lrp_relu_bwd_bwd(gg, g, x, 0.1)
        check_close(dg, rdg, torch.float64, seed, "dg noncontiguous")
        check_close(dx, rdx, torch.float64, seed, "dx noncontiguous")
        check_close(fam.fwd(x), torch.relu(x), torch.float64, seed, "fwd noncontiguous")

    @pytest.mark.parametrize("name, device", FAMILY_CASES)
    def test_nonfinite_values(self, name, device, seed):
        """inf/NaN in g propagate where x > 0 and are masked to 0 elsewhere, like the reference."""
        fam = get_family(name)
        x = torch.tensor([1.0, -1.0, 0.0, 2.0, 3.0, -3.0] * 3, dtype=torch.float64, device=device)
        g = torch.tensor([float("nan"), float("nan"), float("inf"), float("inf"), -float("inf"), 1.0] * 3,
                         dtype=torch.float64, device=device)
        torch.testing.assert_close(fam.bwd(g, x, 0.1), reference.lrp_relu_bwd(g, x, 0.1), equal_nan=True)
        for a, b in zip(fam.bwd_bwd(g, g, x, 0.1), reference.lrp_relu_bwd_bwd(g, g, x, 0.1)):
            torch.testing.assert_close(a, b, equal_nan=True)

    @pytest.mark.parametrize("name, device", FAMILY_CASES)
    def test_fwd_propagates_nan_like_relu(self, name, device):
        fam = get_family(name)
        x = torch.tensor([float("nan"), 1.0, -1.0, 0.0, float("inf"), -float("inf")] * 3, dtype=torch.float64,
                         device=device)
        torch.testing.assert_close(fam.fwd(x), torch.relu(x), equal_nan=True, rtol=0, atol=0)

    @pytest.mark.parametrize("name", ERROR_FAMILIES)
    def test_bwd_argument_errors(self, name):
        fam = get_family(name)
        x = torch.randn(3, 4, dtype=torch.float64)
        g = torch.randn(2, 3, 4, dtype=torch.float64)
        with pytest.raises(ERRS, match="one dtype"):
            fam.bwd(g.float(), x, 0.1)
        with pytest.raises(ERRS, match="x's shape"):
            fam.bwd(torch.randn(2, 4, 3, dtype=torch.float64), x, 0.1)
        with pytest.raises(ERRS, match="x's shape"):
            fam.bwd(torch.randn(4, dtype=torch.float64), x, 0.1)  # fewer dims than x
        with pytest.raises(ERRS, match=r"eps must be >= 0"):
            fam.bwd(g, x, -0.5)
        with pytest.raises(ERRS, match=r"eps must be >= 0"):
            fam.bwd(g, x, float("nan"))
        with pytest.raises(ERRS, match="floating-point"):
            fam.bwd(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), 0.1)
        with pytest.raises(ERRS, match="floating-point"):
            fam.fwd(torch.ones(3, dtype=torch.int32))

    @pytest.mark.parametrize("name", ERROR_FAMILIES)
    def test_bwd_bwd_argument_errors(self, name):
        fam = get_family(name)
        x = torch.randn(3, 4, dtype=torch.float64)
        g = torch.randn(2, 3, 4, dtype=torch.float64)
        with pytest.raises(ERRS, match="gg has shape"):
            fam.bwd_bwd(torch.randn(3, 4, dtype=torch.float64), g, x, 0.1)
        with pytest.raises(ERRS, match="one dtype"):
            fam.bwd_bwd(g.float(), g, x, 0.1)
        with pytest.raises(ERRS, match="one dtype"):
            fam.bwd_bwd(g.float(), g.float(), x, 0.1)
        with pytest.raises(ERRS, match="x's shape"):
            fam.bwd_bwd(g[..., :3], g[..., :3], x, 0.1)
        with pytest.raises(ERRS, match=r"eps must be >= 0"):
            fam.bwd_bwd(g, g, x, -1.0)

    def test_public_function_errors(self):
        x = torch.randn(3, dtype=torch.float64)
        with pytest.raises(TypeError, match="floating-point"):
            fisnet_ext.lrp_relu(torch.arange(3))
        with pytest.raises(TypeError, match="floating-point"):
            fisnet_ext.lrp_relu([1.0, 2.0])
        with pytest.raises(ValueError, match="eps must be >= 0"):
            fisnet_ext.lrp_relu(x, eps=-1e-3)
        with pytest.raises(ValueError, match="eps must be >= 0"):
            fisnet_ext.lrp_relu(x, eps=float("nan"))
        with pytest.raises(ERRS, match="one dtype"):
            fisnet_ext.lrp_relu_bwd(x.float(), x, 0.1)
        with pytest.raises(ERRS, match="x's shape"):
            fisnet_ext.lrp_relu_bwd(torch.randn(4, dtype=torch.float64), x, 0.1)

    @pytest.mark.parametrize("name", GRAD_FAMILIES)
    @pytest.mark.parametrize("slots", [(), (2,)], ids=["noslot", "slot2"])
    @pytest.mark.parametrize("eps", [0.0, 0.3])
    def test_gradcheck_bwd(self, name, slots, eps, seed):
        fam = get_family(name)
        x = away_from_kink((2, 3)).requires_grad_()
        g = torch.randn(slots + (2, 3), dtype=torch.float64, requires_grad=True)
        gg = torch.randn(slots + (2, 3), dtype=torch.float64, requires_grad=True)

        def bwd(g, x):
            return fam.bwd(g, x, eps)

        def bwd_bwd(gg, g, x):
            return fam.bwd_bwd(gg, g, x, eps)

        assert torch.autograd.gradcheck(bwd, (g, x))
        assert torch.autograd.gradgradcheck(bwd, (g, x))
        assert torch.autograd.gradcheck(bwd_bwd, (gg, g, x))
        assert torch.autograd.gradgradcheck(bwd_bwd, (gg, g, x))

    def test_gradcheck_detects_a_wrong_derivative(self):
        """The check above can fail: a bwd whose x-derivative is off is caught."""

        class Wrong(torch.autograd.Function):
            @staticmethod
            def forward(ctx, g, x):
                ctx.save_for_backward(g, x)
                return NATIVE.bwd(g, x, 0.3)

            @staticmethod
            def backward(ctx, grad):
                g, x = ctx.saved_tensors
                dg, dx = NATIVE.bwd_bwd(grad, g, x, 0.3)
                return dg, 2 * dx

        x = away_from_kink((4,)).abs().requires_grad_()
        g = torch.randn(4, dtype=torch.float64, requires_grad=True)
        assert not torch.autograd.gradcheck(Wrong.apply, (g, x), raise_exception=False)

    def test_public_functions_are_differentiable(self, seed):
        x = away_from_kink((5,)).requires_grad_()
        g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        for backend in ("cpp", "reference"):
            assert torch.autograd.gradcheck(lambda g, x: fisnet_ext.lrp_relu_bwd(g, x, 0.2, backend=backend), (g, x))
            assert torch.autograd.gradcheck(
                lambda gg, g, x: fisnet_ext.lrp_relu_bwd_bwd(gg, g, x, 0.2, backend=backend), (g.detach().clone()
                                                                                             .requires_grad_(), g, x))

    @pytest.mark.parametrize("name", OPCHECK_FAMILIES)
    @pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
    def test_opcheck(self, name, requires_grad, seed):
        fam = get_family(name)
        x = away_from_kink((3, 4)).requires_grad_(requires_grad)
        g = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=requires_grad)
        gg = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=requires_grad)
        g1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=requires_grad)
        torch.library.opcheck(fam.fwd, (x,))
        torch.library.opcheck(fam.bwd, (g, x, 0.1))
        torch.library.opcheck(fam.bwd, (g1, x, 0.0))
        torch.library.opcheck(fam.bwd_bwd, (gg, g, x, 0.1))
        torch.library.opcheck(fam.bwd_bwd, (g1, g1.detach().clone(), x, 1.0))
        f32 = x.detach().float().requires_grad_(requires_grad)
        torch.library.opcheck(fam.bwd, (g1.detach().float().requires_grad_(requires_grad), f32, 0.1))

    def test_fake_kernels_propagate_shapes(self):
        x = torch.empty(3, 4, device="meta")
        g = torch.empty(5, 3, 4, device="meta")
        fams = [NATIVE] + ([TRITON] if TRITON is not None else [])
        for fam in fams:
            assert fam.fwd(x).shape == (3, 4)
            assert fam.bwd(g, x, 0.1).shape == (5, 3, 4)
            dg, dx = fam.bwd_bwd(g, g, x, 0.1)
            assert dg.shape == dx.shape == (5, 3, 4)
            with pytest.raises(Exception, match="x's shape"):
                fam.bwd(torch.empty(5, 4, 3, device="meta"), x, 0.1)

    @pytest.mark.parametrize("name", VMAP_FAMILIES)
    def test_vmap_bwd_equals_loop(self, name, seed):
        fam = get_family(name)
        eps = 0.2
        x = make_x((3, 5), torch.float64, "cpu")
        G = torch.randn(4, 3, 5, dtype=torch.float64)
        GG = torch.randn(4, 3, 5, dtype=torch.float64)
        loop = torch.stack([fam.bwd(G[i], x, eps) for i in range(4)])
        torch.testing.assert_close(torch.vmap(lambda g: fam.bwd(g, x, eps))(G), loop, rtol=1e-13, atol=0)
        # batch dim not in front
        got = torch.vmap(lambda g: fam.bwd(g, x, eps), in_dims=1)(G.transpose(0, 1))
        torch.testing.assert_close(got, loop, rtol=1e-13, atol=0)
        # the op's own slot dims under vmap
        G2 = torch.randn(4, 2, 3, 5, dtype=torch.float64)
        loop2 = torch.stack([fam.bwd(G2[i], x, eps) for i in range(4)])
        torch.testing.assert_close(torch.vmap(lambda g: fam.bwd(g, x, eps))(G2), loop2, rtol=1e-13, atol=0)
        # x batched too
        X = make_x((4, 3, 5), torch.float64, "cpu")
        loopx = torch.stack([fam.bwd(G[i], X[i], eps) for i in range(4)])
        torch.testing.assert_close(torch.vmap(lambda g, x: fam.bwd(g, x, eps))(G, X), loopx, rtol=1e-13, atol=0)
        loopx2 = torch.stack([fam.bwd(G2[i], X[i], eps) for i in range(4)])
        torch.testing.assert_close(torch.vmap(lambda g, x: fam.bwd(g, x, eps))(G2, X), loopx2, rtol=1e-13, atol=0)
        # x batched, g not
        loopx3 = torch.stack([fam.bwd(G[0], X[i], eps) for i in range(4)])
        torch.testing.assert_close(torch.vmap(lambda x: fam.bwd(G[0], x, eps))(X), loopx3, rtol=1e-13, atol=0)
        # bwd_bwd
        dgs, dxs = zip(*[fam.bwd_bwd(GG[i], G[i], x, eps) for i in range(4)])
        vdg, vdx = torch.vmap(lambda gg, g: fam.bwd_bwd(gg, g, x, eps))(GG, G)
        torch.testing.assert_close(vdg, torch.stack(dgs), rtol=1e-13, atol=0)
        torch.testing.assert_close(vdx, torch.stack(dxs), rtol=1e-13, atol=0)
        dgs, dxs = zip(*[fam.bwd_bwd(GG[i], G[0], X[i], eps) for i in range(4)])
        vdg, vdx = torch.vmap(lambda gg, x: fam.bwd_bwd(gg, G[0], x, eps))(GG, X)
        torch.testing.assert_close(vdg, torch.stack(dgs), rtol=1e-13, atol=0)
        torch.testing.assert_close(vdx, torch.stack(dxs), rtol=1e-13, atol=0)

    @pytest.mark.parametrize("backend", ["cpp", "reference",
                                         pytest.param("triton", marks=pytest.mark.skipif(
                                             not TRITON_ON_CPU, reason="triton interpreter not active"))])
    @pytest.mark.parametrize("use_switch", [False, True], ids=["noswitch", "switch"])
    def test_is_grads_batched_equals_loop(self, backend, use_switch, seed):
        W1, b1, W2 = _small_net_params()
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        switch = fisnet_ext.HeatmapSwitch() if use_switch else None
        h = fisnet_ext.lrp_relu(x @ W1.T + b1, 0.3, switch, backend=backend)
        h2 = fisnet_ext.lrp_relu(h * 1.5 - 0.2, 0.1, switch, backend=backend)
        out = h2 @ W2.T
        seeds = torch.randn(3, 4, 3, dtype=torch.float64)
        ctx = switch if use_switch else torch.enable_grad()
        with ctx:
            (batched,) = torch.autograd.grad(out, x, seeds, retain_graph=True, is_grads_batched=True)
            loop = torch.stack([torch.autograd.grad(out, x, seeds[i], retain_graph=True)[0] for i in range(3)])
        torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)
        # and it is the LRP factor, not the plain gradient
        (plain,) = torch.autograd.grad((torch.relu(torch.relu(x @ W1.T + b1) * 1.5 - 0.2) @ W2.T), x, seeds[0])
        assert not torch.allclose(loop[0], plain)

    @pytest.mark.parametrize("backend", ["cpp", "reference",
                                         pytest.param("triton", marks=pytest.mark.skipif(
                                             not TRITON_ON_CPU, reason="triton interpreter not active"))])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_lrp_relu_switch_semantics(self, backend, dtype, seed):
        n = 40 if backend == "triton" else 333
        x = make_x((n,), dtype, "cpu").requires_grad_()
        g = torch.randn(n, dtype=dtype)
        eps = 0.07
        s = fisnet_ext.HeatmapSwitch()
        assert not s.active
        y = fisnet_ext.lrp_relu(x, eps, s, backend=backend)
        assert torch.equal(y, torch.relu(x))
        # switch off: exactly relu's gradient
        (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
        (want,) = torch.autograd.grad(torch.relu(x), x, g)
        assert torch.equal(gx, want)
        # switch on: the LRP-Flex factor, read when the backward runs (same forward)
        with s:
            assert s.active
            with s:  # nested
                pass
            assert s.active
            (gh,) = torch.autograd.grad(y, x, g, retain_graph=True)
        assert not s.active
        torch.testing.assert_close(gh, lrp_factor_grad(g, x.detach(), eps), **tol(dtype))
        assert not torch.equal(gh, gx)
        # off again after the block
        (gx2,) = torch.autograd.grad(y, x, g, retain_graph=True)
        assert torch.equal(gx2, want)
        # switch=None: always the factor
        y2 = fisnet_ext.lrp_relu(x, eps, None, backend=backend)
        (gn,) = torch.autograd.grad(y2, x, g)
        torch.testing.assert_close(gn, gh, rtol=0, atol=0)
        # eps = 0: the plain gradient
        y0 = fisnet_ext.lrp_relu(x, 0.0, None, backend=backend)
        (g0,) = torch.autograd.grad(y0, x, g)
        torch.testing.assert_close(g0, want, rtol=4 * torch.finfo(dtype).eps, atol=0)

    def test_switch_is_exception_safe(self):
        s = fisnet_ext.HeatmapSwitch()
        with pytest.raises(RuntimeError):
            with s:
                raise RuntimeError("boom")
        assert not s.active
        assert "active=False" in repr(s)

    def test_lrp_relu_module(self, seed):
        s = fisnet_ext.HeatmapSwitch()
        m = fisnet_ext.LRPReLU(eps=0.5, switch=s, inplace=True)
        assert "eps=0.5" in repr(m)
        x = make_x((4, 6), torch.float64, "cpu").requires_grad_()
        x_before = x.detach().clone()
        y = m(x)
        assert torch.equal(x.detach(), x_before)  # never in place
        assert torch.equal(y, torch.relu(x))
        g = torch.randn(4, 6, dtype=torch.float64)
        with s:
            (gh,) = torch.autograd.grad(y, x, g, retain_graph=True)
        torch.testing.assert_close(gh, lrp_factor_grad(g, x.detach(), 0.5), rtol=1e-14, atol=0)
        (gp,) = torch.autograd.grad(y, x, g)
        assert torch.equal(gp, g * (x.detach() > 0))

    def test_gradcheck_switch_off_path(self, seed):
        x = away_from_kink((3, 4)).requires_grad_()
        s = fisnet_ext.HeatmapSwitch()
        assert torch.autograd.gradcheck(lambda x: fisnet_ext.lrp_relu(x, 0.3, s), (x,))
        assert torch.autograd.gradgradcheck(lambda x: fisnet_ext.lrp_relu(x, 0.3, s), (x,))
        # switch on: the backward is not relu's derivative, so gradcheck of the forward must fail
        assert not torch.autograd.gradcheck(lambda x: fisnet_ext.lrp_relu(x, 0.3, None), (x,),
                                            raise_exception=False)

    def test_gradcheck_heatmap_backward_in_x(self, seed):
        """x -> LRP-modified gradient at x is differentiable (double backward of the op)."""
        x = away_from_kink((3, 4)).requires_grad_()
        g = torch.randn(3, 4, dtype=torch.float64)

        def heat(x):
            y = fisnet_ext.lrp_relu(x * 1.3, 0.3, None)
            (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
            return gx * x

        assert torch.autograd.gradcheck(heat, (x,))
        assert torch.autograd.gradgradcheck(heat, (x,))

    def test_two_switches_do_not_interfere(self, seed):
        torch.manual_seed(seed)

        def make(eps, switch):
            torch.manual_seed(seed + int(eps * 10))
            return torch.nn.Sequential(torch.nn.Linear(5, 7), fisnet_ext.LRPReLU(eps=eps, switch=switch),
                                       torch.nn.Linear(7, 6), fisnet_ext.LRPReLU(eps=eps, switch=switch),
                                       torch.nn.Linear(6, 3)).double()

        s1, s2 = fisnet_ext.HeatmapSwitch(), fisnet_ext.HeatmapSwitch()
        m1, m2 = make(0.1, s1), make(1.0, s2)
        x = torch.randn(4, 5, dtype=torch.float64)

        def alone(m, s, heat):
            xi = x.clone().requires_grad_()
            out = m(xi)
            if heat:
                with s:
                    return torch.autograd.grad(out[:, 0].sum(), xi)[0]
            return torch.autograd.grad(out[:, 0].sum(), xi)[0]

        want1_h, want2_h = alone(m1, s1, True), alone(m2, s2, True)
        want1_p, want2_p = alone(m1, s1, False), alone(m2, s2, False)
        assert not torch.allclose(want1_h, want1_p)
        assert not torch.allclose(want1_h, want2_h)

        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        o1 = m1(x1)
        o2 = m2(x2)
        with s1:
            g2p = torch.autograd.grad(o2[:, 0].sum(), x2, retain_graph=True)[0]  # s2 off inside s1
            with s2:
                g2h = torch.autograd.grad(o2[:, 0].sum(), x2, retain_graph=True)[0]
                g1h = torch.autograd.grad(o1[:, 0].sum(), x1, retain_graph=True)[0]
            g1h_b = torch.autograd.grad(o1[:, 0].sum(), x1, retain_graph=True)[0]
        g1p = torch.autograd.grad(o1[:, 0].sum(), x1)[0]
        for got, want in [(g1h, want1_h), (g1h_b, want1_h), (g2h, want2_h), (g2p, want2_p), (g1p, want1_p)]:
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)

    def test_backend_selection(self, seed):
        x = make_x((3, 50), torch.float64, "cpu").requires_grad_()
        g = torch.randn(3, 50, dtype=torch.float64)
        res = {}
        for name in ("reference", "cpp", "auto") + (("triton",) if TRITON_ON_CPU else ()):
            with fisnet_ext.use_backend(name):
                assert fisnet_ext.current_backend() == name
                y = fisnet_ext.lrp_relu(x, 0.2)
                res[name] = torch.autograd.grad(y, x, g)[0]
        assert fisnet_ext.current_backend() in fisnet_ext.BACKENDS
        for name, r in res.items():
            torch.testing.assert_close(r, res["reference"], rtol=1e-13, atol=1e-13, msg=name)
        assert ops.family(torch.device("cpu"), "reference") is REFERENCE
        assert ops.family(torch.device("cpu"), "cpp") is NATIVE
        assert ops.family(torch.device("cpu"), "auto") is NATIVE
        with fisnet_ext.use_backend("reference"):
            assert ops.family(torch.device("cpu")) is REFERENCE
            with fisnet_ext.use_backend("cpp"):
                assert ops.family(torch.device("cpu")) is NATIVE
            assert ops.family(torch.device("cpu")) is REFERENCE

    def test_backend_errors(self):
        x = torch.randn(4, dtype=torch.float64)
        with pytest.raises(ValueError, match="unknown fisnet backend"):
            with fisnet_ext.use_backend("cudnn"):
                pass
        with pytest.raises(ValueError, match="unknown fisnet backend 'nope'"):
            fisnet_ext.lrp_relu(x, 0.1, backend="nope")
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            fisnet_ext.lrp_relu(x, 0.1, backend="cuda")
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            with fisnet_ext.use_backend("cuda"):
                fisnet_ext.lrp_relu(x, 0.1)
        if not HAVE_CUDA:
            with pytest.raises(RuntimeError, match="CPU tensors only"):
                ops.family(torch.device("cuda"), "cpp")

    def test_backend_env_var(self, monkeypatch):
        monkeypatch.setenv("FISNET_BACKEND", "reference")
        assert fisnet_ext.current_backend() == "reference"
        assert ops.family(torch.device("cpu")) is REFERENCE
        monkeypatch.setenv("FISNET_BACKEND", "bogus")
        with pytest.raises(ValueError, match="unknown fisnet backend"):
            fisnet_ext.current_backend()

    @pytest.mark.parametrize("backend", ["cpp", "reference",
                                         pytest.param("triton", marks=pytest.mark.skipif(
                                             not TRITON_ON_CPU, reason="triton interpreter not active"))])
    @pytest.mark.parametrize("eps", [1e-2, 0.5])
    def test_double_backward_matches_plain_torch(self, backend, eps, seed):
        x = torch.rand(3, 4, dtype=torch.float64)
        params = [p.requires_grad_() for p in net_params(x)]
        mask = (torch.rand(3, 4) < 0.5).double()
        c = 1
        h_ops = heatmap_ops(params, x, c, eps, backend)
        h_ref = heatmap_torch(params, x, c, eps)
        torch.testing.assert_close(h_ops, h_ref, rtol=1e-10, atol=1e-12)
        loss_ops = (h_ops.abs() * mask).sum() + (h_ops ** 2).sum()
        loss_ref = (h_ref.abs() * mask).sum() + (h_ref ** 2).sum()
        g_ops = torch.autograd.grad(loss_ops, params, allow_unused=True, materialize_grads=True)
        g_ref = torch.autograd.grad(loss_ref, params, allow_unused=True, materialize_grads=True)
        for name, a, b in zip(["W1", "b1", "W2", "b2", "W3", "b3"], g_ops, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"d loss / d {name}: {m}")
        assert any(bool(a.abs().sum() > 0) for a in g_ops[:4])

    @pytest.mark.parametrize("backend", ["cpp", "reference",
                                         pytest.param("triton", marks=pytest.mark.skipif(
                                             not TRITON_ON_CPU, reason="triton interpreter not active"))])
    def test_gradcheck_heatmap_in_weights(self, backend, seed):
        x = torch.rand(2, 4, dtype=torch.float64)
        params = [p.requires_grad_() for p in net_params(x)[:5]]  # b3 does not enter the heatmap

        b3 = torch.zeros(3, dtype=torch.float64)

        def f(*ps):
            return heatmap_ops(list(ps) + [b3], x, 2, 0.2, backend)

        assert torch.autograd.gradcheck(f, tuple(params))
        if backend != "triton":
            assert torch.autograd.gradgradcheck(f, tuple(params))
        else:  # interpreter: third derivatives only w.r.t. the first layer
            rest = [p.detach() for p in params[2:]] + [b3]
            assert torch.autograd.gradgradcheck(lambda W1, b1: heatmap_ops([W1, b1] + rest, x, 2, 0.2, backend),
                                                tuple(params[:2]))

    # ------------------------------------------------------------------------------------------
    # The Triton launchers (was tests/test_triton.py)
    @_launchers
    @pytest.mark.parametrize("dtype", L_DTYPES, ids=str)
    @pytest.mark.parametrize("xshape,slots", L_SHAPES, ids=str)
    def test_launcher_fwd(self, xshape, slots, dtype, seed, poison):
        x, _, _ = _l_inputs(xshape, slots, dtype)
        _l_check(poison(tl.lrp_relu_fwd, x), reference.lrp_relu_fwd(x), dtype, seed, "lrp_relu_fwd")

    @_launchers
    @pytest.mark.parametrize("eps", L_EPS)
    @pytest.mark.parametrize("dtype", L_DTYPES, ids=str)
    @pytest.mark.parametrize("xshape,slots", L_SHAPES, ids=str)
    def test_launcher_bwd(self, xshape, slots, dtype, eps, seed, poison):
        x, g, _ = _l_inputs(xshape, slots, dtype)
        _l_check(poison(tl.lrp_relu_bwd, g, x, eps), reference.lrp_relu_bwd(g, x, eps), dtype, seed, "lrp_relu_bwd")

    @_launchers
    @pytest.mark.parametrize("eps", L_EPS)
    @pytest.mark.parametrize("dtype", L_DTYPES, ids=str)
    @pytest.mark.parametrize("xshape,slots", L_SHAPES, ids=str)
    def test_launcher_bwd_bwd(self, xshape, slots, dtype, eps, seed, poison):
        x, g, gg = _l_inputs(xshape, slots, dtype)
        dg, dx = poison(tl.lrp_relu_bwd_bwd, gg, g, x, eps)
        edg, edx = reference.lrp_relu_bwd_bwd(gg, g, x, eps)
        _l_check(dg, edg, dtype, seed, "lrp_relu_bwd_bwd dg")
        _l_check(dx, edx, dtype, seed, "lrp_relu_bwd_bwd dx")

    @_launchers
    @pytest.mark.parametrize("xshape,slots", [((3, 1031), ()), ((5, 1025), (3,)), ((4 * 4096 + 13,), (2,))], ids=str)
    def test_launcher_int64_offsets(self, xshape, slots, seed, poison, monkeypatch):
        """The int64-offset variants (taken for tensors of 2^31 elements or more) on small tensors."""
        monkeypatch.setattr(tl, "_INT32_LIMIT", 0)
        dtype = torch.float64
        x, g, gg = _l_inputs(xshape, slots, dtype)
        _l_check(poison(tl.lrp_relu_fwd, x), reference.lrp_relu_fwd(x), dtype, seed, "lrp_relu_fwd")
        _l_check(poison(tl.lrp_relu_bwd, g, x, 0.1), reference.lrp_relu_bwd(g, x, 0.1), dtype, seed, "lrp_relu_bwd")
        for out, exp in zip(poison(tl.lrp_relu_bwd_bwd, gg, g, x, 0.1), reference.lrp_relu_bwd_bwd(gg, g, x, 0.1)):
            _l_check(out, exp, dtype, seed, "lrp_relu_bwd_bwd")

    @_launchers
    def test_launcher_non_contiguous_inputs(self, seed):
        dtype = torch.float64
        x = torch.randn(6, 5, dtype=dtype, device=L_DEVICE).t()          # (5, 6), transposed
        g = torch.randn(6, 5, 3, dtype=dtype, device=L_DEVICE).permute(2, 1, 0)  # (3, 5, 6)
        gg = torch.randn_like(g)
        _l_check(tl.lrp_relu_fwd(x), reference.lrp_relu_fwd(x), dtype, seed, "fwd")
        _l_check(tl.lrp_relu_bwd(g, x, 0.01), reference.lrp_relu_bwd(g, x, 0.01), dtype, seed, "bwd")
        for out, exp in zip(tl.lrp_relu_bwd_bwd(gg, g, x, 0.01), reference.lrp_relu_bwd_bwd(gg, g, x, 0.01)):
            _l_check(out, exp, dtype, seed, "bwd_bwd")

    @_launchers
    def test_launcher_closed_form(self):
        x = torch.tensor([-1.0, 0.0, 1.0, 3.0], dtype=torch.float64, device=L_DEVICE)
        g = torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64, device=L_DEVICE)
        gg = torch.tensor([1.0, 1.0, 1.0, 5.0], dtype=torch.float64, device=L_DEVICE)
        eps = 1.0
        assert tl.lrp_relu_fwd(x).tolist() == [0.0, 0.0, 1.0, 3.0]
        assert tl.lrp_relu_bwd(g, x, eps).tolist() == [0.0, 0.0, 1.0, 1.5]
        dg, dx = tl.lrp_relu_bwd_bwd(gg, g, x, eps)
        assert dg.tolist() == [0.0, 0.0, 0.5, 3.75]
        assert dx.tolist() == [0.0, 0.0, 0.5, 5 * 2 * 1 / 16]
        # eps = 0: the plain ReLU gradient
        assert tl.lrp_relu_bwd(g, x, 0.0).tolist() == [0.0, 0.0, 2.0, 2.0]

    @_launchers
    def test_launcher_fwd_propagates_nan_like_torch_relu(self):
        x = torch.tensor([float("nan"), -1.0, 2.0], device=L_DEVICE)
        torch.testing.assert_close(tl.lrp_relu_fwd(x), torch.relu(x), equal_nan=True)

    @_launchers
    def test_launcher_argument_errors(self):
        x = torch.randn(3, 4, device=L_DEVICE)
        with pytest.raises(ValueError, match="slot"):
            tl.lrp_relu_bwd(torch.randn(4, 3, device=L_DEVICE), x, 0.1)
        with pytest.raises(ValueError, match="eps"):
            tl.lrp_relu_bwd(torch.randn(3, 4, device=L_DEVICE), x, -1.0)
        with pytest.raises(TypeError, match="dtype"):
            tl.lrp_relu_bwd(torch.randn(3, 4, dtype=torch.float64, device=L_DEVICE), x, 0.1)
        with pytest.raises(TypeError, match="floating"):
            tl.lrp_relu_fwd(torch.ones(3, dtype=torch.int64, device=L_DEVICE))
        with pytest.raises(ValueError, match="gg"):
            tl.lrp_relu_bwd_bwd(torch.randn(2, 3, 4, device=L_DEVICE), torch.randn(3, 4, device=L_DEVICE), x, 0.1)
