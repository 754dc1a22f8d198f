// CPU kernels of the LRP-Flex ReLU: forward (plain ReLU), heatmap backward and its
// double backward.  `x` is the ReLU's input; `g` may carry extra leading "slot" dimensions
// (g.numel() == M * x.numel()): x is then broadcast over the slots, which is how a batched
// (vmapped) heatmap backward reaches the kernel without copying x M times.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../fisnet_common.h"

namespace fisnet {
namespace {

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

// The loops are branch-free (selects, a safe denominator) so that the compiler vectorises
// them for the build's baseline ISA; at::vec's generic fallback (no -mavx2) was 20x slower.
template <typename scalar_t>
void relu_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      scalar_t v = x[i];
      y[i] = (v <= scalar_t(0)) ? scalar_t(0) : v;  // NaN propagates, as in torch.relu
    }
  });
}

// out = x > 0 ? g * x / (x + eps) : 0
template <typename scalar_t>
void bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                int64_t n, int64_t nx, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t end) {
    for_each_run(b, end, nx, [&](int64_t i0, int64_t j0, int64_t len) {
      const scalar_t* __restrict__ gp = g + i0;
      const scalar_t* __restrict__ xp = x + j0;
      scalar_t* __restrict__ op = out + i0;
      for (int64_t k = 0; k < len; ++k) {
        acc_t xv = static_cast<acc_t>(xp[k]);
        acc_t gv = static_cast<acc_t>(gp[k]);
        bool pos = xv > acc_t(0);
        acc_t den = pos ? xv + e : acc_t(1);
        acc_t r = gv * xv / den;
        op[k] = static_cast<scalar_t>(pos ? r : acc_t(0));
      }
    });
  });
}

// dg = x > 0 ? gg * x / (x + eps) : 0 ;  dx = x > 0 ? gg * g * eps / (x + eps)^2 : 0
template <typename scalar_t>
void bwd_bwd_kernel(const scalar_t* __restrict__ gg, const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                    scalar_t* __restrict__ dg, scalar_t* __restrict__ dx, int64_t n, int64_t nx, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t end) {
    for_each_run(b, end, nx, [&](int64_t i0, int64_t j0, int64_t len) {
      const scalar_t* __restrict__ ggp = gg + i0;
      const scalar_t* __restrict__ gp = g + i0;
      const scalar_t* __restrict__ xp = x + j0;
      scalar_t* __restrict__ dgp = dg + i0;
      scalar_t* __restrict__ dxp = dx + i0;
      for (int64_t k = 0; k < len; ++k) {
        acc_t xv = static_cast<acc_t>(xp[k]);
        acc_t ggv = static_cast<acc_t>(ggp[k]);
        acc_t gv = static_cast<acc_t>(gp[k]);
        bool pos = xv > acc_t(0);
        acc_t den = pos ? xv + e : acc_t(1);
        acc_t inv = acc_t(1) / den;
        acc_t a = ggv * xv * inv;
        acc_t c = ggv * gv * e * inv * inv;
        acc_t za = pos ? a : acc_t(0);
        acc_t zc = pos ? c : acc_t(0);
        dgp[k] = static_cast<scalar_t>(za);
        dxp[k] = static_cast<scalar_t>(zc);
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
  check_bwd_bwd_args(gg, g, x, eps);
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
