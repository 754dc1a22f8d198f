// CPU kernels of the LRP-Flex ReLU: forward (plain ReLU), heatmap backward and its
// double backward.  `x` is the ReLU's input; `g` may carry extra leading "slot" dimensions
// (g.numel() == M * x.numel()): x is then broadcast over the slots, which is how a batched
// (vmapped) heatmap backward reaches the kernel without copying x M times.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../fisnet_common.h"

namespace fisnet {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 32768;

// Calls body(slot_begin_index_in_g, x_offset, len) for contiguous runs of [begin, end) that
// do not cross a slot boundary.
template <typename F>
inline void for_each_run(int64_t begin, int64_t end, int64_t nx, const F& body) {
  int64_t i = begin;
  while (i < end) {
    int64_t j = i % nx;
    int64_t len = std::min(end - i, nx - j);
    body(i, j, len);
    i += len;
  }
}

template <typename scalar_t>
void relu_fwd_kernel(const scalar_t* x, scalar_t* y, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      scalar_t v = x[i];
      y[i] = v > scalar_t(0) ? v : scalar_t(0);
    }
  });
}

// out = x > 0 ? g * x / (x + eps) : 0
template <typename scalar_t>
void bwd_kernel(const scalar_t* g, const scalar_t* x, scalar_t* out, int64_t n, int64_t nx, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for_each_run(b, e, nx, [&](int64_t i0, int64_t j0, int64_t len) {
      const scalar_t* gp = g + i0;
      const scalar_t* xp = x + j0;
      scalar_t* op = out + i0;
      int64_t k = 0;
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        using V = Vectorized<scalar_t>;
        const V zero(scalar_t(0));
        const V ve(static_cast<scalar_t>(eps));
        for (; k + V::size() <= len; k += V::size()) {
          V xv = V::loadu(xp + k);
          V gv = V::loadu(gp + k);
          V pos = xv > zero;
          // safe denominator: 1 where x <= 0 (those lanes are masked to 0 below)
          V den = V::blendv(V(scalar_t(1)), xv + ve, pos);
          V r = V::blendv(zero, gv * xv / den, pos);
          r.store(op + k);
        }
      }
      for (; k < len; ++k) {
        acc_t xv = static_cast<acc_t>(xp[k]);
        acc_t gv = static_cast<acc_t>(gp[k]);
        op[k] = static_cast<scalar_t>(xv > acc_t(0) ? gv * xv / (xv + static_cast<acc_t>(eps)) : acc_t(0));
      }
    });
  });
}

// dg = x > 0 ? gg * x / (x + eps) : 0 ;  dx = x > 0 ? gg * g * eps / (x + eps)^2 : 0
template <typename scalar_t>
void bwd_bwd_kernel(const scalar_t* gg, const scalar_t* g, const scalar_t* x, scalar_t* dg, scalar_t* dx,
                    int64_t n, int64_t nx, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for_each_run(b, e, nx, [&](int64_t i0, int64_t j0, int64_t len) {
      const scalar_t* ggp = gg + i0;
      const scalar_t* gp = g + i0;
      const scalar_t* xp = x + j0;
      scalar_t* dgp = dg + i0;
      scalar_t* dxp = dx + i0;
      int64_t k = 0;
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        using V = Vectorized<scalar_t>;
        const V zero(scalar_t(0));
        const V one(scalar_t(1));
        const V ve(static_cast<scalar_t>(eps));
        for (; k + V::size() <= len; k += V::size()) {
          V xv = V::loadu(xp + k);
          V gv = V::loadu(gp + k);
          V ggv = V::loadu(ggp + k);
          V pos = xv > zero;
          V inv = one / V::blendv(one, xv + ve, pos);
          V::blendv(zero, ggv * xv * inv, pos).store(dgp + k);
          V::blendv(zero, ggv * gv * ve * inv * inv, pos).store(dxp + k);
        }
      }
      for (; k < len; ++k) {
        acc_t xv = static_cast<acc_t>(xp[k]);
        if (xv > acc_t(0)) {
          acc_t inv = acc_t(1) / (xv + static_cast<acc_t>(eps));
          acc_t ggv = static_cast<acc_t>(ggp[k]);
          dgp[k] = static_cast<scalar_t>(ggv * xv * inv);
          dxp[k] = static_cast<scalar_t>(ggv * static_cast<acc_t>(gp[k]) * static_cast<acc_t>(eps) * inv * inv);
        } else {
          dgp[k] = scalar_t(0);
          dxp[k] = scalar_t(0);
        }
      }
    });
  });
}

at::Tensor lrp_relu_fwd_cpu(const at::Tensor& x) {
  check_float(x, "x");
  auto xc = x.contiguous();
  auto y = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "lrp_relu_fwd_cpu", [&] {
    relu_fwd_kernel<scalar_t>(xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), xc.numel());
  });
  return y;
}

at::Tensor lrp_relu_bwd_cpu(const at::Tensor& g, const at::Tensor& x, double eps) {
  check_bwd_args(g, x, eps);
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto out = at::empty_like(gc);
  if (gc.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "lrp_relu_bwd_cpu", [&] {
    bwd_kernel<scalar_t>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                         gc.numel(), xc.numel(), eps);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lrp_relu_bwd_bwd_cpu(const at::Tensor& gg, const at::Tensor& g,
                                                       const at::Tensor& x, double eps) {
  check_bwd_args(g, x, eps);
  TORCH_CHECK(gg.sizes() == g.sizes(), "fisnet.lrp_relu_bwd_bwd: gg has shape ", gg.sizes(),
              " but g has shape ", g.sizes(), "; they must be equal");
  TORCH_CHECK(gg.scalar_type() == g.scalar_type(), "fisnet.lrp_relu_bwd_bwd: gg is ", gg.scalar_type(),
              " but g is ", g.scalar_type(), "; pass tensors of one dtype");
  auto ggc = gg.contiguous();
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto dg = at::empty_like(gc);
  auto dx = at::empty_like(gc);
  if (gc.numel() == 0) return {dg, dx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "lrp_relu_bwd_bwd_cpu", [&] {
    bwd_bwd_kernel<scalar_t>(ggc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                             dg.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), gc.numel(), xc.numel(), eps);
  });
  return {dg, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fisnet, CPU, m) {
  m.impl("lrp_relu_fwd", &lrp_relu_fwd_cpu);
  m.impl("lrp_relu_bwd", &lrp_relu_bwd_cpu);
  m.impl("lrp_relu_bwd_bwd", &lrp_relu_bwd_bwd_cpu);
}

}  // namespace fisnet
