"""Compile-check of the CUDA kernels (csrc/cuda/*.cu) with nvcc, also where torch is a CPU build
and no GPU is present: catches syntax, template and API errors before the code meets a GPU.
Skipped when nvcc is not on PATH.

The .cu files compile in parallel (one nvcc per file, up to the CPU count), and a successful
compile is remembered: its key is a hash of the .cu file, every header under csrc/, the nvcc
command and `nvcc --version`, and torch's version; a marker per key lives under
$FISNET_TEST_CACHE, else $XDG_CACHE_HOME/fisnet/nvcc-check, else ~/.cache/fisnet/nvcc-check.
A re-run with unchanged inputs passes without recompiling; any change (a source, a header, the
flags, the compiler, torch) is a miss and really compiles; failures are never remembered.
FISNET_NVCC_CACHE=0 always compiles.
"""
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_ext

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))

NVCC = shutil.which("nvcc")
if NVCC is None and os.environ.get("CUDA_HOME"):
    cand = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
    NVCC = str(cand) if cand.exists() else None

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")

# A CPU build of torch ships the c10/cuda headers but not this generated one.
_CMAKE_MACROS_STUB = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def _nvcc_command(src: Path, obj: Path, stub_dir: Path) -> list:
    common = list(getattr(cpp_ext, "COMMON_NVCC_FLAGS", [
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
    ]))
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    includes = [stub_dir, *cpp_ext.include_paths(), sysconfig.get_paths()["include"], CSRC]
    return [
        NVCC, "-c", str(src), "-o", str(obj),
        "-std=c++17", "-O3", "--use_fast_math",
        "-gencode=arch=compute_90,code=sm_90",
        "--compiler-options", "-fPIC",
        *common,
        "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DFISNET_WITH_CUDA=1",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *[f"-I{p}" for p in includes],
    ]


def _cache_dir() -> Path:
    if os.environ.get("FISNET_TEST_CACHE"):
        return Path(os.environ["FISNET_TEST_CACHE"]) / "nvcc-check"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fisnet" / "nvcc-check"


def _nvcc_version() -> str:
    return subprocess.run([NVCC, "--version"], capture_output=True, text=True, timeout=60).stdout


def _cache_key(src: Path, cmd: list, nvcc_version: str) -> str:
    """Everything the compile's outcome depends on that can change between runs of this file."""
    h = hashlib.sha256()
    h.update(src.read_bytes())
    for hdr in sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".hpp", ".inc")):
        h.update(str(hdr.relative_to(CSRC)).encode() + b"\0" + hdr.read_bytes() + b"\0")
    h.update("\0".join(cmd).encode())
    h.update(nvcc_version.encode())
    h.update(torch.__version__.encode() + str(Path(torch.__file__).parent).encode())
    return h.hexdigest()


def _compile(src: Path, work: Path):
    """nvcc on one file in its own directory (the stub header, the object file)."""
    d = work / src.stem
    stub = d / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text(_CMAKE_MACROS_STUB)
    obj = d / (src.stem + ".o")
    cmd = _nvcc_command(src, obj, d)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return cmd, proc, obj.exists() and obj.stat().st_size > 0


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """src -> ("cached", key) | ("compiled", key, cmd, proc, obj_ok): every .cu file whose key is
    not remembered compiles now, all in parallel."""
    work = tmp_path_factory.mktemp("nvcc")
    use_cache = os.environ.get("FISNET_NVCC_CACHE", "1") != "0"
    version = _nvcc_version()
    cache = _cache_dir()
    results, todo = {}, []
    for src in CUDA_SOURCES:
        # the key is taken over the command with a fixed placeholder directory (tmp paths vary)
        key = _cache_key(src, _nvcc_command(src, Path("/OBJ") / (src.stem + ".o"), Path("/STUB")), version)
        if use_cache and (cache / f"{src.stem}-{key}.ok").exists():
            results[src] = ("cached", key)
        else:
            todo.append((src, key))
    if todo:
        workers = max(1, min(len(todo), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futs = {src: (key, pool.submit(_compile, src, work)) for src, key in todo}
            for src, (key, fut) in futs.items():
                results[src] = ("compiled", key, *fut.result())
    return results


def _remember(src: Path, key: str):
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for old in cache.glob(f"{src.stem}-*.ok"):  # one marker per source: the latest good one
            old.unlink()
        fd, tmp = tempfile.mkstemp(dir=cache)
        with os.fdopen(fd, "w") as f:
            f.write(f"{src.name} compiled with nvcc\n")
        os.replace(tmp, cache / f"{src.stem}-{key}.ok")
    except OSError:  # a read-only or full cache only costs the next run its compile
        pass


@pytest.mark.parametrize("src", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles(src, compiled):
    res = compiled[src]
    if res[0] == "cached":
        return  # these exact inputs compiled before (see the module docstring)
    _, key, cmd, proc, obj_ok = res
    assert proc.returncode == 0, (
        f"nvcc failed ({proc.returncode}) on {src.name}\n$ {' '.join(cmd)}\n"
        f"--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    )
    assert obj_ok
    _remember(src, key)


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, f"no .cu files under {CSRC / 'cuda'}"
