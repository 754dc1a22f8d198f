// CPU kernels of the z⁺ rule's ratio step (Dual ISNet, SPEC §3.1):
//
//   zplus_ratio(g, num, zp, eps)         = g * num / (zp + eps)
//   zplus_ratio_bwd(gs, g, num, zp, eps) = (gs * num / (zp + eps),          d/dg
//                                           gs * g / (zp + eps),            d/dnum
//                                           -gs * g * num / (zp + eps)^2)   d/dzp
//
// All tensors have one shape and dtype.  Where zp + eps == 0 every output is 0: the division
// uses a safe denominator (1) there and the result is selected away, so no inf/NaN comes from
// the division itself (NaN inputs still propagate).  Half and bfloat16 are computed in float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../fisnet_common.h"

namespace fisnet {
namespace {

constexpr int64_t kGrain = 32768;

// Branch-free loops (a safe denominator, then a select) so that gcc vectorises them with
// -fno-trapping-math (setup.py).  Three details matter to gcc 12 (check with -fopt-info-vec):
// every input is loaded into a local before the arithmetic and every select goes to a local
// before the stores (else loads/stores sink into a branch: "control flow in loop"), and the
// run is a function with __restrict__ parameters (restrict locals inside the parallel_for
// lambda did not convince it that the seven streams of the backward do not alias).
// One contiguous run of the forward.
template <typename scalar_t, typename acc_t>
FISNET_MULTIVERSION void ratio_run(const scalar_t* __restrict__ g, const scalar_t* __restrict__ num, const scalar_t* __restrict__ zp,
               scalar_t* __restrict__ out, int64_t len, acc_t e) {
  for (int64_t k = 0; k < len; ++k) {
    acc_t gv = static_cast<acc_t>(g[k]);
    acc_t nv = static_cast<acc_t>(num[k]);
    acc_t zv = static_cast<acc_t>(zp[k]);
    acc_t den = zv + e;
    bool nz = den != acc_t(0);
    acc_t safe = nz ? den : acc_t(1);
    acc_t r = gv * nv / safe;
    acc_t zr = nz ? r : acc_t(0);
    out[k] = static_cast<scalar_t>(zr);
  }
}

template <typename scalar_t>
void ratio_kernel(const scalar_t* g, const scalar_t* num, const scalar_t* zp, scalar_t* out, int64_t n, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t end) {
    ratio_run<scalar_t, acc_t>(g + b, num + b, zp + b, out + b, end - b, e);
  });
}

// One contiguous run of the backward.
template <typename scalar_t, typename acc_t>
FISNET_MULTIVERSION void ratio_bwd_run(const scalar_t* __restrict__ gs, const scalar_t* __restrict__ g, const scalar_t* __restrict__ num,
                   const scalar_t* __restrict__ zp, scalar_t* __restrict__ dg, scalar_t* __restrict__ dnum,
                   scalar_t* __restrict__ dzp, int64_t len, acc_t e) {
  for (int64_t k = 0; k < len; ++k) {
    acc_t gsv = static_cast<acc_t>(gs[k]);
    acc_t gv = static_cast<acc_t>(g[k]);
    acc_t nv = static_cast<acc_t>(num[k]);
    acc_t zv = static_cast<acc_t>(zp[k]);
    acc_t den = zv + e;
    bool nz = den != acc_t(0);
    acc_t inv = acc_t(1) / (nz ? den : acc_t(1));
    acc_t a = gsv * nv * inv;
    acc_t c = gsv * gv * inv;
    acc_t d = -(gsv * gv * nv) * (inv * inv);
    acc_t za = nz ? a : acc_t(0);
    acc_t zc = nz ? c : acc_t(0);
    acc_t zd = nz ? d : acc_t(0);
    dg[k] = static_cast<scalar_t>(za);
    dnum[k] = static_cast<scalar_t>(zc);
    dzp[k] = static_cast<scalar_t>(zd);
  }
}

template <typename scalar_t>
void ratio_bwd_kernel(const scalar_t* gs, const scalar_t* g, const scalar_t* num, const scalar_t* zp, scalar_t* dg,
                      scalar_t* dnum, scalar_t* dzp, int64_t n, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t end) {
    ratio_bwd_run<scalar_t, acc_t>(gs + b, g + b, num + b, zp + b, dg + b, dnum + b, dzp + b, end - b, e);
  });
}

at::Tensor zplus_ratio_cpu(const at::Tensor& g, const at::Tensor& num, const at::Tensor& zp, double eps) {
  check_zplus_args("zplus_ratio", eps, {{&g, "g"}, {&num, "num"}, {&zp, "zp"}});
  auto gc = g.contiguous();
  auto nc = num.contiguous();
  auto zc = zp.contiguous();
  auto out = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "zplus_ratio_cpu", [&] {
    ratio_kernel<scalar_t>(gc.const_data_ptr<scalar_t>(), nc.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(), n, eps);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> zplus_ratio_bwd_cpu(const at::Tensor& gs, const at::Tensor& g,
                                                                   const at::Tensor& num, const at::Tensor& zp,
                                                                   double eps) {
  check_zplus_args("zplus_ratio_bwd", eps, {{&gs, "gs"}, {&g, "g"}, {&num, "num"}, {&zp, "zp"}});
  auto gsc = gs.contiguous();
  auto gc = g.contiguous();
  auto nc = num.contiguous();
  auto zc = zp.contiguous();
  auto dg = at::empty_like(gc);
  auto dnum = at::empty_like(gc);
  auto dzp = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return {dg, dnum, dzp};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "zplus_ratio_bwd_cpu", [&] {
    ratio_bwd_kernel<scalar_t>(gsc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                               nc.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(),
                               dg.mutable_data_ptr<scalar_t>(), dnum.mutable_data_ptr<scalar_t>(),
                               dzp.mutable_data_ptr<scalar_t>(), n, eps);
  });
  return {dg, dnum, dzp};
}

}  // namespace

TORCH_LIBRARY_IMPL(fisnet, CPU, m) {
  m.impl("zplus_ratio", &zplus_ratio_cpu);
  m.impl("zplus_ratio_bwd", &zplus_ratio_bwd_cpu);
}

}  // namespace fisnet
