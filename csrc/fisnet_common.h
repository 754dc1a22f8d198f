// Argument checks shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

namespace fisnet {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fisnet: ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// g must have x's shape, or x's shape with extra leading (slot) dimensions.
inline void check_bwd_args(const at::Tensor& g, const at::Tensor& x, double eps) {
  check_float(x, "x");
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "fisnet.lrp_relu_bwd: g is ", g.scalar_type(), " but x is ",
              x.scalar_type(), "; pass tensors of one dtype");
  TORCH_CHECK(g.device() == x.device(), "fisnet.lrp_relu_bwd: g is on ", g.device(), " but x is on ", x.device());
  TORCH_CHECK(eps >= 0.0, "fisnet.lrp_relu_bwd: eps must be >= 0, got ", eps);
  TORCH_CHECK(g.dim() >= x.dim(), "fisnet.lrp_relu_bwd: g has shape ", g.sizes(), ", x has shape ", x.sizes(),
              "; g must have x's shape, optionally with leading slot dimensions");
  auto gs = g.sizes();
  auto xs = x.sizes();
  TORCH_CHECK(gs.slice(gs.size() - xs.size()) == xs, "fisnet.lrp_relu_bwd: g has shape ", gs, ", x has shape ",
              xs, "; g must have x's shape, optionally with leading slot dimensions");
}

}  // namespace fisnet
