"""Build fisnet_ext._C: C++ CPU kernels always; CUDA kernels when FISNET_CUDA=1 and the
installed torch is a CUDA build.  Install with `pip install --no-build-isolation -e .` so the
extension is compiled against the torch already installed."""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - message for a user who skipped step one
    raise SystemExit(
        "fisnet builds its kernels against an installed PyTorch: run `pip install torch` first, "
        "then `pip install --no-build-isolation -e .`"
    ) from exc

here = os.path.dirname(os.path.abspath(__file__))
cpu_sources = [os.path.join("csrc", "fisnet_ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

want_cuda = os.environ.get("FISNET_CUDA", "0") == "1"
if want_cuda and torch.version.cuda is None:
    print("fisnet: FISNET_CUDA=1 but this torch has no CUDA; building the CPU kernels only")
    want_cuda = False

# -fno-trapping-math lets gcc if-convert and vectorise the branch-free kernels (torch never
# enables FP traps); measured 20x faster heatmap backward on CPU.  -fopenmp-simd honours the
# `omp simd` reductions of the BatchNorm kernels (vectorised sums) without linking OpenMP.
cxx_flags = ["-O3", "-std=c++17", "-fno-trapping-math", "-fopenmp-simd"]
if want_cuda:
    ext = CUDAExtension(
        "fisnet_ext._C",
        cpu_sources + cuda_sources,
        define_macros=[("FISNET_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
    )
else:
    ext = CppExtension("fisnet_ext._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
