"""The BatchNorm op family (fisnet_ext.bn_ops): ``bn_train_bwd(g, x, w, eps)``, the input-gradient
of training-mode BatchNorm, and its derivative ``bn_train_bwd_bwd``.  Every backend against the
reference and against PyTorch's own BatchNorm autograd, on fresh random data (outputs poisoned);
fp64 gradcheck and gradgradcheck; opcheck; vmap; argument errors: the ladder of tests/README.md,
in class TestBatchNorm.

The Triton launchers (fisnet_ext.triton.bn) are also tested on their own (``test_launcher_*``): on a
machine without CUDA on CPU tensors under TRITON_INTERPRET=1 with tiny shapes, with CUDA on the GPU,
bf16 included.  Their oracle is the reference evaluated in float64 on the same (rounded) inputs, so
the tolerances measure the kernels' own error; their outputs are poisoned with NaN (torch.empty and
torch.empty_like) so an element a kernel fails to write shows.
"""
import random

import pytest
import torch
import torch.nn.functional as F

import fisnet_ext
from fisnet_ext import bn_ops, ops, reference
from fisnet_ext.bn_ops import NATIVE, REFERENCE, TRITON

from tests.fisnet_ext.conftest import (ERRS, HAVE_CUDA, INTERPRETED, check_written, family_cases,
                                       family_getter, poisoned, skip_no_interp as _skip_no_interp)

skip_no_interp = _skip_no_interp(TRITON)

FAMILY_CASES = family_cases(TRITON, ops.WITH_CUDA, reference=True)
GRAD_FAMILIES = [pytest.param("cpp", id="cpp"), pytest.param("triton", id="triton", marks=skip_no_interp),
                 pytest.param("reference", id="reference")]
get_family = family_getter(NATIVE, TRITON, REFERENCE)


# (x shape, slot dims): images, (N, C), (N, C, L), slots; an odd size over the vector tails
SHAPES = [((3, 2, 4, 5), ()), ((5, 3), ()), ((2, 3, 7), (2,)), ((4, 2, 3, 3), (2, 3)), ((2, 1, 1, 1), ())]
SHAPES_BIG = [((16, 8, 13, 11), ()), ((8, 4, 33), (3,))]


def _truth(g, x, w, eps):
    """PyTorch's own answer: autograd through F.batch_norm in training mode, slot by slot."""
    extra = g.dim() - x.dim()
    gs = g.reshape((-1,) + tuple(x.shape))
    out = []
    for gi in gs:
        xr = x.detach().requires_grad_(True)
        y = F.batch_norm(xr, None, None, w, None, True, 0.1, eps)
        out.append(torch.autograd.grad(y, xr, gi)[0])
    return torch.stack(out).reshape(g.shape) if extra else out[0]


def _data(shape, slots, dtype, device, offset=0.0):
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + offset).to(dtype).to(device)
    w = torch.randn(shape[1], dtype=torch.float64).to(dtype).to(device)
    g = torch.randn(slots + shape, dtype=torch.float64).to(dtype).to(device)
    h = torch.randn(slots + shape, dtype=torch.float64).to(dtype).to(device)
    return h, g, x, w


def _tol(dtype):
    return {torch.float64: (1e-10, 1e-10), torch.float32: (2e-4, 2e-4)}[dtype]


# ---------------------------------------------------------------------------------------------
# The Triton launchers on their own (fisnet_ext.triton.bn)
try:
    from fisnet_ext.triton import bn
except ImportError:  # triton not installed
    bn = None

ON_GPU = HAVE_CUDA
_launcher_marks = [pytest.mark.skipif(bn is None, reason="could not import 'triton'"),
                   pytest.mark.skipif(not ON_GPU and not INTERPRETED,
                                      reason="no CUDA device and TRITON_INTERPRET is not 1")]


def _launchers(fn):
    """The marks of a launcher test."""
    for m in _launcher_marks:
        fn = m(fn)
    return fn


L_DEVICE = "cuda" if ON_GPU else "cpu"
# The interpreter has no bf16 (the kernels only convert fp16 to fp32, which it can do).
L_DTYPES = [torch.float32, torch.float64, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
L_XSHAPES = [(3, 2, 4, 5), (5, 3), (2, 3, 7)]
L_SLOTS = [(), (2,), (2, 3)]


def _l_tol(dtype):
    """(rtol, atol relative to the largest expected magnitude)."""
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


def _l_inputs(xshape, slots, dtype, offset=0.0, wdtype=None):
    x = torch.randn(xshape, dtype=torch.float64) * 2.0 + offset
    g = torch.randn((*slots, *xshape), dtype=torch.float64)
    h = torch.randn((*slots, *xshape), dtype=torch.float64)
    w = torch.randn(xshape[1], dtype=torch.float64)
    return x.to(L_DEVICE, dtype), g.to(L_DEVICE, dtype), h.to(L_DEVICE, dtype), w.to(L_DEVICE, wdtype or dtype)


def _l_oracle(fn, *args):
    """The reference evaluated in float64 on the given (already rounded) inputs."""
    return fn(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])


def _l_check(out, expected, like, seed, what):
    check_written(out, expected, seed, what, like=like)
    tol = _l_tol(out.dtype)
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(out.double(), expected.double(), rtol=tol, atol=tol * max(scale, 1e-3),
                               msg=lambda m: f"{what} (seed {seed}): {m}")


def _l_run_bwd(x, g, w, eps, seed, poison, what="bn_train_bwd"):
    out = poison(bn.bn_train_bwd, g, x, w, eps)
    _l_check(out, _l_oracle(reference.bn_train_bwd, g, x, w, eps), g, seed, what)


def _l_run_bwd_bwd(x, g, h, w, eps, seed, poison, what="bn_train_bwd_bwd"):
    outs = poison(bn.bn_train_bwd_bwd, h, g, x, w, eps)
    exps = _l_oracle(reference.bn_train_bwd_bwd, h, g, x, w, eps)
    assert len(outs) == 3
    for name, out, exp, like in zip(("d_g", "d_x", "d_w"), outs, exps, (g, x, w)):
        _l_check(out, exp, like, seed, f"{what} {name}")


class TestBatchNorm:
    """The training-mode BatchNorm ladder."""

    @pytest.mark.parametrize("name,device", FAMILY_CASES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("offset", [0.0, 50.0])
    def test_against_reference_and_pytorch(self, name, device, dtype, offset, seed):
        fam = get_family(name)
        shapes = SHAPES + ([] if name == "triton" and device == "cpu" else SHAPES_BIG)
        for shape, slots in shapes:
            h, g, x, w = _data(shape, slots, dtype, device, offset)
            eps = 1e-3
            got = poisoned(fam.bwd, g, x, w, eps, n_outputs=1, like=g)
            ref = reference.bn_train_bwd(g.double(), x.double(), w.double(), eps)
            truth = _truth(g.double(), x.double(), w.double(), eps)
            torch.testing.assert_close(ref, truth)  # the reference formula is PyTorch's gradient
            rtol, atol = _tol(dtype)
            # natural scales of the outputs (an output can be ~0 by cancellation, e.g. N*L = 2)
            xd = x.double()
            red = [0] + list(range(2, x.dim()))
            r = torch.rsqrt(xd.var(red, unbiased=False) + eps).max().item()
            wm, gm, hm = (t.double().abs().max().item() for t in (w, g, h))
            n = x.numel() // x.shape[1]
            torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol * wm * r * gm)
            outs = poisoned(fam.bwd_bwd, h, g, x, w, eps, n_outputs=3, like=g)
            refs = reference.bn_train_bwd_bwd(h.double(), g.double(), x.double(), w.double(), eps)
            scales = (wm * r * hm, wm * r * r * hm * gm, r * hm * gm * n * max(1, g.numel() // x.numel()))
            for o, ref_o, sc in zip(outs, refs, scales):
                assert o.shape == ref_o.shape and o.dtype == dtype
                torch.testing.assert_close(o.double(), ref_o, rtol=rtol, atol=atol * sc)

    def test_reference_double_backward_is_pytorchs(self, seed):
        """bn_train_bwd_bwd (reference) equals autograd's derivative of PyTorch's BatchNorm backward."""
        for shape, slots in SHAPES:
            h, g, x, w = _data(shape, slots, torch.float64, "cpu")
            gr, xr, wr = (t.clone().requires_grad_(True) for t in (g, x, w))
            extra = g.dim() - x.dim()
            outs = []
            for gi in gr.reshape((-1,) + tuple(x.shape)):
                y = F.batch_norm(xr, None, None, wr, None, True, 0.1, 1e-3)
                outs.append(torch.autograd.grad(y, xr, gi, create_graph=True)[0])
            gx = torch.stack(outs).reshape(g.shape) if extra else outs[0]
            truth = torch.autograd.grad(gx, [gr, xr, wr], h)
            got = reference.bn_train_bwd_bwd(h, g, x, w, 1e-3)
            for a, b in zip(got, truth):
                torch.testing.assert_close(a, b)

    @pytest.mark.parametrize("name", GRAD_FAMILIES)
    def test_gradcheck_gradgradcheck_fp64(self, name, seed):
        fam = get_family(name)
        for shape, slots in [((3, 2, 2, 3), ()), ((4, 2, 3), (2,))]:
            h, g, x, w = (t.requires_grad_(True) for t in _data(shape, slots, torch.float64, "cpu"))
            f = lambda g, x, w: fam.bwd(g, x, w, 1e-2)  # noqa: E731
            assert torch.autograd.gradcheck(f, (g, x, w))
            assert torch.autograd.gradgradcheck(f, (g, x, w))
            f2 = lambda h, g, x, w: fam.bwd_bwd(h, g, x, w, 1e-2)  # noqa: E731
            assert torch.autograd.gradcheck(f2, (h, g, x, w))

    @pytest.mark.parametrize("name", ["cpp", pytest.param("triton", marks=skip_no_interp)])
    def test_opcheck(self, name, seed):
        prefix = "" if name == "cpp" else "_triton"
        h, g, x, w = _data((3, 2, 2, 3), (2,), torch.float64, "cpu")
        for t in (h, g, x, w):
            t.requires_grad_(True)
        torch.library.opcheck(getattr(torch.ops.fisnet, "bn_train_bwd" + prefix).default, (g, x, w, 1e-2))
        torch.library.opcheck(getattr(torch.ops.fisnet, "bn_train_bwd_bwd" + prefix).default, (h, g, x, w, 1e-2))

    @pytest.mark.parametrize("name", ["cpp", "reference"])
    def test_vmap_over_g_is_slots(self, name, seed):
        """A vmapped g becomes a slot dim (x shared); vmapped x falls back to one call per entry."""
        fam = get_family(name)
        h, g, x, w = _data((3, 2, 4), (4,), torch.float64, "cpu")
        got = torch.func.vmap(lambda gi: fam.bwd(gi, x, w, 1e-3))(g)
        torch.testing.assert_close(got, fam.bwd(g, x, w, 1e-3))
        xs = torch.randn((4,) + tuple(x.shape), dtype=torch.float64)
        got = torch.func.vmap(lambda gi, xi: fam.bwd(gi, xi, w, 1e-3))(g, xs)
        torch.testing.assert_close(got, torch.stack([fam.bwd(g[i], xs[i], w, 1e-3) for i in range(4)]))
        got = torch.func.vmap(lambda hi, gi: fam.bwd_bwd(hi, gi, x, w, 1e-3))(h, g)
        per = [fam.bwd_bwd(h[i], g[i], x, w, 1e-3) for i in range(4)]
        for k in range(3):
            torch.testing.assert_close(got[k], torch.stack([p[k] for p in per]))

    def test_slots_sum_dx_dw(self, seed):
        h, g, x, w = _data((3, 2, 4), (3,), torch.float64, "cpu")
        dg, dx, dw = fisnet_ext.bn_train_bwd_bwd(h, g, x, w, 1e-3)
        per = [fisnet_ext.bn_train_bwd_bwd(h[i], g[i], x, w, 1e-3) for i in range(3)]
        torch.testing.assert_close(dg, torch.stack([p[0] for p in per]))
        torch.testing.assert_close(dx, sum(p[1] for p in per))
        torch.testing.assert_close(dw, sum(p[2] for p in per))

    def test_errors(self):
        x = torch.randn(4, 3, 5)
        w = torch.ones(3)
        g = torch.randn(4, 3, 5)
        with pytest.raises(ValueError, match="shape"):
            fisnet_ext.bn_train_bwd(torch.randn(4, 3, 6), x, w, 1e-3)
        with pytest.raises(ValueError, match="weight must have shape"):
            fisnet_ext.bn_train_bwd(g, x, torch.ones(4), 1e-3)
        with pytest.raises(TypeError, match="one dtype"):
            fisnet_ext.bn_train_bwd(g.double(), x, w, 1e-3)
        with pytest.raises(ValueError, match="eps"):
            fisnet_ext.bn_train_bwd(g, x, w, -1.0)
        with pytest.raises(ValueError, match=r"\(N, C"):
            fisnet_ext.bn_train_bwd(torch.randn(5), torch.randn(5), torch.ones(5), 1e-3)
        with pytest.raises(TypeError, match="floating-point"):
            fisnet_ext.bn_train_bwd(g, x.long(), w, 1e-3)
        with pytest.raises(ERRS, match="must match g|shape"):
            fisnet_ext.bn_train_bwd_bwd(torch.randn(4, 3, 4), g, x, w, 1e-3)
        # the C++ kernel checks too (called directly, bypassing the Python checks)
        with pytest.raises(RuntimeError, match="weight must have shape"):
            torch.ops.fisnet.bn_train_bwd(g, x, torch.ones(4), 1e-3)
        with pytest.raises(RuntimeError, match="slot"):
            torch.ops.fisnet.bn_train_bwd(torch.randn(4, 3, 6), x, w, 1e-3)

    def test_backend_choice(self):
        assert bn_ops.bn_family(torch.device("cpu"), "reference") is REFERENCE
        assert bn_ops.bn_family(torch.device("cpu"), "cpp") is NATIVE
        with pytest.raises(RuntimeError, match="CPU tensors only"):
            bn_ops.bn_family(torch.device("cuda"), "cpp")

    # ------------------------------------------------------------------------------------------
    # The Triton launchers (was tests/test_bn_triton.py)
    @_launchers
    @pytest.mark.parametrize("dtype", L_DTYPES, ids=str)
    @pytest.mark.parametrize("slots", L_SLOTS, ids=str)
    @pytest.mark.parametrize("xshape", L_XSHAPES, ids=str)
    def test_launcher_against_reference(self, xshape, slots, dtype, seed, poison):
        x, g, h, w = _l_inputs(xshape, slots, dtype)
        eps = random.choice([1e-5, 1e-3, 0.5])
        _l_run_bwd(x, g, w, eps, seed, poison)
        _l_run_bwd_bwd(x, g, h, w, eps, seed, poison)

    @_launchers
    @pytest.mark.parametrize("slots", [(), (3,)], ids=str)
    def test_launcher_large_mean_offset_fp32(self, slots, seed, poison):
        """x = 100 + noise in float32: the per-channel pivot keeps the variance from cancelling."""
        x, g, h, w = _l_inputs((4, 3, 6, 5), slots, torch.float32, offset=100.0)
        _l_run_bwd(x, g, w, 1e-5, seed, poison)
        _l_run_bwd_bwd(x, g, h, w, 1e-5, seed, poison)
        # σ/μ = 1e-5: a naive E[x²] - E[x]² in float32 (ulp(1e6) = 0.0625 against σ² = 1e-4) would be
        # garbage, and so would x - μ with μ rounded to float32 (ulp(1000) * r ~ 6e-3 in x̂)
        x = (1000.0 + 0.01 * torch.randn(4, 3, 6, 5, dtype=torch.float64)).to(L_DEVICE, torch.float32)
        _l_run_bwd(x, g, w, 1e-8, seed, poison, "bn_train_bwd (σ/μ = 1e-5)")

    @_launchers
    @pytest.mark.parametrize("xshape,slots", [((3, 2, 4, 5), (2,)), ((5, 3), ()), ((2, 3, 37), (2,)), ((7, 2, 3, 3), ())],
                             ids=str)
    def test_launcher_small_blocks_ragged_tiles_and_split(self, xshape, slots, seed, poison, monkeypatch):
        """Blocks of 16 elements (N * L not a multiple of them, ragged tiles along N and L) and the
        reduction split over several programs per channel."""
        monkeypatch.setattr(bn, "_RED_BLOCK", 16)
        monkeypatch.setattr(bn, "_EW_BLOCK", 16)
        monkeypatch.setattr(bn, "_TARGET_PROGRAMS", 64)
        x, g, h, w = _l_inputs(xshape, slots, torch.float64, offset=3.0)
        _l_run_bwd(x, g, w, 1e-3, seed, poison)
        _l_run_bwd_bwd(x, g, h, w, 1e-3, seed, poison)

    @_launchers
    def test_launcher_default_blocks_over_one_block(self, seed, poison):
        """N * L over one reduction block and not a multiple of it, at the default block sizes."""
        x, g, h, w = _l_inputs((3, 2, 1031), (2,), torch.float32)
        _l_run_bwd(x, g, w, 1e-5, seed, poison)
        _l_run_bwd_bwd(x, g, h, w, 1e-5, seed, poison)

    @_launchers
    def test_launcher_int64_offsets(self, seed, poison, monkeypatch):
        """The int64-offset variants (taken for tensors of 2^31 elements or more) on small tensors."""
        monkeypatch.setattr(bn, "_INT32_LIMIT", 0)
        monkeypatch.setattr(bn, "_RED_BLOCK", 16)
        monkeypatch.setattr(bn, "_EW_BLOCK", 16)
        x, g, h, w = _l_inputs((3, 2, 4, 5), (2,), torch.float64)
        _l_run_bwd(x, g, w, 1e-3, seed, poison)
        _l_run_bwd_bwd(x, g, h, w, 1e-3, seed, poison)

    @_launchers
    def test_launcher_weight_of_another_dtype(self, seed, poison):
        """float32 weight with float16 data (autocast): d_w keeps the weight's dtype."""
        x, g, h, w = _l_inputs((3, 2, 4), (2,), torch.float16, wdtype=torch.float32)
        _l_run_bwd(x, g, w, 1e-3, seed, poison)
        _l_run_bwd_bwd(x, g, h, w, 1e-3, seed, poison)

    @_launchers
    def test_launcher_non_contiguous_inputs(self, seed):
        dtype = torch.float64
        x = torch.randn(5, 3, 4, dtype=dtype, device=L_DEVICE).permute(1, 0, 2)       # (3, 5, 4)
        g = torch.randn(4, 3, 5, 2, dtype=dtype, device=L_DEVICE).permute(3, 1, 2, 0)  # (2, 3, 5, 4)
        h = torch.randn_like(g)
        w = torch.randn(10, dtype=dtype, device=L_DEVICE)[::2]
        _l_check(bn.bn_train_bwd(g, x, w, 1e-3), reference.bn_train_bwd(g, x, w, 1e-3), g, seed, "bwd")
        for out, exp, like in zip(bn.bn_train_bwd_bwd(h, g, x, w, 1e-3), reference.bn_train_bwd_bwd(h, g, x, w, 1e-3),
                                  (g, x, w)):
            _l_check(out, exp, like, seed, "bwd_bwd")

    @_launchers
    def test_launcher_constant_channel_and_eps_zero(self, seed):
        """A constant channel (σ² = 0, r = eps^-1/2) and eps = 0 on a non-degenerate one."""
        x = torch.randn(4, 2, 3, dtype=torch.float64, device=L_DEVICE)
        x[:, 0] = 7.25
        g, h = torch.randn(2, 4, 2, 3, dtype=torch.float64, device=L_DEVICE).unbind(0)
        w = torch.tensor([0.5, -2.0], dtype=torch.float64, device=L_DEVICE)
        _l_check(bn.bn_train_bwd(g, x, w, 0.1), reference.bn_train_bwd(g, x, w, 0.1), g, seed, "constant channel")
        for out, exp, like in zip(bn.bn_train_bwd_bwd(h, g, x, w, 0.1), reference.bn_train_bwd_bwd(h, g, x, w, 0.1), (g, x, w)):
            _l_check(out, exp, like, seed, "constant channel bwd_bwd")
        x = torch.randn(4, 2, 3, dtype=torch.float64, device=L_DEVICE)
        _l_check(bn.bn_train_bwd(g, x, w, 0.0), reference.bn_train_bwd(g, x, w, 0.0), g, seed, "eps = 0")

    @_launchers
    def test_launcher_closed_form(self):
        """One channel, x = (-1, 1): μ = 0, σ² = 1, x̂ = x / sqrt(1 + eps)."""
        eps = 0.25
        r = (1 + eps) ** -0.5
        x = torch.tensor([[-1.0], [1.0]], dtype=torch.float64, device=L_DEVICE)
        w = torch.tensor([2.0], dtype=torch.float64, device=L_DEVICE)
        g = torch.tensor([[3.0], [5.0]], dtype=torch.float64, device=L_DEVICE)
        h = torch.tensor([[1.0], [0.0]], dtype=torch.float64, device=L_DEVICE)
        # mean(g) = 4, mean(g x̂) = r (−3 + 5)/2 = r, s = 2r: out = 2r (g − 4 − x r²)
        exp = [2 * r * (3 - 4 + r * r), 2 * r * (5 - 4 - r * r)]
        torch.testing.assert_close(bn.bn_train_bwd(g, x, w, eps).flatten().tolist(), exp)
        d_g, d_x, d_w = bn.bn_train_bwd_bwd(h, g, x, w, eps)
        # A = 1/2, Bm = −r/2, ḡ = 4, m = r, Dn = 3/2 − 2 + r²/2
        A, Bm, gb, m = 0.5, -r / 2, 4.0, r
        Dn = 1.5 - A * gb - Bm * m
        xh = [-r, r]
        torch.testing.assert_close(d_g.flatten().tolist(), [2 * r * (hv - A - xv * Bm) for hv, xv in zip([1.0, 0.0], xh)])
        torch.testing.assert_close(
            d_x.flatten().tolist(),
            [-2 * r * r * (m * (hv - A) + Bm * (gv - gb) + (Dn - 2 * m * Bm) * xv)
             for hv, gv, xv in zip([1.0, 0.0], [3.0, 5.0], xh)])
        torch.testing.assert_close(d_w.tolist(), [r * Dn * 2])

    @_launchers
    def test_launcher_empty(self, seed):
        w = torch.randn(2, device=L_DEVICE)
        # no slots' worth of data: empty d_g, d_x and d_w are empty sums (zeros)
        x = torch.randn(3, 2, 5, device=L_DEVICE)
        g = torch.randn(0, 3, 2, 5, device=L_DEVICE)
        assert bn.bn_train_bwd(g, x, w, 1e-5).shape == g.shape
        d_g, d_x, d_w = bn.bn_train_bwd_bwd(g, g, x, w, 1e-5)
        assert d_g.shape == g.shape and d_x.shape == x.shape and d_w.shape == w.shape
        assert (d_x == 0).all() and (d_w == 0).all()
        # an empty batch: undefined statistics, NaN d_w as in the reference
        x = torch.randn(0, 2, 5, device=L_DEVICE)
        g = torch.randn(2, 0, 2, 5, device=L_DEVICE)
        assert bn.bn_train_bwd(g, x, w, 1e-5).shape == g.shape
        d_g, d_x, d_w = bn.bn_train_bwd_bwd(g, g, x, w, 1e-5)
        assert d_g.shape == g.shape and d_x.shape == x.shape and d_w.isnan().all()

    @_launchers
    def test_launcher_argument_errors(self):
        x = torch.randn(3, 4, device=L_DEVICE)
        w = torch.randn(4, device=L_DEVICE)
        g = torch.randn(3, 4, device=L_DEVICE)
        with pytest.raises(ValueError, match="slot"):
            bn.bn_train_bwd(torch.randn(4, 3, device=L_DEVICE), x, w, 1e-5)
        with pytest.raises(ValueError, match="eps"):
            bn.bn_train_bwd(g, x, w, -1.0)
        with pytest.raises(ValueError, match="weight"):
            bn.bn_train_bwd(g, x, torch.randn(3, device=L_DEVICE), 1e-5)
        with pytest.raises(ValueError, match="N, C"):
            bn.bn_train_bwd(torch.randn(4, device=L_DEVICE), torch.randn(4, device=L_DEVICE), w, 1e-5)
        with pytest.raises(TypeError, match="floating"):
            bn.bn_train_bwd(torch.ones(3, 4, dtype=torch.int64, device=L_DEVICE), x, w, 1e-5)
        with pytest.raises(ValueError, match="equal"):
            bn.bn_train_bwd_bwd(torch.randn(2, 3, 4, device=L_DEVICE), g, x, w, 1e-5)
