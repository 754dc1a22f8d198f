// Argument checks shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <initializer_list>
#include <utility>

// x86-64 with gcc: a CPU loop marked FISNET_MULTIVERSION is also compiled for AVX2+FMA
// (x86-64-v3) and the clone is picked at load time (function multiversioning); the default clone
// is the baseline ISA.  Measured: bn_train_bwd_bwd 0.43 -> 0.18 ms on a (32, 16, 32, 32) batch.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FISNET_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FISNET_MULTIVERSION
#endif

namespace fisnet {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fisnet: ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// Element-wise op groups with slots (lrp_relu, lrp_act): g must have x's shape, or x's shape
// with extra leading (slot) dimensions; one dtype and device; eps >= 0.  `op` names the op in
// the messages.
inline void check_slot_args(const char* op, const at::Tensor& g, const at::Tensor& x, double eps) {
  check_float(x, "x");
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "fisnet.", op, ": g is ", g.scalar_type(), " but x is ",
              x.scalar_type(), "; pass tensors of one dtype");
  TORCH_CHECK(g.device() == x.device(), "fisnet.", op, ": g is on ", g.device(), " but x is on ", x.device());
  TORCH_CHECK(eps >= 0.0, "fisnet.", op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(g.dim() >= x.dim(), "fisnet.", op, ": g has shape ", g.sizes(), ", x has shape ", x.sizes(),
              "; g must have x's shape, optionally with leading slot dimensions");
  auto gs = g.sizes();
  auto xs = x.sizes();
  TORCH_CHECK(gs.slice(gs.size() - xs.size()) == xs, "fisnet.", op, ": g has shape ", gs, ", x has shape ",
              xs, "; g must have x's shape, optionally with leading slot dimensions");
}

// The double-backward ops of those groups: the slot checks, and gg like g (shape, dtype, device).
inline void check_slot_args2(const char* op, const at::Tensor& gg, const at::Tensor& g, const at::Tensor& x,
                             double eps) {
  check_slot_args(op, g, x, eps);
  TORCH_CHECK(gg.sizes() == g.sizes(), "fisnet.", op, ": gg has shape ", gg.sizes(),
              " but g has shape ", g.sizes(), "; they must be equal");
  TORCH_CHECK(gg.scalar_type() == g.scalar_type(), "fisnet.", op, ": gg is ", gg.scalar_type(),
              " but g is ", g.scalar_type(), "; pass tensors of one dtype");
  TORCH_CHECK(gg.device() == g.device(), "fisnet.", op, ": gg is on ", gg.device(), " but g is on ",
              g.device());
}

inline void check_bwd_args(const at::Tensor& g, const at::Tensor& x, double eps) {
  check_slot_args("lrp_relu_bwd", g, x, eps);
}

inline void check_bwd_bwd_args(const at::Tensor& gg, const at::Tensor& g, const at::Tensor& x, double eps) {
  check_slot_args2("lrp_relu_bwd_bwd", gg, g, x, eps);
}

// lrp_act ops: a known kind and a finite parameter (softplus: beta > 0).  Kinds: csrc/act_math.h.
inline void check_act_kind(const char* op, int64_t kind, double param) {
  TORCH_CHECK(kind >= 0 && kind < 10, "fisnet.", op, ": unknown activation kind ", kind,
              " (0..9; see fisnet_ext.act_ops.KINDS)");
  TORCH_CHECK(std::isfinite(param), "fisnet.", op, ": param must be finite, got ", param);
  TORCH_CHECK(kind != 9 || param > 0.0, "fisnet.", op, ": softplus needs beta (param) > 0, got ", param);
}

// The forward of the lrp_act kinds that need libm (gelu, gelu_tanh, silu, elu, mish, softplus):
// PyTorch's own kernels on the tensor's device (csrc/cpu/act.cpp); an undefined tensor for the
// piecewise-linear kinds, which have their own loops.
at::Tensor act_fwd_aten(const at::Tensor& x, int64_t kind, double param);

// The backward ops also take eps: finite, and > 0 for softplus (softplus(0) > 0, so the identity
// rule phi(z)/z has a pole at 0).  The slot checks (check_slot_args) test eps >= 0.
inline void check_act_eps(const char* op, int64_t kind, double eps) {
  TORCH_CHECK(std::isfinite(eps), "fisnet.", op, ": eps must be finite, got ", eps);
  TORCH_CHECK(kind != 9 || eps > 0.0, "fisnet.", op, ": softplus needs eps > 0 (softplus(0) > 0, so "
              "phi(z)/z has a pole at z = 0), got ", eps);
}

// zplus ops: every tensor has the first one's floating dtype, device and shape; eps >= 0.
inline void check_zplus_args(const char* op, double eps,
                             std::initializer_list<std::pair<const at::Tensor*, const char*>> ts) {
  const at::Tensor& ref = *ts.begin()->first;
  const char* ref_name = ts.begin()->second;
  check_float(ref, ref_name);
  for (auto it = ts.begin() + 1; it != ts.end(); ++it) {
    const at::Tensor& t = *it->first;
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fisnet.", op, ": ", it->second, " is ", t.scalar_type(),
                " but ", ref_name, " is ", ref.scalar_type(), "; pass tensors of one dtype");
    TORCH_CHECK(t.device() == ref.device(), "fisnet.", op, ": ", it->second, " is on ", t.device(), " but ",
                ref_name, " is on ", ref.device());
    TORCH_CHECK(t.sizes() == ref.sizes(), "fisnet.", op, ": ", it->second, " has shape ", t.sizes(), " but ",
                ref_name, " has shape ", ref.sizes(), "; all tensors must have one shape");
  }
  TORCH_CHECK(eps >= 0.0, "fisnet.", op, ": eps must be >= 0, got ", eps);
}

// bn ops: x (N, C, *) floating; g x's shape with optional leading slot dims; weight (C,); one
// dtype and device; eps >= 0.
inline void check_bn_args(const char* op, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                          double eps) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 2, "fisnet.", op, ": x must have shape (N, C, ...), got ", x.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && w.scalar_type() == x.scalar_type(), "fisnet.", op,
              ": g is ", g.scalar_type(), ", x is ", x.scalar_type(), ", weight is ", w.scalar_type(),
              "; pass tensors of one dtype");
  TORCH_CHECK(g.device() == x.device() && w.device() == x.device(), "fisnet.", op, ": g is on ", g.device(),
              ", x on ", x.device(), ", weight on ", w.device(), "; pass tensors on one device");
  TORCH_CHECK(eps >= 0.0, "fisnet.", op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), "fisnet.", op, ": weight must have shape (C,) = (",
              x.size(1), ",), got ", w.sizes());
  auto gs = g.sizes();
  auto xs = x.sizes();
  TORCH_CHECK(gs.size() >= xs.size() && gs.slice(gs.size() - xs.size()) == xs, "fisnet.", op, ": g has shape ",
              gs, ", x has shape ", xs, "; g must have x's shape, optionally with leading slot dimensions");
}

}  // namespace fisnet
