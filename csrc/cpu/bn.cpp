// CPU kernels of training-mode BatchNorm's input-gradient and its derivative (the heatmap
// backward of a BatchNorm and the double backward of an ISNet training step):
//
//   bn_train_bwd(g, x, w, eps)         = s (g - mean(g) - x̂ mean(g x̂))
//   bn_train_bwd_bwd(h, g, x, w, eps)  = (d/dg, d/dx, d/dw) of <h, bn_train_bwd(g, x, w, eps)>
//
// x: (N, C, *), per channel mean μ, biased variance σ², r = (σ² + eps)^-1/2, x̂ = (x - μ) r,
// s = w r; the statistics are recomputed from x (the derivatives include their dependence on x).
// g, h: x's shape with optional leading slot dims (one map per slot; d/dx, d/dw summed over
// them).  Formulas: fisnet_ext/reference.py.
//
// Two passes per channel: one reads g, x (and h) and accumulates the per-slot sums, one writes
// each output as an affine combination of the inputs with per-(slot, channel) coefficients.
// Sums are taken about a pivot p = x[0, c, 0] (no cancellation in E[x²] - E[x]² when the mean is
// large), row by row in the op-math type with `omp simd` reductions, rows added in double.
// Channels run in parallel.  On x86-64 with gcc the per-channel loops also get an AVX2+FMA clone.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../fisnet_common.h"

namespace fisnet {
namespace {

struct Geometry {
  int64_t S, N, C, L;
};

Geometry geometry(const at::Tensor& g, const at::Tensor& x) {
  Geometry d;
  d.N = x.size(0);
  d.C = x.size(1);
  d.L = x.numel() / std::max<int64_t>(d.N * d.C, 1);
  d.S = g.numel() / std::max<int64_t>(x.numel(), 1);
  return d;
}

// Per-channel statistics from the shifted sums.
struct Stats {
  double mu, r, p;  // mean, (var + eps)^-1/2, pivot
};

inline Stats stats(double sx, double sxx, double p, double n, double eps) {
  double mx = sx / n;  // mean of (x - p)
  double var = std::max(sxx / n - mx * mx, 0.0);
  return {p + mx, 1.0 / std::sqrt(var + eps), p};
}

// ---- bn_train_bwd -------------------------------------------------------------------------
// Channels [c0, c1); a function of its own (not the parallel_for lambda) so that it is multiversioned.
template <typename scalar_t>
FISNET_MULTIVERSION void bwd_channels(const scalar_t* g, const scalar_t* x, const scalar_t* w, scalar_t* out,
                                      Geometry d, double eps, int64_t c0, int64_t c1) {
  using acc_t = at::opmath_type<scalar_t>;
  const double n = static_cast<double>(d.N * d.L);
  {
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t p = static_cast<acc_t>(x[c * d.L]);
      for (int64_t s = 0; s < d.S; ++s) {
        double sx = 0, sxx = 0, sg = 0, sgx = 0;
        for (int64_t i = 0; i < d.N; ++i) {
          const scalar_t* xr = x + (i * d.C + c) * d.L;
          const scalar_t* gr = g + ((s * d.N + i) * d.C + c) * d.L;
          acc_t a1 = 0, a2 = 0, a3 = 0, a4 = 0;
#pragma omp simd reduction(+ : a1, a2, a3, a4)
          for (int64_t k = 0; k < d.L; ++k) {
            acc_t xv = static_cast<acc_t>(xr[k]) - p;
            acc_t gv = static_cast<acc_t>(gr[k]);
            a1 += xv;
            a2 += xv * xv;
            a3 += gv;
            a4 += gv * xv;
          }
          sx += a1, sxx += a2, sg += a3, sgx += a4;
        }
        Stats st = stats(sx, sxx, p, n, eps);
        const double sc = static_cast<double>(w[c]) * st.r;
        const double gm = sg / n;
        const double gxm = st.r * (sgx - (st.mu - st.p) * sg) / n;  // mean(g x̂)
        // out = sc (g - gm - (x - mu) r gxm) = A g + B x + K
        const acc_t A = static_cast<acc_t>(sc);
        const acc_t B = static_cast<acc_t>(-sc * st.r * gxm);
        const acc_t K = static_cast<acc_t>(-sc * gm + sc * st.r * gxm * st.mu);
        for (int64_t i = 0; i < d.N; ++i) {
          const scalar_t* __restrict__ xr = x + (i * d.C + c) * d.L;
          const scalar_t* __restrict__ gr = g + ((s * d.N + i) * d.C + c) * d.L;
          scalar_t* __restrict__ o = out + ((s * d.N + i) * d.C + c) * d.L;
#pragma omp simd
          for (int64_t k = 0; k < d.L; ++k) {
            o[k] = static_cast<scalar_t>(A * static_cast<acc_t>(gr[k]) + B * static_cast<acc_t>(xr[k]) + K);
          }
        }
      }
    }
  }
}

template <typename scalar_t>
void bwd_kernel(const scalar_t* g, const scalar_t* x, const scalar_t* w, scalar_t* out, Geometry d, double eps) {
  at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) { bwd_channels<scalar_t>(g, x, w, out, d, eps, c0, c1); });
}

// ---- bn_train_bwd_bwd ---------------------------------------------------------------------
template <typename scalar_t>
FISNET_MULTIVERSION void bwd_bwd_channels(const scalar_t* h, const scalar_t* g, const scalar_t* x, const scalar_t* w,
                                          scalar_t* dg, scalar_t* dx, scalar_t* dw, Geometry d, double eps,
                                          int64_t c0, int64_t c1) {
  using acc_t = at::opmath_type<scalar_t>;
  const double n = static_cast<double>(d.N * d.L);
  {
    // per-slot coefficients of this channel: dg = a1 h + b1 x + k1;  dx += a2 h + b2 g + c2 x + k2
    std::vector<acc_t> a1(d.S), b1(d.S), k1(d.S), a2(d.S), b2(d.S), c2(d.S), k2(d.S);
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t p = static_cast<acc_t>(x[c * d.L]);
      double dw_c = 0;
      for (int64_t s = 0; s < d.S; ++s) {
        double sx = 0, sxx = 0, sh = 0, shx = 0, sg = 0, sgx = 0, shg = 0;
        for (int64_t i = 0; i < d.N; ++i) {
          const scalar_t* xr = x + (i * d.C + c) * d.L;
          const int64_t off = ((s * d.N + i) * d.C + c) * d.L;
          const scalar_t* gr = g + off;
          const scalar_t* hr = h + off;
          acc_t t1 = 0, t2 = 0, t3 = 0, t4 = 0, t5 = 0, t6 = 0, t7 = 0;
#pragma omp simd reduction(+ : t1, t2, t3, t4, t5, t6, t7)
          for (int64_t k = 0; k < d.L; ++k) {
            acc_t xv = static_cast<acc_t>(xr[k]) - p;
            acc_t gv = static_cast<acc_t>(gr[k]);
            acc_t hv = static_cast<acc_t>(hr[k]);
            t1 += xv;
            t2 += xv * xv;
            t3 += hv;
            t4 += hv * xv;
            t5 += gv;
            t6 += gv * xv;
            t7 += hv * gv;
          }
          sx += t1, sxx += t2, sh += t3, shx += t4, sg += t5, sgx += t6, shg += t7;
        }
        Stats st = stats(sx, sxx, p, n, eps);
        const double r = st.r, mu = st.mu, sh_ = st.mu - st.p;
        const double sc = static_cast<double>(w[c]) * r;
        const double A = sh / n, gb = sg / n;
        const double Bm = r * (shx - sh_ * sh) / n;  // mean(h x̂)
        const double m = r * (sgx - sh_ * sg) / n;   // mean(g x̂)
        const double Dn = shg / n - A * gb - Bm * m;
        const double E = Dn - 2.0 * m * Bm;
        // dg = sc (h - A - (x - mu) r Bm)
        a1[s] = static_cast<acc_t>(sc);
        b1[s] = static_cast<acc_t>(-sc * r * Bm);
        k1[s] = static_cast<acc_t>(-sc * A + sc * r * Bm * mu);
        // dx = -sc r (m (h - A) + Bm (g - gb) + E (x - mu) r)
        const double f = -sc * r;
        a2[s] = static_cast<acc_t>(f * m);
        b2[s] = static_cast<acc_t>(f * Bm);
        c2[s] = static_cast<acc_t>(f * E * r);
        k2[s] = static_cast<acc_t>(f * (-m * A - Bm * gb - E * r * mu));
        dw_c += r * Dn * n;
      }
      dw[c] = static_cast<scalar_t>(dw_c);
      for (int64_t i = 0; i < d.N; ++i) {
        const scalar_t* __restrict__ xr = x + (i * d.C + c) * d.L;
        scalar_t* __restrict__ dxr = dx + (i * d.C + c) * d.L;
        for (int64_t s = 0; s < d.S; ++s) {
          const int64_t off = ((s * d.N + i) * d.C + c) * d.L;
          const scalar_t* __restrict__ gr = g + off;
          const scalar_t* __restrict__ hr = h + off;
          scalar_t* __restrict__ dgr = dg + off;
          const acc_t A1 = a1[s], B1 = b1[s], K1 = k1[s], A2 = a2[s], B2 = b2[s], C2 = c2[s], K2 = k2[s];
          // the first slot writes dx, the others add to it (two plain loops, each vectorised)
          if (s == 0) {
#pragma omp simd
            for (int64_t k = 0; k < d.L; ++k) {
              acc_t xv = static_cast<acc_t>(xr[k]);
              acc_t gv = static_cast<acc_t>(gr[k]);
              acc_t hv = static_cast<acc_t>(hr[k]);
              dgr[k] = static_cast<scalar_t>(A1 * hv + B1 * xv + K1);
              dxr[k] = static_cast<scalar_t>(A2 * hv + B2 * gv + C2 * xv + K2);
            }
          } else {
#pragma omp simd
            for (int64_t k = 0; k < d.L; ++k) {
              acc_t xv = static_cast<acc_t>(xr[k]);
              acc_t gv = static_cast<acc_t>(gr[k]);
              acc_t hv = static_cast<acc_t>(hr[k]);
              dgr[k] = static_cast<scalar_t>(A1 * hv + B1 * xv + K1);
              dxr[k] = static_cast<scalar_t>(static_cast<acc_t>(dxr[k]) + A2 * hv + B2 * gv + C2 * xv + K2);
            }
          }
        }
      }
    }
  }
}

template <typename scalar_t>
void bwd_bwd_kernel(const scalar_t* h, const scalar_t* g, const scalar_t* x, const scalar_t* w, scalar_t* dg,
                    scalar_t* dx, scalar_t* dw, Geometry d, double eps) {
  at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
    bwd_bwd_channels<scalar_t>(h, g, x, w, dg, dx, dw, d, eps, c0, c1);
  });
}

at::Tensor bn_train_bwd_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, double eps) {
  check_bn_args("bn_train_bwd", g, x, w, eps);
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto out = at::empty_like(gc);
  if (gc.numel() == 0) return out;
  Geometry d = geometry(gc, xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bn_train_bwd_cpu", [&] {
    bwd_kernel<scalar_t>(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                         out.mutable_data_ptr<scalar_t>(), d, eps);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_bwd_bwd_cpu(const at::Tensor& h, const at::Tensor& g,
                                                                    const at::Tensor& x, const at::Tensor& w,
                                                                    double eps) {
  check_bn_args("bn_train_bwd_bwd", g, x, w, eps);
  TORCH_CHECK(h.sizes() == g.sizes() && h.scalar_type() == g.scalar_type() && h.device() == g.device(),
              "fisnet.bn_train_bwd_bwd: h (", h.sizes(), ", ", h.scalar_type(), ") must match g (", g.sizes(), ", ",
              g.scalar_type(), ")");
  auto hc = h.contiguous();
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto dg = at::empty_like(gc);
  auto dx = at::empty_like(xc);
  auto dw = at::empty_like(wc);
  if (gc.numel() == 0) {
    dx.zero_();
    dw.zero_();
    return {dg, dx, dw};
  }
  Geometry d = geometry(gc, xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bn_train_bwd_bwd_cpu", [&] {
    bwd_bwd_kernel<scalar_t>(hc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                             xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                             dg.mutable_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                             dw.mutable_data_ptr<scalar_t>(), d, eps);
  });
  return {dg, dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fisnet, CPU, m) {
  m.impl("bn_train_bwd", &bn_train_bwd_cpu);
  m.impl("bn_train_bwd_bwd", &bn_train_bwd_bwd_cpu);
}

}  // namespace fisnet
