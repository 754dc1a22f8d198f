// CUDA kernels of the lrp_act family: forward phi(z), identity-rule heatmap backward g * h(z)
// and its double backward (gg * h(z), gg * g * h'(z)).  Formulas shared with the CPU kernels
// (csrc/act_math.h); checks as csrc/cpu/act.cpp.  `g` (and `gg`) may carry leading slot
// dimensions over which x is broadcast.  Half and bfloat16 are computed in float.
//
// Layout as csrc/cuda/lrp_relu.cu: 128-bit packs when the pointers are 16-byte aligned and a
// slot holds a whole number of packs (else one element per step), a 2-D grid (blockIdx.y walks
// the slots, blockIdx.x a grid-stride loop over one slot's x), int64 offsets.  The kind is a
// template parameter: one kernel per kind.
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
#include <type_traits>

#include "../act_math.h"
#include "../fisnet_common.h"
#include "launch.cuh"

namespace fisnet {
namespace {

using namespace cuda_launch;

constexpr int kMaxGridYAct = 65535;

template <int K, typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
act_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, double param) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const acc_t p = static_cast<acc_t>(param);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t v = tid; v < nvec; v += stride) {
    P xp = reinterpret_cast<const P*>(x)[v];
#pragma unroll
    for (int k = 0; k < VEC; ++k) xp.v[k] = static_cast<scalar_t>(act::phi<K, acc_t>(static_cast<acc_t>(xp.v[k]), p));
    reinterpret_cast<P*>(y)[v] = xp;
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    y[i] = static_cast<scalar_t>(act::phi<K, acc_t>(static_cast<acc_t>(x[i]), p));
  }
}

// out[s, i] = g[s, i] * h(x[i]) for slots s < M, i < nx.
template <int K, typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
act_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
               int64_t nx, int64_t M, double param, double eps_d) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const acc_t p = static_cast<acc_t>(param);
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
        acc_t h, hp;
        act::factor<K, false, acc_t>(static_cast<acc_t>(xp.v[k]), p, eps, h, hp);
        op.v[k] = static_cast<scalar_t>(static_cast<acc_t>(gp.v[k]) * h);
      }
      reinterpret_cast<P*>(os)[v] = op;
    }
    for (int64_t i = nvec * VEC + tid; i < nx; i += stride) {
      acc_t h, hp;
      act::factor<K, false, acc_t>(static_cast<acc_t>(x[i]), p, eps, h, hp);
      os[i] = static_cast<scalar_t>(static_cast<acc_t>(gs[i]) * h);
    }
  }
}

template <int K, typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
act_bwd_bwd_kernel(const scalar_t* __restrict__ gg, const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                   scalar_t* __restrict__ dg, scalar_t* __restrict__ dx, int64_t nx, int64_t M, double param,
                   double eps_d) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const acc_t p = static_cast<acc_t>(param);
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
        acc_t h, hp;
        act::factor<K, true, acc_t>(static_cast<acc_t>(xp.v[k]), p, eps, h, hp);
        const acc_t ggv = static_cast<acc_t>(ggp.v[k]);
        dgp.v[k] = static_cast<scalar_t>(ggv * h);
        dxp.v[k] = static_cast<scalar_t>(ggv * static_cast<acc_t>(gp.v[k]) * hp);
      }
      reinterpret_cast<P*>(dgs)[v] = dgp;
      reinterpret_cast<P*>(dxs)[v] = dxp;
    }
    for (int64_t i = nvec * VEC + tid; i < nx; i += stride) {
      acc_t h, hp;
      act::factor<K, true, acc_t>(static_cast<acc_t>(x[i]), p, eps, h, hp);
      const acc_t ggv = static_cast<acc_t>(ggs[i]);
      dgs[i] = static_cast<scalar_t>(ggv * h);
      dxs[i] = static_cast<scalar_t>(ggv * static_cast<acc_t>(gs[i]) * hp);
    }
  }
}

inline dim3 act_grid(int64_t work, int64_t M) {
  const int64_t resident = resident_blocks();
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, resident));
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({M, std::max<int64_t>(1, resident / gx), kMaxGridYAct}));
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

template <typename F>
void with_kind(int64_t kind, const F& f) {
  switch (kind) {
    case act::kRelu: f(std::integral_constant<int, act::kRelu>{}); break;
    case act::kRelu6: f(std::integral_constant<int, act::kRelu6>{}); break;
    case act::kLeakyRelu: f(std::integral_constant<int, act::kLeakyRelu>{}); break;
    case act::kGelu: f(std::integral_constant<int, act::kGelu>{}); break;
    case act::kGeluTanh: f(std::integral_constant<int, act::kGeluTanh>{}); break;
    case act::kSilu: f(std::integral_constant<int, act::kSilu>{}); break;
    case act::kHardswish: f(std::integral_constant<int, act::kHardswish>{}); break;
    case act::kElu: f(std::integral_constant<int, act::kElu>{}); break;
    case act::kMish: f(std::integral_constant<int, act::kMish>{}); break;
    case act::kSoftplus: f(std::integral_constant<int, act::kSoftplus>{}); break;
    default: TORCH_CHECK(false, "fisnet: unknown activation kind ", kind);
  }
}

inline void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fisnet: ", name, " must be a CUDA tensor, got one on ", t.device());
}

at::Tensor act_fwd_cuda(const at::Tensor& x, int64_t kind, double param) {
  check_float(x, "x");
  check_act_kind("act_fwd", kind, param);
  check_cuda_tensor(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  if (kind != act::kRelu && kind != act::kRelu6 && kind != act::kLeakyRelu && kind != act::kHardswish) {
    return act_fwd_aten(x, kind, param).contiguous();  // PyTorch's own kernels: exactly F.*
  }
  auto xc = x.contiguous();
  auto y = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "act_fwd_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    with_kind(kind, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      if (aligned16(xp) && aligned16(yp)) {
        act_fwd_kernel<K, scalar_t, V><<<act_grid(n / V + n % V, 1), kThreads, 0, stream>>>(xp, yp, n, param);
      } else {
        act_fwd_kernel<K, scalar_t, 1><<<act_grid(n, 1), kThreads, 0, stream>>>(xp, yp, n, param);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

at::Tensor act_bwd_cuda(const at::Tensor& g, const at::Tensor& x, int64_t kind, double param, double eps) {
  check_slot_args("act_bwd", g, x, eps);
  check_act_kind("act_bwd", kind, param);
  check_act_eps("act_bwd", kind, eps);
  check_cuda_tensor(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto out = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return out;
  const int64_t nx = xc.numel();
  const int64_t M = n / nx;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "act_bwd_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_kind(kind, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      if (nx % V == 0 && aligned16(gp) && aligned16(xp) && aligned16(op)) {
        act_bwd_kernel<K, scalar_t, V><<<act_grid(nx / V, M), kThreads, 0, stream>>>(gp, xp, op, nx, M, param, eps);
      } else {
        act_bwd_kernel<K, scalar_t, 1><<<act_grid(nx, M), kThreads, 0, stream>>>(gp, xp, op, nx, M, param, eps);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> act_bwd_bwd_cuda(const at::Tensor& gg, const at::Tensor& g, const at::Tensor& x,
                                                    int64_t kind, double param, double eps) {
  check_slot_args2("act_bwd_bwd", gg, g, x, eps);
  check_act_kind("act_bwd_bwd", kind, param);
  check_act_eps("act_bwd_bwd", kind, eps);
  check_cuda_tensor(x, "x");
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "act_bwd_bwd_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    const scalar_t* ggp = ggc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    with_kind(kind, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      if (nx % V == 0 && aligned16(ggp) && aligned16(gp) && aligned16(xp) && aligned16(dgp) && aligned16(dxp)) {
        act_bwd_bwd_kernel<K, scalar_t, V>
            <<<act_grid(nx / V, M), kThreads, 0, stream>>>(ggp, gp, xp, dgp, dxp, nx, M, param, eps);
      } else {
        act_bwd_bwd_kernel<K, scalar_t, 1>
            <<<act_grid(nx, M), kThreads, 0, stream>>>(ggp, gp, xp, dgp, dxp, nx, M, param, eps);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dg, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fisnet, CUDA, m) {
  m.impl("act_fwd", &act_fwd_cuda);
  m.impl("act_bwd", &act_bwd_cuda);
  m.impl("act_bwd_bwd", &act_bwd_bwd_cuda);
}

}  // namespace fisnet
