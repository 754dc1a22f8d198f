// CPU kernels of the lrp_act family (element-wise activations with the identity-rule heatmap
// backward): forward phi(z), heatmap backward g * h(z) and its double backward (gg * h(z),
// gg * g * h'(z)), h(z) = phi(z) / (z + eps * sign z).  Formulas: csrc/act_math.h.
// `x` (= z) is the activation's input; `g` may carry extra leading slot dimensions
// (g.numel() == M * x.numel()), over which x is broadcast, as in csrc/cpu/lrp_relu.cpp.
//
// One loop per kind (a template on the kind): the piecewise-linear kinds (relu, relu6,
// leaky_relu, hardswish) are branch-free and vectorise; the others call libm (erf, exp,
// expm1, log1p) per element, which gcc does not vectorise.  Their forward is PyTorch's own
// kernel (act_fwd_aten).  Half and bfloat16 are computed in
// float; on x86-64 with gcc the runs also get an AVX2+FMA clone (FISNET_MULTIVERSION).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../act_math.h"
#include "../fisnet_common.h"

namespace fisnet {
namespace {

constexpr int64_t kGrain = 32768;
constexpr int64_t kGrainMath = 4096;  // kinds with libm calls: ~10x the work per element

inline int64_t grain(int64_t kind) {
  return (kind == act::kRelu || kind == act::kRelu6 || kind == act::kLeakyRelu || kind == act::kHardswish)
             ? kGrain
             : kGrainMath;
}

// Calls body(index_in_g, index_in_x, len) for contiguous runs of [begin, end) that do not
// cross a slot boundary (x has nx elements).
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

template <int K, typename scalar_t, typename acc_t>
FISNET_MULTIVERSION void fwd_run(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t len, acc_t p) {
  for (int64_t k = 0; k < len; ++k) {
    acc_t z = static_cast<acc_t>(x[k]);
    acc_t v = act::phi<K, acc_t>(z, p);
    y[k] = static_cast<scalar_t>(v);
  }
}

template <int K, typename scalar_t, typename acc_t>
FISNET_MULTIVERSION void bwd_run(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                 scalar_t* __restrict__ out, int64_t len, acc_t p, acc_t e) {
  for (int64_t k = 0; k < len; ++k) {
    acc_t z = static_cast<acc_t>(x[k]);
    acc_t gv = static_cast<acc_t>(g[k]);
    acc_t h, hp;
    act::factor<K, false, acc_t>(z, p, e, h, hp);
    acc_t o = gv * h;
    out[k] = static_cast<scalar_t>(o);
  }
}

template <int K, typename scalar_t, typename acc_t>
FISNET_MULTIVERSION void bwd_bwd_run(const scalar_t* __restrict__ gg, const scalar_t* __restrict__ g,
                                     const scalar_t* __restrict__ x, scalar_t* __restrict__ dg,
                                     scalar_t* __restrict__ dx, int64_t len, acc_t p, acc_t e) {
  for (int64_t k = 0; k < len; ++k) {
    acc_t z = static_cast<acc_t>(x[k]);
    acc_t gv = static_cast<acc_t>(g[k]);
    acc_t ggv = static_cast<acc_t>(gg[k]);
    acc_t h, hp;
    act::factor<K, true, acc_t>(z, p, e, h, hp);
    acc_t a = ggv * h;
    acc_t b = ggv * gv * hp;
    dg[k] = static_cast<scalar_t>(a);
    dx[k] = static_cast<scalar_t>(b);
  }
}

// Calls f(std::integral_constant<int, K>{}) for the runtime kind.
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

}  // namespace

// The forward of the kinds whose phi needs libm (gelu, gelu_tanh, silu, elu, mish, softplus):
// PyTorch's own kernels, which are exactly F.* and vectorised (a scalar libm loop here measured
// ~10x slower).  The piecewise-linear kinds run the loop below (bit-equal to F.*, as fast).
at::Tensor act_fwd_aten(const at::Tensor& x, int64_t kind, double param) {
  switch (kind) {
    case act::kGelu: return at::gelu(x);
    case act::kGeluTanh: return at::gelu(x, "tanh");
    case act::kSilu: return at::silu(x);
    case act::kElu: return at::elu(x, param);
    case act::kMish: return at::mish(x);
    case act::kSoftplus: return at::softplus(x, 1.0 * param, act::kSoftplusThreshold);
    default: return at::Tensor();
  }
}

namespace {

at::Tensor act_fwd_cpu(const at::Tensor& x, int64_t kind, double param) {
  check_float(x, "x");
  check_act_kind("act_fwd", kind, param);
  if (kind != act::kRelu && kind != act::kRelu6 && kind != act::kLeakyRelu && kind != act::kHardswish) {
    return act_fwd_aten(x, kind, param).contiguous();
  }
  auto xc = x.contiguous();
  auto y = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "act_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const acc_t p = static_cast<acc_t>(param);
    with_kind(kind, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      at::parallel_for(0, n, grain(kind), [&](int64_t b, int64_t e) {
        fwd_run<K, scalar_t, acc_t>(xp + b, yp + b, e - b, p);
      });
    });
  });
  return y;
}

at::Tensor act_bwd_cpu(const at::Tensor& g, const at::Tensor& x, int64_t kind, double param, double eps) {
  check_slot_args("act_bwd", g, x, eps);
  check_act_kind("act_bwd", kind, param);
  check_act_eps("act_bwd", kind, eps);
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto out = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return out;
  const int64_t nx = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "act_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t p = static_cast<acc_t>(param);
    const acc_t e = static_cast<acc_t>(eps);
    with_kind(kind, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      at::parallel_for(0, n, grain(kind), [&](int64_t b, int64_t end) {
        for_each_run(b, end, nx, [&](int64_t i0, int64_t j0, int64_t len) {
          bwd_run<K, scalar_t, acc_t>(gp + i0, xp + j0, op + i0, len, p, e);
        });
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> act_bwd_bwd_cpu(const at::Tensor& gg, const at::Tensor& g, const at::Tensor& x,
                                                   int64_t kind, double param, double eps) {
  check_slot_args2("act_bwd_bwd", gg, g, x, eps);
  check_act_kind("act_bwd_bwd", kind, param);
  check_act_eps("act_bwd_bwd", kind, eps);
  auto ggc = gg.contiguous();
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto dg = at::empty_like(gc);
  auto dx = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return {dg, dx};
  const int64_t nx = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "act_bwd_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ggp = ggc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const acc_t p = static_cast<acc_t>(param);
    const acc_t e = static_cast<acc_t>(eps);
    with_kind(kind, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      at::parallel_for(0, n, grain(kind), [&](int64_t b, int64_t end) {
        for_each_run(b, end, nx, [&](int64_t i0, int64_t j0, int64_t len) {
          bwd_bwd_run<K, scalar_t, acc_t>(ggp + i0, gp + i0, xp + j0, dgp + i0, dxp + i0, len, p, e);
        });
      });
    });
  });
  return {dg, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fisnet, CPU, m) {
  m.impl("act_fwd", &act_fwd_cpu);
  m.impl("act_bwd", &act_bwd_cpu);
  m.impl("act_bwd_bwd", &act_bwd_bwd_cpu);
}

}  // namespace fisnet
