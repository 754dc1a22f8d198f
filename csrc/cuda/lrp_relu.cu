// CUDA kernels of the LRP-Flex ReLU: forward (plain ReLU), heatmap backward and its double
// backward.  Same semantics and checks as csrc/cpu/lrp_relu.cpp: `x` is the ReLU's input, `g`
// (and `gg`) may carry extra leading "slot" dimensions (g.numel() == M * x.numel()), over which
// x is broadcast.  Half and bfloat16 are computed in float (opmath), double stays double.
//
// Layout: every kernel is memory bound, so each thread moves 16 bytes per tensor per step
// (128-bit loads/stores) when the pointers are 16-byte aligned and a slot holds a whole number
// of vectors; otherwise it falls back to one element per step.  The grid is 2-D: blockIdx.y
// walks the slots, blockIdx.x a grid-stride loop over one slot's x.  So x is indexed without a
// division per element and each block reads x contiguously; all offsets are int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../fisnet_common.h"
#include "launch.cuh"

namespace fisnet {
namespace {

using namespace cuda_launch;

constexpr int kMaxGridY = 65535;


// ---- element-wise bodies (acc_t arithmetic) -------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t relu_op(acc_t v) {
  // like torch.relu: NaN propagates
  return (v > acc_t(0) || v != v) ? v : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t bwd_op(acc_t g, acc_t x, acc_t eps) {
  return x > acc_t(0) ? g * x / (x + eps) : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ void bwd_bwd_op(acc_t gg, acc_t g, acc_t x, acc_t eps, acc_t& dg, acc_t& dx) {
  if (x > acc_t(0)) {
    acc_t inv = acc_t(1) / (x + eps);
    dg = gg * x * inv;
    dx = gg * g * (eps * inv * inv);
  } else {
    dg = acc_t(0);
    dx = acc_t(0);
  }
}

// ---- kernels --------------------------------------------------------------------------------

// y = relu(x) over n elements; VEC elements per step (VEC == 1: scalar path).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
relu_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t v = tid; v < nvec; v += stride) {
    P p = reinterpret_cast<const P*>(x)[v];
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = static_cast<scalar_t>(relu_op(static_cast<acc_t>(p.v[k])));
    reinterpret_cast<P*>(y)[v] = p;
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    y[i] = static_cast<scalar_t>(relu_op(static_cast<acc_t>(x[i])));
  }
}

// out[s, i] = bwd(g[s, i], x[i]) for slots s < M and i < nx.  With VEC > 1, nx % VEC == 0 and
// all pointers are 16-byte aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t nx,
           int64_t M, double eps_d) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = nx / VEC;
  for (int64_t s = blockIdx.y; s < M; s += gridDim.y) {
    const scalar_t* gs = g + s * nx;
    scalar_t* os = out + s * nx;
    for (int64_t v = tid; v < nvec; v += stride) {
      const P xp = reinterpret_cast<const P*>(x)[v];
      const P gp = reinterpret_cast<const P*>(gs)[v];
      P op;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        op.v[k] = static_cast<scalar_t>(bwd_op(static_cast<acc_t>(gp.v[k]), static_cast<acc_t>(xp.v[k]), eps));
      }
      reinterpret_cast<P*>(os)[v] = op;
    }
    for (int64_t i = nvec * VEC + tid; i < nx; i += stride) {
      os[i] = static_cast<scalar_t>(bwd_op(static_cast<acc_t>(gs[i]), static_cast<acc_t>(x[i]), eps));
    }
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
bwd_bwd_kernel(const scalar_t* __restrict__ gg, const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
               scalar_t* __restrict__ dg, scalar_t* __restrict__ dx, int64_t nx, int64_t M, double eps_d) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = nx / VEC;
  for (int64_t s = blockIdx.y; s < M; s += gridDim.y) {
    const int64_t base = s * nx;
    const scalar_t* ggs = gg + base;
    const scalar_t* gs = g + base;
    scalar_t* dgs = dg + base;
    scalar_t* dxs = dx + base;
    for (int64_t v = tid; v < nvec; v += stride) {
      const P xp = reinterpret_cast<const P*>(x)[v];
      const P gp = reinterpret_cast<const P*>(gs)[v];
      const P ggp = reinterpret_cast<const P*>(ggs)[v];
      P dgp, dxp;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_t a, b;
        bwd_bwd_op(static_cast<acc_t>(ggp.v[k]), static_cast<acc_t>(gp.v[k]), static_cast<acc_t>(xp.v[k]), eps, a, b);
        dgp.v[k] = static_cast<scalar_t>(a);
        dxp.v[k] = static_cast<scalar_t>(b);
      }
      reinterpret_cast<P*>(dgs)[v] = dgp;
      reinterpret_cast<P*>(dxs)[v] = dxp;
    }
    for (int64_t i = nvec * VEC + tid; i < nx; i += stride) {
      acc_t a, b;
      bwd_bwd_op(static_cast<acc_t>(ggs[i]), static_cast<acc_t>(gs[i]), static_cast<acc_t>(x[i]), eps, a, b);
      dgs[i] = static_cast<scalar_t>(a);
      dxs[i] = static_cast<scalar_t>(b);
    }
  }
}

// ---- launch helpers -------------------------------------------------------------------------


// 2-D grid for M slots of `work` steps each: x covers one slot's steps (capped at what the GPU
// holds resident, the rest is the grid-stride loop), y the slots (capped likewise and at 65535).
inline dim3 make_grid(int64_t work, int64_t M) {
  const int64_t resident = resident_blocks();
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, resident));
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({M, std::max<int64_t>(1, resident / gx), kMaxGridY}));
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fisnet: ", name, " must be a CUDA tensor, got one on ", t.device());
}

at::Tensor lrp_relu_fwd_cuda(const at::Tensor& x) {
  check_float(x, "x");
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto y = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "lrp_relu_fwd_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (aligned16(xp) && aligned16(yp)) {
      relu_fwd_kernel<scalar_t, V><<<make_grid(n / V + n % V, 1), kThreads, 0, stream>>>(xp, yp, n);
    } else {
      relu_fwd_kernel<scalar_t, 1><<<make_grid(n, 1), kThreads, 0, stream>>>(xp, yp, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor lrp_relu_bwd_cuda(const at::Tensor& g, const at::Tensor& x, double eps) {
  check_bwd_args(g, x, eps);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto out = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return out;
  const int64_t nx = xc.numel();
  const int64_t M = n / nx;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "lrp_relu_bwd_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (nx % V == 0 && aligned16(gp) && aligned16(xp) && aligned16(op)) {
      bwd_kernel<scalar_t, V><<<make_grid(nx / V, M), kThreads, 0, stream>>>(gp, xp, op, nx, M, eps);
    } else {
      bwd_kernel<scalar_t, 1><<<make_grid(nx, M), kThreads, 0, stream>>>(gp, xp, op, nx, M, eps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lrp_relu_bwd_bwd_cuda(const at::Tensor& gg, const at::Tensor& g,
                                                        const at::Tensor& x, double eps) {
  check_bwd_bwd_args(gg, g, x, eps);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto ggc = gg.contiguous();
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto dg = at::empty_like(gc);
  auto dx = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return {dg, dx};
  const int64_t nx = xc.numel();
  const int64_t M = n / nx;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "lrp_relu_bwd_bwd_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    const scalar_t* ggp = ggc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    if (nx % V == 0 && aligned16(ggp) && aligned16(gp) && aligned16(xp) && aligned16(dgp) && aligned16(dxp)) {
      bwd_bwd_kernel<scalar_t, V><<<make_grid(nx / V, M), kThreads, 0, stream>>>(ggp, gp, xp, dgp, dxp, nx, M, eps);
    } else {
      bwd_bwd_kernel<scalar_t, 1><<<make_grid(nx, M), kThreads, 0, stream>>>(ggp, gp, xp, dgp, dxp, nx, M, eps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dg, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fisnet, CUDA, m) {
  m.impl("lrp_relu_fwd", &lrp_relu_fwd_cuda);
  m.impl("lrp_relu_bwd", &lrp_relu_bwd_cuda);
  m.impl("lrp_relu_bwd_bwd", &lrp_relu_bwd_bwd_cuda);
}

}  // namespace fisnet
