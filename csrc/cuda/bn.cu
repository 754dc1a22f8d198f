// CUDA kernels of training-mode BatchNorm's input gradient and its derivative (spec and oracle:
// fisnet_ext/reference.py, bn_train_bwd / bn_train_bwd_bwd).  x has shape (N, C, *); per channel
// c, with n = N * prod(*) values, mean μ, biased variance σ², r = (σ² + eps)^-1/2, x̂ = (x - μ) r
// and s = γ r:
//
//   bn_train_bwd(g, x, γ, eps)        = s (g - mean(g) - x̂ mean(g x̂))
//   bn_train_bwd_bwd(h, g, x, γ, eps) = (d_g, d_x, d_γ), with A = mean(h), Bm = mean(h x̂),
//       ḡ = mean(g), m = mean(g x̂), Dn = mean(h g) - A ḡ - Bm m:
//       d_g = s (h - A - x̂ Bm)
//       d_x = -s r (m (h - A) + Bm (g - ḡ) + (Dn - 2 m Bm) x̂)
//       d_γ = r Dn n
//
// g and h may carry leading slot dimensions (S slots; x shared, never copied); every slot has its
// own means, and d_x, d_γ are summed over the slots.  Half and bfloat16 are computed in float
// (opmath), double stays double.
//
// Three launches, all on the current stream, deterministic (no atomics):
//   1. stats: the (slot, channel) reductions, each split over `splits` blocks (so a few channels
//      with large N * prod(*) still fill the GPU).  Each block accumulates in opmath, with x
//      shifted by the pivot p = x[0, c, 0] (sums of d = x - p, d², g, g d and for bwd_bwd h, h d,
//      h g), reduces with warp shuffles + shared memory, and writes one partial per split.
//   2. coef: one warp per channel sums the splits, derives μ, r (from slot 0's x sums) and, per
//      slot, the coefficients that make pass 3 affine per element in (g, h, x - μ); for bwd_bwd
//      it also sums d_γ over the slots.
//   3. apply: element-wise, grid-stride, 128-bit packs when every pointer is 16-byte aligned and
//      prod(*) is a whole number of packs (a pack then stays inside one channel); the channel of
//      each step is tracked incrementally (no division per element).  bwd_bwd walks x once and
//      loops over the slots inside, so d_x is summed in registers.
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
#include <limits>
#include <tuple>

#include "../fisnet_common.h"
#include "launch.cuh"

namespace fisnet {
namespace {

using namespace cuda_launch;

constexpr int kMaxGridY = 65535;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;                           // loads in flight per thread in the stats pass
constexpr int64_t kMinSplitElems = kThreads * kUnroll * 4;  // smallest piece of a channel per block
constexpr int kCoefBwd = 4;                          // μ, cg, cx, c0
constexpr int kCoefBwdBwd = 8;                       // μ, cs, cb, ca, ch, cx, c0, (pad)

// ---- small device helpers -------------------------------------------------------------------

__device__ __forceinline__ float bn_rsqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double bn_rsqrt(double v) { return rsqrt(v); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Position of a thread in a (rows of `len` steps, rows cycling over C channels) layout, advanced
// by a fixed stride without dividing: stride = q * len + rem, and q % C is precomputed.
struct ChanWalk {
  int64_t pos;  // position inside the row, < len
  int64_t c;    // channel, < C
  __device__ __forceinline__ void init(int64_t start, int64_t len, int64_t C) {
    const int64_t row = start / len;
    pos = start - row * len;
    c = row % C;
  }
  __device__ __forceinline__ void advance(int64_t len, int64_t C, int64_t rem, int64_t qmod) {
    pos += rem;
    c += qmod;
    if (pos >= len) {
      pos -= len;
      c += 1;
    }
    if (c >= C) c -= C;  // c + qmod + 1 <= 2C - 1
  }
};

// ---- pass 1: per-(slot, channel, split) partial sums ----------------------------------------
//
// partial[((s * C + c) * splits + k) * K + i], K = 4 (bwd: Σd, Σd², Σg, Σgd) or
// 7 (bwd_bwd: + Σh, Σhd, Σhg), d = x - x[0, c, 0].  Split k covers the channel's flat positions
// j = n_idx * L + l in [k * chunk, min((k + 1) * chunk, N * L)).
template <typename scalar_t, bool HAS_H>
__global__ void __launch_bounds__(kThreads)
bn_stats_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, const scalar_t* __restrict__ h,
                at::opmath_type<scalar_t>* __restrict__ partial, int64_t S, int64_t N, int64_t C, int64_t L,
                int64_t splits, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int K = HAS_H ? 7 : 4;
  __shared__ acc_t smem[kWarps][K];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t NL = N * L;
  const int64_t CL = C * L;
  const int64_t nx = N * CL;
  const int64_t W = S * C * splits;
  // a step of kThreads positions: q whole rows of L plus rr; in memory a row is CL apart
  const int64_t q = kThreads / L;
  const int64_t rr = kThreads % L;
  const int64_t off_step = q * CL + rr;
  const int64_t off_wrap = CL - L;

  for (int64_t w = blockIdx.x; w < W; w += gridDim.x) {
    const int64_t k = w % splits;
    const int64_t sc = w / splits;
    const int64_t s = sc / C;
    const int64_t c = sc - s * C;
    const scalar_t* gs = g + s * nx;
    const scalar_t* hs = HAS_H ? h + s * nx : nullptr;
    const acc_t p = static_cast<acc_t>(x[c * L]);
    const int64_t jb = k * chunk;
    const int64_t je = jb + chunk < NL ? jb + chunk : NL;

    acc_t acc[K];
#pragma unroll
    for (int i = 0; i < K; ++i) acc[i] = acc_t(0);

    int64_t j = jb + threadIdx.x;
    int64_t l = j % L;
    int64_t off = ((j / L) * C + c) * L + l;
    for (; j < je; j += static_cast<int64_t>(kUnroll) * kThreads) {
      int64_t offs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        offs[u] = off;
        l += rr;
        off += off_step;
        if (l >= L) {
          l -= L;
          off += off_wrap;
        }
      }
      acc_t xv[kUnroll], gv[kUnroll], hv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const bool ok = j + static_cast<int64_t>(u) * kThreads < je;
        xv[u] = ok ? static_cast<acc_t>(x[offs[u]]) : p;  // d = 0: adds nothing
        gv[u] = ok ? static_cast<acc_t>(gs[offs[u]]) : acc_t(0);
        if (HAS_H) hv[u] = ok ? static_cast<acc_t>(hs[offs[u]]) : acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const acc_t d = xv[u] - p;
        acc[0] += d;
        acc[1] += d * d;
        acc[2] += gv[u];
        acc[3] += gv[u] * d;
        if (HAS_H) {
          acc[4] += hv[u];
          acc[5] += hv[u] * d;
          acc[6] += hv[u] * gv[u];
        }
      }
    }

    // block reduction: warps by shuffles, then the first warp over the per-warp sums
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const acc_t v = warp_sum(acc[i]);
      if (lane == 0) smem[warp][i] = v;
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const acc_t v = warp_sum(lane < kWarps ? smem[lane][i] : acc_t(0));
        if (lane == 0) partial[w * K + i] = v;
      }
    }
    __syncthreads();  // smem is reused by the next work item
  }
}

// ---- pass 2: coefficients (one warp per channel, slots in order) -----------------------------
//
// bwd:     coef[(s * C + c) * 4 + {0..3}] = μ, cg, cx, c0 with gx = cg g + cx (x - μ) + c0
// bwd_bwd: coef[(s * C + c) * 8 + {0..6}] = μ, cs, cb, ca, ch, cx, c0 with
//          d_g = cs h + cb (x - μ) + ca,   d_x (this slot's term) = ch h + cb g + cx (x - μ) + c0
//          and dw[c] = Σ_s r Dn n.
template <typename scalar_t, bool HAS_H>
__global__ void __launch_bounds__(kThreads)
bn_coef_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, const scalar_t* __restrict__ x,
               const scalar_t* __restrict__ weight, at::opmath_type<scalar_t>* __restrict__ coef,
               scalar_t* __restrict__ dw, int64_t S, int64_t C, int64_t L, int64_t n, int64_t splits, double eps_d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int K = HAS_H ? 7 : 4;
  constexpr int NC = HAS_H ? kCoefBwdBwd : kCoefBwd;
  const int lane = threadIdx.x & 31;
  const int64_t warp_global = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const acc_t nf = static_cast<acc_t>(n);
  const acc_t inv_n = acc_t(1) / nf;

  for (int64_t c = warp_global; c < C; c += nwarps) {  // warp-uniform
    // x statistics from slot 0's partials (every slot's are the same sums)
    acc_t sx = 0, sxx = 0;
    for (int64_t k = lane; k < splits; k += 32) {
      const acc_t* pp = partial + (c * splits + k) * K;
      sx += pp[0];
      sxx += pp[1];
    }
    sx = warp_sum(sx);
    sxx = warp_sum(sxx);
    const acc_t p = static_cast<acc_t>(x[c * L]);
    const acc_t mx = sx * inv_n;  // mean of x - p
    acc_t var = sxx * inv_n - mx * mx;
    var = var > acc_t(0) ? var : acc_t(0);
    const acc_t r = bn_rsqrt(var + eps);
    const acc_t mu = p + mx;
    const acc_t sgam = static_cast<acc_t>(weight[c]) * r;
    acc_t dw_acc = 0;

    for (int64_t s = 0; s < S; ++s) {
      const int64_t sc = s * C + c;
      acc_t sg = 0, sgx = 0, sh = 0, shx = 0, shg = 0;
      for (int64_t k = lane; k < splits; k += 32) {
        const acc_t* pp = partial + (sc * splits + k) * K;
        sg += pp[2];
        sgx += pp[3];
        if (HAS_H) {
          sh += pp[4];
          shx += pp[5];
          shg += pp[6];
        }
      }
      sg = warp_sum(sg);
      sgx = warp_sum(sgx);
      const acc_t gb = sg * inv_n;               // mean(g)
      const acc_t m = r * (sgx * inv_n - gb * mx);  // mean(g x̂) = r mean(g (x - μ))
      acc_t* cf = coef + sc * NC;
      if (!HAS_H) {
        if (lane == 0) {
          cf[0] = mu;
          cf[1] = sgam;
          cf[2] = -sgam * r * m;
          cf[3] = -sgam * gb;
        }
      } else {
        sh = warp_sum(sh);
        shx = warp_sum(shx);
        shg = warp_sum(shg);
        const acc_t A = sh * inv_n;
        const acc_t Bm = r * (shx * inv_n - A * mx);
        const acc_t Dn = shg * inv_n - A * gb - Bm * m;
        const acc_t sr = sgam * r;
        if (lane == 0) {
          cf[0] = mu;
          cf[1] = sgam;                               // cs
          cf[2] = -sr * Bm;                           // cb
          cf[3] = -sgam * A;                          // ca
          cf[4] = -sr * m;                            // ch
          cf[5] = -sr * r * (Dn - acc_t(2) * m * Bm);  // cx
          cf[6] = sr * (m * A + Bm * gb);             // c0
          cf[7] = acc_t(0);
        }
        dw_acc += r * Dn * nf;
      }
    }
    if (HAS_H && lane == 0) dw[c] = static_cast<scalar_t>(dw_acc);
  }
}

// ---- pass 3: element-wise ----------------------------------------------------------------------

// out[s, i] = cg g[s, i] + cx (x[i] - μ) + c0 for the coefficients of (s, channel of i).  Steps
// of VEC elements; Lv = L / VEC steps per (n, c) row; nxv = x.numel() / VEC.  blockIdx.y walks
// the slots, blockIdx.x a grid-stride loop over one slot.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
bn_bwd_apply_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                    const at::opmath_type<scalar_t>* __restrict__ coef, scalar_t* __restrict__ out, int64_t nxv,
                    int64_t S, int64_t C, int64_t Lv) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t q = stride / Lv;
  const int64_t rem = stride - q * Lv;
  const int64_t qmod = q % C;
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const P* gs = reinterpret_cast<const P*>(g) + s * nxv;
    P* os = reinterpret_cast<P*>(out) + s * nxv;
    const acc_t* cs = coef + s * C * kCoefBwd;
    ChanWalk cw;
    cw.init(tid, Lv, C);
    for (int64_t v = tid; v < nxv; v += stride) {
      const acc_t* cf = cs + cw.c * kCoefBwd;
      const acc_t mu = cf[0], cg = cf[1], cx = cf[2], c0 = cf[3];
      const P xp = reinterpret_cast<const P*>(x)[v];
      const P gp = gs[v];
      P op;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t xc = static_cast<acc_t>(xp.v[e]) - mu;
        op.v[e] = static_cast<scalar_t>(cg * static_cast<acc_t>(gp.v[e]) + cx * xc + c0);
      }
      os[v] = op;
      cw.advance(Lv, C, rem, qmod);
    }
  }
}

// One grid-stride walk over x; per step, every slot's d_g is written and d_x is summed over the
// slots in registers.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
bn_bwd_bwd_apply_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g,
                        const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ coef,
                        scalar_t* __restrict__ dg, scalar_t* __restrict__ dx, int64_t nxv, int64_t S, int64_t C,
                        int64_t Lv) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t q = stride / Lv;
  const int64_t rem = stride - q * Lv;
  const int64_t qmod = q % C;
  const int64_t slot_coef = C * kCoefBwdBwd;
  ChanWalk cw;
  cw.init(tid, Lv, C);
  for (int64_t v = tid; v < nxv; v += stride) {
    const acc_t* cc = coef + cw.c * kCoefBwdBwd;
    const acc_t mu = cc[0];
    const P xp = reinterpret_cast<const P*>(x)[v];
    acc_t xc[VEC], dxa[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      xc[e] = static_cast<acc_t>(xp.v[e]) - mu;
      dxa[e] = acc_t(0);
    }
    for (int64_t s = 0; s < S; ++s) {
      const acc_t* cf = cc + s * slot_coef;
      const acc_t cs = cf[1], cb = cf[2], ca = cf[3], ch = cf[4], cx = cf[5], c0 = cf[6];
      const int64_t i = s * nxv + v;
      const P hp = reinterpret_cast<const P*>(h)[i];
      const P gp = reinterpret_cast<const P*>(g)[i];
      P dgp;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t hv = static_cast<acc_t>(hp.v[e]);
        const acc_t gv = static_cast<acc_t>(gp.v[e]);
        dgp.v[e] = static_cast<scalar_t>(cs * hv + cb * xc[e] + ca);
        dxa[e] += ch * hv + cb * gv + cx * xc[e] + c0;
      }
      reinterpret_cast<P*>(dg)[i] = dgp;
    }
    P dxp;
#pragma unroll
    for (int e = 0; e < VEC; ++e) dxp.v[e] = static_cast<scalar_t>(dxa[e]);
    reinterpret_cast<P*>(dx)[v] = dxp;
    cw.advance(Lv, C, rem, qmod);
  }
}

// ---- argument checks ------------------------------------------------------------------------

// The shared checks (fisnet_common.h: dtype, device, x.dim() >= 2, g's trailing shape, weight
// (C,), eps >= 0; the same messages as the CPU kernel) plus: x is on a CUDA device.
void check_bn_cuda_args(const char* op, const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                        double eps) {
  fisnet::check_bn_args(op, g, x, weight, eps);
  TORCH_CHECK(x.is_cuda(), "fisnet.", op, ": x must be a CUDA tensor, got one on ", x.device());
}

// ---- launch helpers -------------------------------------------------------------------------

struct BnShape {
  int64_t S, N, C, L, n, nx;
};

BnShape bn_shape(const at::Tensor& g, const at::Tensor& x) {
  BnShape sh;
  sh.N = x.size(0);
  sh.C = x.size(1);
  sh.L = 1;
  for (int64_t d = 2; d < x.dim(); ++d) sh.L *= x.size(d);
  sh.S = 1;
  for (int64_t d = 0; d < g.dim() - x.dim(); ++d) sh.S *= g.size(d);
  sh.n = sh.N * sh.L;
  sh.nx = sh.n * sh.C;
  return sh;
}

// Splits per (slot, channel) so that about twice the resident blocks run, each on at least
// kMinSplitElems positions; chunk = positions per split.
void choose_splits(const BnShape& sh, int64_t& splits, int64_t& chunk) {
  const int64_t target = 2 * resident_blocks();
  const int64_t sc = sh.S * sh.C;
  const int64_t max_splits = std::max<int64_t>(1, sh.n / kMinSplitElems);
  splits = std::max<int64_t>(1, std::min<int64_t>((target + sc - 1) / sc, max_splits));
  chunk = (sh.n + splits - 1) / splits;
  splits = (sh.n + chunk - 1) / chunk;
}

inline unsigned stats_grid(int64_t work_items) {
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>(work_items, static_cast<int64_t>(std::numeric_limits<int32_t>::max()))));
}

inline unsigned coef_grid(int64_t C) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((C + kWarps - 1) / kWarps, 64 * resident_blocks())));
}

// 2-D grid for S slots of `work` steps each (as csrc/cuda/lrp_relu.cu).
inline dim3 apply_grid(int64_t work, int64_t S) {
  const int64_t resident = resident_blocks();
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, resident));
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({S, std::max<int64_t>(1, resident / gx), kMaxGridY}));
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

template <typename acc_t>
at::Tensor acc_workspace(const at::Tensor& like, int64_t count) {
  return at::empty({std::max<int64_t>(count, 1)}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// ---- ops ------------------------------------------------------------------------------------

at::Tensor bn_train_bwd_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_bn_cuda_args("bn_train_bwd", g, x, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = at::empty(gc.sizes(), gc.options());
  if (gc.numel() == 0) return out;  // S == 0, C == 0 or N * prod(*) == 0
  const BnShape sh = bn_shape(gc, xc);
  int64_t splits, chunk;
  choose_splits(sh, splits, chunk);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bn_train_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    auto partial = acc_workspace<acc_t>(xc, sh.S * sh.C * splits * 4);
    auto coef = acc_workspace<acc_t>(xc, sh.S * sh.C * kCoefBwd);
    acc_t* pp = partial.template mutable_data_ptr<acc_t>();
    acc_t* cp = coef.template mutable_data_ptr<acc_t>();

    bn_stats_kernel<scalar_t, false><<<stats_grid(sh.S * sh.C * splits), kThreads, 0, stream>>>(
        xp, gp, nullptr, pp, sh.S, sh.N, sh.C, sh.L, splits, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_coef_kernel<scalar_t, false><<<coef_grid(sh.C), kThreads, 0, stream>>>(pp, xp, wp, cp, nullptr, sh.S, sh.C,
                                                                              sh.L, sh.n, splits, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int V = vec_size<scalar_t>();
    if (sh.L % V == 0 && aligned16(gp) && aligned16(xp) && aligned16(op)) {
      bn_bwd_apply_kernel<scalar_t, V><<<apply_grid(sh.nx / V, sh.S), kThreads, 0, stream>>>(
          gp, xp, cp, op, sh.nx / V, sh.S, sh.C, sh.L / V);
    } else {
      bn_bwd_apply_kernel<scalar_t, 1><<<apply_grid(sh.nx, sh.S), kThreads, 0, stream>>>(gp, xp, cp, op, sh.nx,
                                                                                        sh.S, sh.C, sh.L);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_bwd_bwd_cuda(const at::Tensor& h, const at::Tensor& g,
                                                                     const at::Tensor& x, const at::Tensor& weight,
                                                                     double eps) {
  check_bn_cuda_args("bn_train_bwd_bwd", g, x, weight, eps);
  TORCH_CHECK(h.sizes() == g.sizes(), "fisnet.bn_train_bwd_bwd: h has shape ", h.sizes(), " but g has shape ",
              g.sizes(), "; they must be equal");
  TORCH_CHECK(h.scalar_type() == g.scalar_type(), "fisnet.bn_train_bwd_bwd: h is ", h.scalar_type(), " but g is ",
              g.scalar_type(), "; pass tensors of one dtype");
  TORCH_CHECK(h.device() == g.device(), "fisnet.bn_train_bwd_bwd: h is on ", h.device(), " but g is on ",
              g.device());
  const c10::cuda::CUDAGuard guard(x.device());
  auto hc = h.contiguous();
  auto gc = g.contiguous();
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto dg = at::empty(gc.sizes(), gc.options());
  auto dx = at::empty(xc.sizes(), xc.options());
  auto dw = at::empty({x.size(1)}, wc.options());
  const BnShape sh = bn_shape(gc, xc);
  if (sh.C == 0) return {dg, dx, dw};
  if (sh.S == 0) {  // sums over no slots
    dx.zero_();
    dw.zero_();
    return {dg, dx, dw};
  }
  if (sh.n == 0) {  // as the reference: the statistics of no values are NaN, so is r * Dn * 0
    dw.fill_(std::numeric_limits<double>::quiet_NaN());
    return {dg, dx, dw};
  }
  int64_t splits, chunk;
  choose_splits(sh, splits, chunk);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bn_train_bwd_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = hc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* dwp = dw.mutable_data_ptr<scalar_t>();
    auto partial = acc_workspace<acc_t>(xc, sh.S * sh.C * splits * 7);
    auto coef = acc_workspace<acc_t>(xc, sh.S * sh.C * kCoefBwdBwd);
    acc_t* pp = partial.template mutable_data_ptr<acc_t>();
    acc_t* cp = coef.template mutable_data_ptr<acc_t>();

    bn_stats_kernel<scalar_t, true><<<stats_grid(sh.S * sh.C * splits), kThreads, 0, stream>>>(
        xp, gp, hp, pp, sh.S, sh.N, sh.C, sh.L, splits, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_coef_kernel<scalar_t, true><<<coef_grid(sh.C), kThreads, 0, stream>>>(pp, xp, wp, cp, dwp, sh.S, sh.C, sh.L,
                                                                             sh.n, splits, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int V = vec_size<scalar_t>();
    if (sh.L % V == 0 && aligned16(hp) && aligned16(gp) && aligned16(xp) && aligned16(dgp) && aligned16(dxp)) {
      bn_bwd_bwd_apply_kernel<scalar_t, V><<<apply_grid(sh.nx / V, 1), kThreads, 0, stream>>>(
          hp, gp, xp, cp, dgp, dxp, sh.nx / V, sh.S, sh.C, sh.L / V);
    } else {
      bn_bwd_bwd_apply_kernel<scalar_t, 1><<<apply_grid(sh.nx, 1), kThreads, 0, stream>>>(
          hp, gp, xp, cp, dgp, dxp, sh.nx, sh.S, sh.C, sh.L);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dg, dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fisnet, CUDA, m) {
  m.impl("bn_train_bwd", &bn_train_bwd_cuda);
  m.impl("bn_train_bwd_bwd", &bn_train_bwd_bwd_cuda);
}

}  // namespace fisnet
