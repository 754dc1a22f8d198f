// The one binding file: the importable module fisnet_ext._C and the schemas of the
// fisnet custom ops.  Kernels register themselves per device in csrc/cpu and csrc/cuda;
// fake (meta) implementations and autograd are registered from Python (fisnet_ext/ops.py).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fisnet, m) {
  // Plain ReLU forward (the LRP-Flex op changes only the backward).
  m.def("lrp_relu_fwd(Tensor x) -> Tensor");
  // Heatmap backward: g * y / (y + eps) with y = relu(x); g may carry leading slot dims.
  m.def("lrp_relu_bwd(Tensor g, Tensor x, float eps) -> Tensor");
  // Its derivative: (d/dg, d/dx) contracted with gg.
  m.def("lrp_relu_bwd_bwd(Tensor gg, Tensor g, Tensor x, float eps) -> (Tensor, Tensor)");
  // z+ rule ratio step (Dual ISNet): g * num / (zp + eps), all of one shape; 0 where zp + eps == 0.
  m.def("zplus_ratio(Tensor g, Tensor num, Tensor zp, float eps) -> Tensor");
  // Its derivative contracted with gs: (d/dg, d/dnum, d/dzp); 0 where zp + eps == 0.
  m.def("zplus_ratio_bwd(Tensor gs, Tensor g, Tensor num, Tensor zp, float eps) -> (Tensor, Tensor, Tensor)");
  // Training-mode BatchNorm input-gradient s (g - mean(g) - x̂ mean(g x̂)), statistics of x
  // recomputed (x: (N, C, *); g: x's shape with optional leading slot dims; weight: (C,)).
  m.def("bn_train_bwd(Tensor g, Tensor x, Tensor weight, float eps) -> Tensor");
  // Its derivative contracted with h: (d/dg, d/dx, d/dweight), d/dx and d/dweight summed over slots.
  m.def("bn_train_bwd_bwd(Tensor h, Tensor g, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  // Element-wise activation y = phi(x) of kind `kind` (codes and formulas: csrc/act_math.h;
  // param: leaky_relu's slope, elu's alpha, softplus's beta).
  m.def("act_fwd(Tensor x, int kind, float param) -> Tensor");
  // Identity-rule heatmap backward: g * phi(x) / (x + eps * sign x), sign 0 = +1; g may carry
  // leading slot dims.
  m.def("act_bwd(Tensor g, Tensor x, int kind, float param, float eps) -> Tensor");
  // Its derivative contracted with gg: (d/dg, d/dx), both of g's shape.
  m.def("act_bwd_bwd(Tensor gg, Tensor g, Tensor x, int kind, float param, float eps) -> (Tensor, Tensor)");
}

#ifdef FISNET_WITH_CUDA
static constexpr bool kWithCuda = true;
#else
static constexpr bool kWithCuda = false;
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "fisnet compiled kernels (ops live under torch.ops.fisnet)";
  mod.attr("with_cuda") = kWithCuda;
}
