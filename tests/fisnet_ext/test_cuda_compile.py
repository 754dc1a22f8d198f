"""Compile-check of the CUDA kernels (csrc/cuda/*.cu) with nvcc, also where torch is a CPU build
and no GPU is present: catches syntax, template and API errors before the code meets a GPU.
Skipped when nvcc is not on PATH."""
import os
import shutil
import subprocess
import sys
import sysconfig
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


@pytest.mark.parametrize("src", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles(src, tmp_path):
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text(_CMAKE_MACROS_STUB)
    obj = tmp_path / (src.stem + ".o")
    cmd = _nvcc_command(src, obj, tmp_path)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"nvcc failed ({proc.returncode}) on {src.name}\n$ {' '.join(cmd)}\n"
        f"--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    )
    assert obj.exists() and obj.stat().st_size > 0


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, f"no .cu files under {CSRC / 'cuda'}"
