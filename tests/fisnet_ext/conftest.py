"""The op-family harness, shared by every tests/fisnet_ext/test_<family>.py (tests/README.md).

What the ladder of each family needs beyond tests/conftest.py (seed, poisoned, one_thread):
the (family, device) parameters with their skip marks, the family lookup, fast closeness checks
that name the seed, the check that a launcher wrote every element, and the `poison` fixture that
makes torch.empty / torch.empty_like hand NaN-filled memory to the Triton launchers.
"""
import contextlib

import pytest
import torch

from tests.conftest import HAVE_CUDA, INTERPRETED, poisoned  # noqa: F401  (re-exported for the family files)

cuda = pytest.mark.cuda

# Argument errors may surface as any of these (C++ checks raise RuntimeError, Python ones Type/ValueError).
ERRS = (RuntimeError, TypeError, ValueError)

ALL_THREADS = torch.get_num_threads()


def triton_on_cpu(triton_family) -> bool:
    """Triton kernels can run here on CPU tensors (the family's Triton ops exist and
    TRITON_INTERPRET=1, which tests/conftest.py sets without CUDA)."""
    return triton_family is not None and INTERPRETED


def skip_no_interp(triton_family):
    return pytest.mark.skipif(not triton_on_cpu(triton_family), reason="triton interpreter not active")


def family_cases(triton_family, with_cuda: bool, *, reference: bool = False):
    """(family name, device) parameters: the C++ kernels on CPU, Triton under the interpreter,
    the CUDA kernels and Triton on a GPU (marked `cuda`), and optionally the reference."""
    cases = [
        pytest.param("cpp", "cpu", id="cpp-cpu"),
        pytest.param("triton", "cpu", id="triton-cpu", marks=skip_no_interp(triton_family)),
    ]
    if reference:
        cases.append(pytest.param("reference", "cpu", id="reference-cpu"))
    cases += [
        pytest.param("native", "cuda", id="native-cuda", marks=[cuda, pytest.mark.skipif(
            not with_cuda, reason="CUDA kernels not built")]),
        pytest.param("triton", "cuda", id="triton-cuda", marks=[cuda, pytest.mark.skipif(
            triton_family is None, reason="triton not installed")]),
    ]
    return cases


def family_getter(native, triton, reference):
    """name -> op family: "cpp" and "native" are the compiled kernels (C++ on CPU, CUDA on GPUs)."""
    table = {"cpp": native, "native": native, "triton": triton, "reference": reference}
    return table.__getitem__


def tiny(name, device) -> bool:
    """The Triton interpreter is slow: tiny shapes only."""
    return name == "triton" and device == "cpu"


@contextlib.contextmanager
def kernel_threads(numel):
    """All threads for a kernel call over the C++ parallel grain (32768), so its parallel split
    runs (chunks that start and end inside a slot); tests otherwise run under `one_thread`."""
    if numel <= 32768 or ALL_THREADS <= 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(ALL_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def check_close(got, want, tol, seed, what):
    """got == want within tol (dict rtol/atol), same shape/dtype/device; NaN fails, an inf must be
    the reference's inf (a fast vectorised check first; torch.testing.assert_close where it fails)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)} (seed {seed})"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype} (seed {seed})"
    assert got.device == want.device, what
    g64, w64 = got.double(), want.double()
    ok = bool(((g64 - w64).abs() <= tol["atol"] + tol["rtol"] * w64.abs()).all())  # False on NaN
    if not ok:
        # assert_close decides, as these tests always did: it evaluates the bound in the tensors' own
        # dtype (an element exactly at the float32 bound can fail the float64 form above), and an inf
        # must be matched by the same inf (the fast form counts inf - inf as a failure); NaN fails
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what} (seed {seed}): {m}")


def check_written(out, expected, seed, what, like=None):
    """A launcher's output: shape/dtype/device of `like` (default: expected), contiguous, and no
    element left unwritten (NaN from `poison` where the expected value is not NaN)."""
    like = expected if like is None else like
    assert out.shape == like.shape, what
    assert out.dtype == like.dtype, what
    assert out.device == like.device, what
    assert out.is_contiguous(), what
    unwritten = torch.isnan(out) & ~torch.isnan(expected)
    assert not unwritten.any(), f"{what}: {int(unwritten.sum())} elements not written (seed {seed})"


@pytest.fixture
def poison(monkeypatch):
    """`poison(fn, *args)`: call fn with torch.empty / torch.empty_like returning NaN-filled
    memory, so an element a launcher fails to write shows as NaN."""
    real_like, real_empty = torch.empty_like, torch.empty

    def call(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(torch, "empty_like", lambda *a, **k: real_like(*a, **k).fill_(float("nan")))
            m.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
            return fn(*args)

    return call
