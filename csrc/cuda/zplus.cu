// CUDA kernels of the z⁺ rule's ratio step (Dual ISNet, SPEC §3.1).  Same semantics and checks
// as csrc/cpu/zplus.cpp:
//
//   zplus_ratio(g, num, zp, eps)         = g * num / (zp + eps)
//   zplus_ratio_bwd(gs, g, num, zp, eps) = (gs * num / (zp + eps), gs * g / (zp + eps),
//                                           -gs * g * num / (zp + eps)^2)
//
// All tensors have one shape and dtype; where zp + eps == 0 every output is 0 (safe
// denominator).  Half and bfloat16 are computed in float (opmath), double stays double.
//
// Layout (as csrc/cuda/lrp_relu.cu): memory bound, so each thread moves 16 bytes per tensor per
// step (128-bit loads/stores) when every pointer is 16-byte aligned, with a scalar tail;
// otherwise one element per step.  A 1-D grid-stride loop, capped at what the GPU holds
// resident; int64 offsets.
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
#include <initializer_list>
#include <tuple>
#include <utility>

#include "../fisnet_common.h"
#include "launch.cuh"

namespace fisnet {
namespace {

using namespace cuda_launch;



// ---- element-wise bodies (acc_t arithmetic) -------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t ratio_op(acc_t g, acc_t num, acc_t zp, acc_t eps) {
  const acc_t den = zp + eps;
  return den != acc_t(0) ? g * num / den : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ void ratio_bwd_op(acc_t gs, acc_t g, acc_t num, acc_t zp, acc_t eps, acc_t& dg,
                                             acc_t& dnum, acc_t& dzp) {
  const acc_t den = zp + eps;
  if (den != acc_t(0)) {
    const acc_t inv = acc_t(1) / den;
    dg = gs * num * inv;
    dnum = gs * g * inv;
    dzp = -(gs * g * num) * (inv * inv);
  } else {
    dg = acc_t(0);
    dnum = acc_t(0);
    dzp = acc_t(0);
  }
}

// ---- kernels --------------------------------------------------------------------------------

// out = ratio(g, num, zp) over n elements; VEC elements per step (VEC == 1: scalar path).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
ratio_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ num, const scalar_t* __restrict__ zp,
             scalar_t* __restrict__ out, int64_t n, double eps_d) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t v = tid; v < nvec; v += stride) {
    const P gp = reinterpret_cast<const P*>(g)[v];
    const P np = reinterpret_cast<const P*>(num)[v];
    const P zpp = reinterpret_cast<const P*>(zp)[v];
    P op;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      op.v[k] = static_cast<scalar_t>(ratio_op(static_cast<acc_t>(gp.v[k]), static_cast<acc_t>(np.v[k]),
                                               static_cast<acc_t>(zpp.v[k]), eps));
    }
    reinterpret_cast<P*>(out)[v] = op;
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    out[i] = static_cast<scalar_t>(
        ratio_op(static_cast<acc_t>(g[i]), static_cast<acc_t>(num[i]), static_cast<acc_t>(zp[i]), eps));
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
ratio_bwd_kernel(const scalar_t* __restrict__ gs, const scalar_t* __restrict__ g, const scalar_t* __restrict__ num,
                 const scalar_t* __restrict__ zp, scalar_t* __restrict__ dg, scalar_t* __restrict__ dnum,
                 scalar_t* __restrict__ dzp, int64_t n, double eps_d) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t v = tid; v < nvec; v += stride) {
    const P gsp = reinterpret_cast<const P*>(gs)[v];
    const P gp = reinterpret_cast<const P*>(g)[v];
    const P np = reinterpret_cast<const P*>(num)[v];
    const P zpp = reinterpret_cast<const P*>(zp)[v];
    P a, b, c;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t x, y, z;
      ratio_bwd_op(static_cast<acc_t>(gsp.v[k]), static_cast<acc_t>(gp.v[k]), static_cast<acc_t>(np.v[k]),
                   static_cast<acc_t>(zpp.v[k]), eps, x, y, z);
      a.v[k] = static_cast<scalar_t>(x);
      b.v[k] = static_cast<scalar_t>(y);
      c.v[k] = static_cast<scalar_t>(z);
    }
    reinterpret_cast<P*>(dg)[v] = a;
    reinterpret_cast<P*>(dnum)[v] = b;
    reinterpret_cast<P*>(dzp)[v] = c;
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    acc_t x, y, z;
    ratio_bwd_op(static_cast<acc_t>(gs[i]), static_cast<acc_t>(g[i]), static_cast<acc_t>(num[i]),
                 static_cast<acc_t>(zp[i]), eps, x, y, z);
    dg[i] = static_cast<scalar_t>(x);
    dnum[i] = static_cast<scalar_t>(y);
    dzp[i] = static_cast<scalar_t>(z);
  }
}

// ---- launch helpers -------------------------------------------------------------------------


inline unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads,
                                                                       resident_blocks())));
}

at::Tensor zplus_ratio_cuda(const at::Tensor& g, const at::Tensor& num, const at::Tensor& zp, double eps) {
  check_zplus_args("zplus_ratio", eps, {{&g, "g"}, {&num, "num"}, {&zp, "zp"}});
  const c10::cuda::CUDAGuard guard(g.device());
  auto gc = g.contiguous();
  auto nc = num.contiguous();
  auto zc = zp.contiguous();
  auto out = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "zplus_ratio_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* np = nc.const_data_ptr<scalar_t>();
    const scalar_t* zpp = zc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (aligned16(gp) && aligned16(np) && aligned16(zpp) && aligned16(op)) {
      ratio_kernel<scalar_t, V><<<grid_for(n / V + n % V), kThreads, 0, stream>>>(gp, np, zpp, op, n, eps);
    } else {
      ratio_kernel<scalar_t, 1><<<grid_for(n), kThreads, 0, stream>>>(gp, np, zpp, op, n, eps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> zplus_ratio_bwd_cuda(const at::Tensor& gs, const at::Tensor& g,
                                                                    const at::Tensor& num, const at::Tensor& zp,
                                                                    double eps) {
  check_zplus_args("zplus_ratio_bwd", eps, {{&gs, "gs"}, {&g, "g"}, {&num, "num"}, {&zp, "zp"}});
  const c10::cuda::CUDAGuard guard(g.device());
  auto gsc = gs.contiguous();
  auto gc = g.contiguous();
  auto nc = num.contiguous();
  auto zc = zp.contiguous();
  auto dg = at::empty_like(gc);
  auto dnum = at::empty_like(gc);
  auto dzp = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return {dg, dnum, dzp};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "zplus_ratio_bwd_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    const scalar_t* gsp = gsc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* np = nc.const_data_ptr<scalar_t>();
    const scalar_t* zpp = zc.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dnp = dnum.mutable_data_ptr<scalar_t>();
    scalar_t* dzpp = dzp.mutable_data_ptr<scalar_t>();
    if (aligned16(gsp) && aligned16(gp) && aligned16(np) && aligned16(zpp) && aligned16(dgp) && aligned16(dnp) &&
        aligned16(dzpp)) {
      ratio_bwd_kernel<scalar_t, V><<<grid_for(n / V + n % V), kThreads, 0, stream>>>(gsp, gp, np, zpp, dgp, dnp,
                                                                                      dzpp, n, eps);
    } else {
      ratio_bwd_kernel<scalar_t, 1><<<grid_for(n), kThreads, 0, stream>>>(gsp, gp, np, zpp, dgp, dnp, dzpp, n, eps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dg, dnum, dzp};
}

}  // namespace

TORCH_LIBRARY_IMPL(fisnet, CUDA, m) {
  m.impl("zplus_ratio", &zplus_ratio_cuda);
  m.impl("zplus_ratio_bwd", &zplus_ratio_bwd_cuda);
}

}  // namespace fisnet
