"""Triton kernels of training-mode BatchNorm's input gradient (fisnet_ext.triton.bn) against
fisnet_ext.reference.bn_train_bwd / bn_train_bwd_bwd.

On a machine without CUDA they run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets
it before anything imports triton), with tiny shapes: the interpreter is slow.  With CUDA they run
on the GPU, bf16 included.  Data are fresh random draws each run (the seed is in every failure
message).  The oracle is the reference evaluated in float64 on the same (rounded) inputs, so the
tolerances measure the kernels' own error.  Outputs are poisoned with NaN before the kernels run, so
an element a kernel fails to write shows.
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

from fisnet_ext.triton import bn  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# The interpreter has no bf16 (the kernels only convert fp16 to fp32, which it can do).
DTYPES = [torch.float32, torch.float64, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
XSHAPES = [(3, 2, 4, 5), (5, 3), (2, 3, 7)]
SLOTS = [(), (2,), (2, 3)]


@pytest.fixture
def seed():
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


@pytest.fixture
def poison(monkeypatch):
    """Make every torch.empty_like / torch.empty inside the launchers return NaN-filled memory."""
    real_like, real_empty = torch.empty_like, torch.empty

    def call(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(bn.torch, "empty_like", lambda *a, **k: real_like(*a, **k).fill_(float("nan")))
            m.setattr(bn.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
            return fn(*args)

    return call


def _tol(dtype):
    """(rtol, atol relative to the largest expected magnitude)."""
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


def _inputs(xshape, slots, dtype, offset=0.0, wdtype=None):
    x = torch.randn(xshape, dtype=torch.float64) * 2.0 + offset
    g = torch.randn((*slots, *xshape), dtype=torch.float64)
    h = torch.randn((*slots, *xshape), dtype=torch.float64)
    w = torch.randn(xshape[1], dtype=torch.float64)
    return x.to(DEVICE, dtype), g.to(DEVICE, dtype), h.to(DEVICE, dtype), w.to(DEVICE, wdtype or dtype)


def _oracle(fn, *args):
    """The reference evaluated in float64 on the given (already rounded) inputs."""
    return fn(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])


def _check(out, expected, like, seed, what):
    assert out.shape == like.shape, what
    assert out.dtype == like.dtype, what
    assert out.device == like.device, what
    assert out.is_contiguous(), what
    unwritten = torch.isnan(out) & ~torch.isnan(expected)
    assert not unwritten.any(), f"{what}: {int(unwritten.sum())} elements not written (seed {seed})"
    tol = _tol(out.dtype)
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(out.double(), expected.double(), rtol=tol, atol=tol * max(scale, 1e-3),
                               msg=lambda m: f"{what} (seed {seed}): {m}")


def _run_bwd(x, g, w, eps, seed, poison, what="bn_train_bwd"):
    out = poison(bn.bn_train_bwd, g, x, w, eps)
    _check(out, _oracle(ref.bn_train_bwd, g, x, w, eps), g, seed, what)


def _run_bwd_bwd(x, g, h, w, eps, seed, poison, what="bn_train_bwd_bwd"):
    outs = poison(bn.bn_train_bwd_bwd, h, g, x, w, eps)
    exps = _oracle(ref.bn_train_bwd_bwd, h, g, x, w, eps)
    assert len(outs) == 3
    for name, out, exp, like in zip(("d_g", "d_x", "d_w"), outs, exps, (g, x, w)):
        _check(out, exp, like, seed, f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slots", SLOTS, ids=str)
@pytest.mark.parametrize("xshape", XSHAPES, ids=str)
def test_against_reference(xshape, slots, dtype, seed, poison):
    x, g, h, w = _inputs(xshape, slots, dtype)
    eps = random.choice([1e-5, 1e-3, 0.5])
    _run_bwd(x, g, w, eps, seed, poison)
    _run_bwd_bwd(x, g, h, w, eps, seed, poison)


@pytest.mark.parametrize("slots", [(), (3,)], ids=str)
def test_large_mean_offset_fp32(slots, seed, poison):
    """x = 100 + noise in float32: the per-channel pivot keeps the variance from cancelling."""
    x, g, h, w = _inputs((4, 3, 6, 5), slots, torch.float32, offset=100.0)
    _run_bwd(x, g, w, 1e-5, seed, poison)
    _run_bwd_bwd(x, g, h, w, 1e-5, seed, poison)
    # σ/μ = 1e-5: a naive E[x²] - E[x]² in float32 (ulp(1e6) = 0.0625 against σ² = 1e-4) would be
    # garbage, and so would x - μ with μ rounded to float32 (ulp(1000) * r ~ 6e-3 in x̂)
    x = (1000.0 + 0.01 * torch.randn(4, 3, 6, 5, dtype=torch.float64)).to(DEVICE, torch.float32)
    _run_bwd(x, g, w, 1e-8, seed, poison, "bn_train_bwd (σ/μ = 1e-5)")


@pytest.mark.parametrize("xshape,slots", [((3, 2, 4, 5), (2,)), ((5, 3), ()), ((2, 3, 37), (2,)), ((7, 2, 3, 3), ())],
                         ids=str)
def test_small_blocks_ragged_tiles_and_split(xshape, slots, seed, poison, monkeypatch):
    """Blocks of 16 elements (N * L not a multiple of them, ragged tiles along N and L) and the
    reduction split over several programs per channel."""
    monkeypatch.setattr(bn, "_RED_BLOCK", 16)
    monkeypatch.setattr(bn, "_EW_BLOCK", 16)
    monkeypatch.setattr(bn, "_TARGET_PROGRAMS", 64)
    x, g, h, w = _inputs(xshape, slots, torch.float64, offset=3.0)
    _run_bwd(x, g, w, 1e-3, seed, poison)
    _run_bwd_bwd(x, g, h, w, 1e-3, seed, poison)


def test_default_blocks_over_one_block(seed, poison):
    """N * L over one reduction block and not a multiple of it, at the default block sizes."""
    x, g, h, w = _inputs((3, 2, 1031), (2,), torch.float32)
    _run_bwd(x, g, w, 1e-5, seed, poison)
    _run_bwd_bwd(x, g, h, w, 1e-5, seed, poison)


def test_int64_offsets(seed, poison, monkeypatch):
    """The int64-offset variants (taken for tensors of 2^31 elements or more) on small tensors."""
    monkeypatch.setattr(bn, "_INT32_LIMIT", 0)
    monkeypatch.setattr(bn, "_RED_BLOCK", 16)
    monkeypatch.setattr(bn, "_EW_BLOCK", 16)
    x, g, h, w = _inputs((3, 2, 4, 5), (2,), torch.float64)
    _run_bwd(x, g, w, 1e-3, seed, poison)
    _run_bwd_bwd(x, g, h, w, 1e-3, seed, poison)


def test_weight_of_another_dtype(seed, poison):
    """float32 weight with float16 data (autocast): d_w keeps the weight's dtype."""
    x, g, h, w = _inputs((3, 2, 4), (2,), torch.float16, wdtype=torch.float32)
    _run_bwd(x, g, w, 1e-3, seed, poison)
    _run_bwd_bwd(x, g, h, w, 1e-3, seed, poison)


def test_non_contiguous_inputs(seed):
    dtype = torch.float64
    x = torch.randn(5, 3, 4, dtype=dtype, device=DEVICE).permute(1, 0, 2)       # (3, 5, 4)
    g = torch.randn(4, 3, 5, 2, dtype=dtype, device=DEVICE).permute(3, 1, 2, 0)  # (2, 3, 5, 4)
    h = torch.randn_like(g)
    w = torch.randn(10, dtype=dtype, device=DEVICE)[::2]
    _check(bn.bn_train_bwd(g, x, w, 1e-3), ref.bn_train_bwd(g, x, w, 1e-3), g, seed, "bwd")
    for out, exp, like in zip(bn.bn_train_bwd_bwd(h, g, x, w, 1e-3), ref.bn_train_bwd_bwd(h, g, x, w, 1e-3),
                              (g, x, w)):
        _check(out, exp, like, seed, "bwd_bwd")


def test_constant_channel_and_eps_zero(seed):
    """A constant channel (σ² = 0, r = eps^-1/2) and eps = 0 on a non-degenerate one."""
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE)
    x[:, 0] = 7.25
    g, h = torch.randn(2, 4, 2, 3, dtype=torch.float64, device=DEVICE).unbind(0)
    w = torch.tensor([0.5, -2.0], dtype=torch.float64, device=DEVICE)
    _check(bn.bn_train_bwd(g, x, w, 0.1), ref.bn_train_bwd(g, x, w, 0.1), g, seed, "constant channel")
    for out, exp, like in zip(bn.bn_train_bwd_bwd(h, g, x, w, 0.1), ref.bn_train_bwd_bwd(h, g, x, w, 0.1), (g, x, w)):
        _check(out, exp, like, seed, "constant channel bwd_bwd")
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE)
    _check(bn.bn_train_bwd(g, x, w, 0.0), ref.bn_train_bwd(g, x, w, 0.0), g, seed, "eps = 0")


def test_closed_form():
    """One channel, x = (-1, 1): μ = 0, σ² = 1, x̂ = x / sqrt(1 + eps)."""
    eps = 0.25
    r = (1 + eps) ** -0.5
    x = torch.tensor([[-1.0], [1.0]], dtype=torch.float64, device=DEVICE)
    w = torch.tensor([2.0], dtype=torch.float64, device=DEVICE)
    g = torch.tensor([[3.0], [5.0]], dtype=torch.float64, device=DEVICE)
    h = torch.tensor([[1.0], [0.0]], dtype=torch.float64, device=DEVICE)
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


def test_empty(seed):
    w = torch.randn(2, device=DEVICE)
    # no slots' worth of data: empty d_g, d_x and d_w are empty sums (zeros)
    x = torch.randn(3, 2, 5, device=DEVICE)
    g = torch.randn(0, 3, 2, 5, device=DEVICE)
    assert bn.bn_train_bwd(g, x, w, 1e-5).shape == g.shape
    d_g, d_x, d_w = bn.bn_train_bwd_bwd(g, g, x, w, 1e-5)
    assert d_g.shape == g.shape and d_x.shape == x.shape and d_w.shape == w.shape
    assert (d_x == 0).all() and (d_w == 0).all()
    # an empty batch: undefined statistics, NaN d_w as in the reference
    x = torch.randn(0, 2, 5, device=DEVICE)
    g = torch.randn(2, 0, 2, 5, device=DEVICE)
    assert bn.bn_train_bwd(g, x, w, 1e-5).shape == g.shape
    d_g, d_x, d_w = bn.bn_train_bwd_bwd(g, g, x, w, 1e-5)
    assert d_g.shape == g.shape and d_x.shape == x.shape and d_w.isnan().all()


def test_argument_errors():
    x = torch.randn(3, 4, device=DEVICE)
    w = torch.randn(4, device=DEVICE)
    g = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="slot"):
        bn.bn_train_bwd(torch.randn(4, 3, device=DEVICE), x, w, 1e-5)
    with pytest.raises(ValueError, match="eps"):
        bn.bn_train_bwd(g, x, w, -1.0)
    with pytest.raises(ValueError, match="weight"):
        bn.bn_train_bwd(g, x, torch.randn(3, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="N, C"):
        bn.bn_train_bwd(torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE), w, 1e-5)
    with pytest.raises(TypeError, match="floating"):
        bn.bn_train_bwd(torch.ones(3, 4, dtype=torch.int64, device=DEVICE), x, w, 1e-5)
    with pytest.raises(ValueError, match="equal"):
        bn.bn_train_bwd_bwd(torch.randn(2, 3, 4, device=DEVICE), g, x, w, 1e-5)
