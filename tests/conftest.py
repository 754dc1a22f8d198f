"""Shared test set-up of the whole suite (tests/README.md): CUDA skips, the `seed` and
`one_thread` fixtures, output poisoning.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, first thing:
without CUDA the Triton kernels run on CPU tensors under the interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

HAVE_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

devices = ["cpu"] + (["cuda"] if HAVE_CUDA else [])

requires_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip without CUDA."""
    if HAVE_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: the test needs a CUDA device (skipped without one)")


def draw_seed() -> int:
    env = os.environ.get("FISNET_TEST_SEED")
    if env:
        return int(env)
    return random.SystemRandom().randrange(2**31)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    spinning threads on a busy machine multiply the run time of many tiny calls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def seed():
    """A fresh random seed per test (override with FISNET_TEST_SEED); printed for reproduction."""
    s = draw_seed()
    torch.manual_seed(s)
    random.seed(s)
    print(f"seed = {s}  (reproduce with FISNET_TEST_SEED={s})")
    return s


def _expected_outputs(args):
    """Shapes/dtypes/devices of the outputs of an elementwise op: the largest tensor argument."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    big = max(tensors, key=lambda t: t.numel())
    return big


def poisoned(fn, *args, n_outputs=None, like=None):
    """Call `fn(*args)` after allocating NaN-filled tensors of its outputs' size/dtype/device
    and freeing them, so the allocator may hand that memory to the op (reliable on CUDA's
    caching allocator and for small CPU sizes): an element the op fails to write stays NaN."""
    ref = _expected_outputs(args) if like is None else like
    if n_outputs is None:
        n_outputs = 2 if sum(isinstance(a, torch.Tensor) for a in args) >= 3 else 1
    bufs = [torch.full(ref.shape, float("nan"), dtype=ref.dtype, device=ref.device) for _ in range(n_outputs)]
    del bufs
    return fn(*args)
