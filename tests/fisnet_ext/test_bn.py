"""The BatchNorm op family (fisnet_ext.bn_ops): ``bn_train_bwd(g, x, w, eps)``, the input-gradient
of training-mode BatchNorm, and its derivative ``bn_train_bwd_bwd``.  Every backend against the
reference and against PyTorch's own BatchNorm autograd, on fresh random data; fp64 gradcheck and
gradgradcheck; opcheck; vmap; argument errors.  (The Triton launchers are also tested on their
own in tests/test_bn_triton.py.)
"""
import pytest
import torch
import torch.nn.functional as F

import fisnet_ext
from fisnet_ext import bn_ops, ops, reference
from fisnet_ext.bn_ops import NATIVE, REFERENCE, TRITON

from tests.conftest import INTERPRETED

cuda = pytest.mark.cuda
skip_no_interp = pytest.mark.skipif(not (TRITON is not None and INTERPRETED), reason="triton interpreter not active")

FAMILY_CASES = [
    pytest.param("cpp", "cpu", id="cpp-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu", marks=skip_no_interp),
    pytest.param("reference", "cpu", id="reference-cpu"),
    pytest.param("native", "cuda", id="native-cuda", marks=[cuda, pytest.mark.skipif(
        not ops.WITH_CUDA, reason="CUDA kernels not built")]),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[cuda, pytest.mark.skipif(
        TRITON is None, reason="triton not installed")]),
]
GRAD_FAMILIES = [pytest.param("cpp", id="cpp"), pytest.param("triton", id="triton", marks=skip_no_interp),
                 pytest.param("reference", id="reference")]
ERRS = (RuntimeError, TypeError, ValueError)


def get_family(name):
    return {"cpp": NATIVE, "native": NATIVE, "triton": TRITON, "reference": REFERENCE}[name]


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


@pytest.mark.parametrize("name,device", FAMILY_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_against_reference_and_pytorch(name, device, dtype, offset, seed):
    fam = get_family(name)
    shapes = SHAPES + ([] if name == "triton" and device == "cpu" else SHAPES_BIG)
    for shape, slots in shapes:
        h, g, x, w = _data(shape, slots, dtype, device, offset)
        eps = 1e-3
        got = fam.bwd(g, x, w, eps)
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
        outs = fam.bwd_bwd(h, g, x, w, eps)
        refs = reference.bn_train_bwd_bwd(h.double(), g.double(), x.double(), w.double(), eps)
        scales = (wm * r * hm, wm * r * r * hm * gm, r * hm * gm * n * max(1, g.numel() // x.numel()))
        for o, ref_o, sc in zip(outs, refs, scales):
            assert o.shape == ref_o.shape and o.dtype == dtype
            torch.testing.assert_close(o.double(), ref_o, rtol=rtol, atol=atol * sc)


def test_reference_double_backward_is_pytorchs(seed):
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
def test_gradcheck_gradgradcheck_fp64(name, seed):
    fam = get_family(name)
    for shape, slots in [((3, 2, 2, 3), ()), ((4, 2, 3), (2,))]:
        h, g, x, w = (t.requires_grad_(True) for t in _data(shape, slots, torch.float64, "cpu"))
        f = lambda g, x, w: fam.bwd(g, x, w, 1e-2)  # noqa: E731
        assert torch.autograd.gradcheck(f, (g, x, w))
        assert torch.autograd.gradgradcheck(f, (g, x, w))
        f2 = lambda h, g, x, w: fam.bwd_bwd(h, g, x, w, 1e-2)  # noqa: E731
        assert torch.autograd.gradcheck(f2, (h, g, x, w))


@pytest.mark.parametrize("name", ["cpp", pytest.param("triton", marks=skip_no_interp)])
def test_opcheck(name, seed):
    prefix = "" if name == "cpp" else "_triton"
    h, g, x, w = _data((3, 2, 2, 3), (2,), torch.float64, "cpu")
    for t in (h, g, x, w):
        t.requires_grad_(True)
    torch.library.opcheck(getattr(torch.ops.fisnet, "bn_train_bwd" + prefix).default, (g, x, w, 1e-2))
    torch.library.opcheck(getattr(torch.ops.fisnet, "bn_train_bwd_bwd" + prefix).default, (h, g, x, w, 1e-2))


@pytest.mark.parametrize("name", ["cpp", "reference"])
def test_vmap_over_g_is_slots(name, seed):
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


def test_slots_sum_dx_dw(seed):
    h, g, x, w = _data((3, 2, 4), (3,), torch.float64, "cpu")
    dg, dx, dw = fisnet_ext.bn_train_bwd_bwd(h, g, x, w, 1e-3)
    per = [fisnet_ext.bn_train_bwd_bwd(h[i], g[i], x, w, 1e-3) for i in range(3)]
    torch.testing.assert_close(dg, torch.stack([p[0] for p in per]))
    torch.testing.assert_close(dx, sum(p[1] for p in per))
    torch.testing.assert_close(dw, sum(p[2] for p in per))


def test_errors():
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


def test_backend_choice():
    assert bn_ops.bn_family(torch.device("cpu"), "reference") is REFERENCE
    assert bn_ops.bn_family(torch.device("cpu"), "cpp") is NATIVE
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        bn_ops.bn_family(torch.device("cuda"), "cpp")
