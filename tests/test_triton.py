"""Triton kernels of the LRP-Flex ReLU against fisnet_ext.reference.

On a machine without CUDA they run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets
it before anything imports triton); with CUDA they run on the GPU, bf16/fp16 included.  Shapes and
data are fresh random draws each run (the seed is in every failure message).  The launchers'
outputs are poisoned with NaN before the kernel runs, so an element the kernel fails to write shows.
"""
import os
import random

import pytest
import torch

pytest.importorskip("triton")

from fisnet_ext import reference as ref  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

from fisnet_ext.triton import lrp_relu as tl  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# The interpreter has no bf16/fp16 arithmetic: test those on GPUs only.
DTYPES = [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if ON_GPU else [])
EPS = [0.0, 1e-2, 0.7]

# (x shape, slot dims): tiny shapes, odd sizes, a shape over one BLOCK, one large enough for the
# slot-tiled grid (x.numel() >= 4 * BLOCK with slots), and empty tensors.
SHAPES = [
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


@pytest.fixture
def seed():
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


@pytest.fixture
def poison(monkeypatch):
    """Make every torch.empty_like inside the launchers return NaN-filled memory."""
    real = torch.empty_like

    def nan_empty_like(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        return out.fill_(float("nan"))

    def call(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(tl.torch, "empty_like", nan_empty_like)
            return fn(*args)

    return call


def _tol(dtype):
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=2e-3)
    if dtype == torch.bfloat16:
        return dict(rtol=1.6e-2, atol=1e-2)
    return {}  # assert_close's defaults: fp32 rtol 1.3e-6 / atol 1e-5, fp64 rtol 1e-7 / atol 1e-7


def _inputs(xshape, slots, dtype):
    x = torch.randn(xshape, dtype=torch.float64)
    if x.numel():
        flat = x.view(-1)
        flat[torch.rand(flat.shape) < 0.2] = 0.0  # exact zeros: the x > 0 boundary
        flat[torch.rand(flat.shape) < 0.1] = 1e-4  # close above 0, where eps matters most
    g = torch.randn((*slots, *xshape), dtype=torch.float64)
    gg = torch.randn((*slots, *xshape), dtype=torch.float64)
    return (t.to(DEVICE, dtype) for t in (x, g, gg))


def _check(out, expected, dtype, seed, what):
    assert out.shape == expected.shape, what
    assert out.dtype == expected.dtype, what
    assert out.device == expected.device, what
    assert out.is_contiguous(), what
    unwritten = torch.isnan(out) & ~torch.isnan(expected)
    assert not unwritten.any(), f"{what}: {int(unwritten.sum())} elements not written (seed {seed})"
    torch.testing.assert_close(out, expected, **_tol(dtype), msg=lambda m: f"{what} (seed {seed}): {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("xshape,slots", SHAPES, ids=str)
def test_fwd(xshape, slots, dtype, seed, poison):
    x, _, _ = _inputs(xshape, slots, dtype)
    _check(poison(tl.lrp_relu_fwd, x), ref.lrp_relu_fwd(x), dtype, seed, "lrp_relu_fwd")


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("xshape,slots", SHAPES, ids=str)
def test_bwd(xshape, slots, dtype, eps, seed, poison):
    x, g, _ = _inputs(xshape, slots, dtype)
    _check(poison(tl.lrp_relu_bwd, g, x, eps), ref.lrp_relu_bwd(g, x, eps), dtype, seed, "lrp_relu_bwd")


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("xshape,slots", SHAPES, ids=str)
def test_bwd_bwd(xshape, slots, dtype, eps, seed, poison):
    x, g, gg = _inputs(xshape, slots, dtype)
    dg, dx = poison(tl.lrp_relu_bwd_bwd, gg, g, x, eps)
    edg, edx = ref.lrp_relu_bwd_bwd(gg, g, x, eps)
    _check(dg, edg, dtype, seed, "lrp_relu_bwd_bwd dg")
    _check(dx, edx, dtype, seed, "lrp_relu_bwd_bwd dx")


@pytest.mark.parametrize("xshape,slots", [((3, 1031), ()), ((5, 1025), (3,)), ((4 * 4096 + 13,), (2,))], ids=str)
def test_int64_offsets(xshape, slots, seed, poison, monkeypatch):
    """The int64-offset variants (taken for tensors of 2^31 elements or more) on small tensors."""
    monkeypatch.setattr(tl, "_INT32_LIMIT", 0)
    dtype = torch.float64
    x, g, gg = _inputs(xshape, slots, dtype)
    _check(poison(tl.lrp_relu_fwd, x), ref.lrp_relu_fwd(x), dtype, seed, "lrp_relu_fwd")
    _check(poison(tl.lrp_relu_bwd, g, x, 0.1), ref.lrp_relu_bwd(g, x, 0.1), dtype, seed, "lrp_relu_bwd")
    for out, exp in zip(poison(tl.lrp_relu_bwd_bwd, gg, g, x, 0.1), ref.lrp_relu_bwd_bwd(gg, g, x, 0.1)):
        _check(out, exp, dtype, seed, "lrp_relu_bwd_bwd")


def test_non_contiguous_inputs(seed):
    dtype = torch.float64
    x = torch.randn(6, 5, dtype=dtype, device=DEVICE).t()          # (5, 6), transposed
    g = torch.randn(6, 5, 3, dtype=dtype, device=DEVICE).permute(2, 1, 0)  # (3, 5, 6)
    gg = torch.randn_like(g)
    _check(tl.lrp_relu_fwd(x), ref.lrp_relu_fwd(x), dtype, seed, "fwd")
    _check(tl.lrp_relu_bwd(g, x, 0.01), ref.lrp_relu_bwd(g, x, 0.01), dtype, seed, "bwd")
    for out, exp in zip(tl.lrp_relu_bwd_bwd(gg, g, x, 0.01), ref.lrp_relu_bwd_bwd(gg, g, x, 0.01)):
        _check(out, exp, dtype, seed, "bwd_bwd")


def test_closed_form():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0], dtype=torch.float64, device=DEVICE)
    g = torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64, device=DEVICE)
    gg = torch.tensor([1.0, 1.0, 1.0, 5.0], dtype=torch.float64, device=DEVICE)
    eps = 1.0
    assert tl.lrp_relu_fwd(x).tolist() == [0.0, 0.0, 1.0, 3.0]
    assert tl.lrp_relu_bwd(g, x, eps).tolist() == [0.0, 0.0, 1.0, 1.5]
    dg, dx = tl.lrp_relu_bwd_bwd(gg, g, x, eps)
    assert dg.tolist() == [0.0, 0.0, 0.5, 3.75]
    assert dx.tolist() == [0.0, 0.0, 0.5, 5 * 2 * 1 / 16]
    # eps = 0: the plain ReLU gradient
    assert tl.lrp_relu_bwd(g, x, 0.0).tolist() == [0.0, 0.0, 2.0, 2.0]


def test_fwd_propagates_nan_like_torch_relu():
    x = torch.tensor([float("nan"), -1.0, 2.0], device=DEVICE)
    torch.testing.assert_close(tl.lrp_relu_fwd(x), torch.relu(x), equal_nan=True)


def test_argument_errors():
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="slot"):
        tl.lrp_relu_bwd(torch.randn(4, 3, device=DEVICE), x, 0.1)
    with pytest.raises(ValueError, match="eps"):
        tl.lrp_relu_bwd(torch.randn(3, 4, device=DEVICE), x, -1.0)
    with pytest.raises(TypeError, match="dtype"):
        tl.lrp_relu_bwd(torch.randn(3, 4, dtype=torch.float64, device=DEVICE), x, 0.1)
    with pytest.raises(TypeError, match="floating"):
        tl.lrp_relu_fwd(torch.ones(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="gg"):
        tl.lrp_relu_bwd_bwd(torch.randn(2, 3, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE), x, 0.1)
