"""pytest set-up for the kernel benchmarks (bench/test_kernels_bench.py).

These run only when asked: `python -m pytest bench --benchmark-only`. The default test run
(`python -m pytest -q`, testpaths = tests) never collects this folder; and when bench/ is
collected without --benchmark-only, every benchmark is skipped (no slow-down of a plain run).

Saved results (`--benchmark-autosave`, `--benchmark-save=NAME`) go to bench/results/pytest-benchmark/
instead of pytest-benchmark's default ./.benchmarks, unless --benchmark-storage is given; nothing
is saved unless asked, so committed results are never overwritten by a plain run. Compare with
saved runs with `--benchmark-compare` (the last one) or `--benchmark-compare=NNNN`.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels are benchmarked on GPUs only; never time the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import pytest_benchmark  # noqa: F401
    HAVE_BENCHMARK = True
except ImportError:
    HAVE_BENCHMARK = False

STORAGE = Path(__file__).resolve().parent / "results" / "pytest-benchmark"
_DEFAULT_STORAGE = "file://./.benchmarks"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pytest-benchmark creates its storage folder on start-up: point it into bench/results only
    # when a run saves or compares (the default ./.benchmarks is git-ignored)
    if not HAVE_BENCHMARK or config.getoption("benchmark_storage", None) != _DEFAULT_STORAGE:
        return
    if any(config.getoption(o, None) for o in ("benchmark_save", "benchmark_autosave", "benchmark_compare",
                                                 "benchmark_compare_fail")):
        config.option.benchmark_storage = f"file://{STORAGE}"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    ours = [it for it in items if Path(str(it.fspath)).resolve().parent == here]
    if not HAVE_BENCHMARK:
        skip = pytest.mark.skip(reason="pytest-benchmark is not installed (pip install pytest-benchmark)")
    elif not config.getoption("benchmark_only", False):
        skip = pytest.mark.skip(reason="kernel benchmarks run only with --benchmark-only")
    else:
        return
    for it in ours:
        it.add_marker(skip)
