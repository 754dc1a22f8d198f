// Element-wise formulas of the lrp_act family (activation y = phi(z) with the identity-rule
// heatmap backward), shared by the CPU kernels (csrc/cpu/act.cpp) and the CUDA kernels
// (csrc/cuda/act.cu): one place for the maths.  The Python reference (fisnet_ext/reference.py)
// and the Triton kernels (fisnet_ext/triton/act.py) implement the same formulas.
//
// Kinds (the integer codes are part of the op schema; fisnet_ext/act_ops.py holds the names):
//   0 relu  1 relu6  2 leaky_relu(param = negative slope)  3 gelu (erf)  4 gelu_tanh  5 silu
//   6 hardswish  7 elu(param = alpha)  8 mish  9 softplus(param = beta, threshold 20)
// phi is PyTorch's forward formula (ATen's CPU scalar path) for each kind.
//
// The heatmap factor: h(z) = phi(z) / (z + eps*s), s = sign z with sign(0) := +1.
// Every kind but softplus has phi(0) = 0 and is written phi(z) = z * g(z) with g(0) := phi'(0)
// (PyTorch's derivative at 0).  With r = z / d (d = z + eps*s; r := 1 where d == 0, which needs
// z == 0 and eps == 0) and q = eps*s / d^2 (0 where eps == 0):
//     h  = r g                     (eps = 0: h = g, the identity rule phi(z)/z)
//     h' = r g' + q g              (since r' = q)
// so no difference of nearly equal terms appears, also for eps = 0.  Softplus (phi(0) > 0) has
// no such g; it needs eps > 0 and uses h = phi/d, h' = (phi' - h)/d.
#pragma once
#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FISNET_HD __host__ __device__ __forceinline__
#else
#define FISNET_HD inline
#endif

namespace fisnet {
namespace act {

enum Kind : int {
  kRelu = 0,
  kRelu6 = 1,
  kLeakyRelu = 2,
  kGelu = 3,
  kGeluTanh = 4,
  kSilu = 5,
  kHardswish = 6,
  kElu = 7,
  kMish = 8,
  kSoftplus = 9,
  kNumKinds = 10,
};

constexpr double kSoftplusThreshold = 20.0;  // PyTorch's default threshold of F.softplus
constexpr double kEluSeries = 0.25;          // |z| below which elu's g' uses its Taylor series

// float / double overloads of the libm functions (host and device).
FISNET_HD float m_exp(float v) { return ::expf(v); }
FISNET_HD double m_exp(double v) { return ::exp(v); }
FISNET_HD float m_expm1(float v) { return ::expm1f(v); }
FISNET_HD double m_expm1(double v) { return ::expm1(v); }
FISNET_HD float m_log1p(float v) { return ::log1pf(v); }
FISNET_HD double m_log1p(double v) { return ::log1p(v); }
FISNET_HD float m_erf(float v) { return ::erff(v); }
FISNET_HD double m_erf(double v) { return ::erf(v); }
FISNET_HD float m_tanh(float v) { return ::tanhf(v); }
FISNET_HD double m_tanh(double v) { return ::tanh(v); }

// phi(z): the forward.
template <int K, typename T>
FISNET_HD T phi(T z, T p) {
  if constexpr (K == kRelu) {
    return (z > T(0) || z != z) ? z : T(0);  // NaN propagates, as in torch.relu
  } else if constexpr (K == kRelu6) {
    T lo = (z < T(0)) ? T(0) : z;  // NaN propagates, as in torch.clamp
    return (lo > T(6)) ? T(6) : lo;
  } else if constexpr (K == kLeakyRelu) {
    return z > T(0) ? z : z * p;
  } else if constexpr (K == kGelu) {
    return z * T(0.5) * (T(1) + m_erf(z * T(M_SQRT1_2)));
  } else if constexpr (K == kGeluTanh) {
    const T beta = T(M_SQRT2 * M_2_SQRTPI * 0.5);
    T inner = beta * (z + T(0.044715) * (z * z * z));
    return T(0.5) * z * (T(1) + m_tanh(inner));
  } else if constexpr (K == kSilu) {
    return z / (T(1) + m_exp(-z));
  } else if constexpr (K == kHardswish) {
    T c = z + T(3);
    c = c < T(0) ? T(0) : c;
    c = c > T(6) ? T(6) : c;
    return z * c / T(6);
  } else if constexpr (K == kElu) {
    return z <= T(0) ? m_expm1(z) * p : z;
  } else if constexpr (K == kMish) {
    return z * m_tanh(m_log1p(m_exp(z)));
  } else {  // kSoftplus
    T bz = z * p;
    return bz > T(kSoftplusThreshold) ? z : m_log1p(m_exp(bz)) / p;
  }
}

// g(z) = phi(z)/z with g(0) = phi'(0), and (when GP) g'(z).  Softplus: g = phi'(z) (no g').
template <int K, bool GP, typename T>
FISNET_HD void ratio(T z, T p, T& g, T& gp) {
  if constexpr (K == kRelu) {
    g = z > T(0) ? T(1) : T(0);
    if constexpr (GP) gp = T(0);
  } else if constexpr (K == kRelu6) {
    bool hi = z >= T(6);
    T zs = hi ? z : T(6);
    T inv = T(1) / zs;
    g = hi ? T(6) * inv : (z > T(0) ? T(1) : T(0));
    if constexpr (GP) gp = hi ? T(-6) * inv * inv : T(0);
  } else if constexpr (K == kLeakyRelu) {
    g = z > T(0) ? T(1) : p;
    if constexpr (GP) gp = T(0);
  } else if constexpr (K == kGelu) {
    g = T(0.5) * (T(1) + m_erf(z * T(M_SQRT1_2)));
    if constexpr (GP) gp = m_exp(T(-0.5) * z * z) * T(0.5 * M_2_SQRTPI * M_SQRT1_2);
  } else if constexpr (K == kGeluTanh) {
    // g = (1 + tanh u)/2 = sigmoid(2u): one exp instead of tanh; g' = 2 g (1 - g) u'
    const T beta = T(M_SQRT2 * M_2_SQRTPI * 0.5);
    const T kappa = T(0.044715);
    T u = beta * (z + kappa * (z * z * z));
    T e = m_exp(T(-2) * u);
    g = T(1) / (T(1) + e);
    // g (1 - g) = e g^2: no cancellation where g is near 1; 0 where e overflows (g == 0)
    if constexpr (GP) gp = (g > T(0) ? T(2) * e * g * g : T(0)) * beta * (T(1) + T(3) * kappa * z * z);
  } else if constexpr (K == kSilu) {
    T s = T(1) / (T(1) + m_exp(-z));
    g = s;
    if constexpr (GP) gp = s * (T(1) - s);
  } else if constexpr (K == kHardswish) {
    T c = z + T(3);
    c = c < T(0) ? T(0) : c;
    c = c > T(6) ? T(6) : c;
    g = c / T(6);
    if constexpr (GP) gp = (z > T(-3) && z < T(3)) ? T(1) / T(6) : T(0);
  } else if constexpr (K == kElu) {
    bool neg = z < T(0);
    T zs = neg ? z : T(-1);  // safe divisor
    T em = m_expm1(zs);
    g = z > T(0) ? T(1) : (neg ? p * (em / zs) : p);  // g(0) = alpha = phi'(0) in PyTorch
    if constexpr (GP) {
      // d/dz expm1(z)/z = (z e^z - expm1 z)/z^2; near 0 its series sum_m (m+1) z^m / (m+2)!
      T zz = z <= T(0) ? z : T(0);
      T series = T(1) / T(2) + zz * (T(1) / T(3) + zz * (T(1) / T(8) + zz * (T(1) / T(30) +
                 zz * (T(1) / T(144) + zz * (T(1) / T(840) + zz * (T(1) / T(5760) + zz * (T(1) / T(45360) +
                 zz * (T(1) / T(403200) + zz * (T(1) / T(3991680))))))))));
      T direct = (zs * (em + T(1)) - em) / (zs * zs);
      T d = (zz > T(-kEluSeries)) ? series : direct;
      gp = z > T(0) ? T(0) : p * d;
    }
  } else if constexpr (K == kMish) {
    // tanh(log(1 + e)) = n / (n + 2) with e = exp z, n = e (e + 2): one exp instead of exp, log1p
    // and tanh; 1 - g^2 = 4 (n + 1) / (n + 2)^2 and sigmoid z = e / (1 + e).  For z > 20, g
    // rounds to 1 in float and double (and g' to 0, as 1 - tanh^2 does).
    bool big = z > T(20);
    T e = m_exp(big ? T(0) : z);
    T n = e * (e + T(2));
    T inv = T(1) / (n + T(2));
    g = big ? T(1) : n * inv;
    if constexpr (GP) gp = big ? T(0) : T(4) * (n + T(1)) * inv * inv * (e / (T(1) + e));
  } else {  // kSoftplus: g is phi'
    T bz = z * p;
    T e = m_exp(bz > T(kSoftplusThreshold) ? T(0) : bz);
    g = bz > T(kSoftplusThreshold) ? T(1) : e / (e + T(1));
    if constexpr (GP) gp = T(0);
  }
}

// Heatmap factor h(z) (and h'(z) when GP) for eps >= 0 (eps > 0 for softplus).
template <int K, bool GP, typename T>
FISNET_HD void factor(T z, T p, T eps, T& h, T& hp) {
  T se = z < T(0) ? -eps : eps;  // eps * sign z, sign(0) = +1
  T d = z + se;
  bool nz = d != T(0);
  T dd = nz ? d : T(1);
  T g, gp;
  if constexpr (K != kSoftplus) ratio<K, GP, T>(z, p, g, gp);
  if constexpr (K == kSoftplus) {
    T bz = z * p;
    bool big = bz > T(kSoftplusThreshold);
    T e = m_exp(big ? T(0) : bz);  // one exp for phi and phi' (g)
    T f = big ? z : m_log1p(e) / p;
    g = big ? T(1) : e / (e + T(1));
    h = f / dd;
    if constexpr (GP) hp = (g - h) / dd;
  } else {
    T r = nz ? z / dd : T(1);  // a division, not z * (1/d): exactly 1 when eps == 0
    h = r * g;
    if constexpr (GP) {
      T inv = T(1) / dd;
      hp = r * gp + se * inv * inv * g;
    }
  }
}

}  // namespace act
}  // namespace fisnet
