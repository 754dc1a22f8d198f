"""fisnet_ext: the op layer of fisnet.

Tensors and kernels only (nothing of models or losses): the LRP-Flex ReLU op with its heatmap
backward and double backward, in C++ (CPU), CUDA and Triton (GPU) and pure PyTorch
(`fisnet_ext.reference`), registered as ``torch.ops.fisnet.*`` custom ops; the lrp_act family
(element-wise activations with the identity-rule heatmap backward, fisnet_ext/act_ops.py); the z⁺
ratio (`zplus_ratio`) and the training-mode BatchNorm heatmap backward (`bn_train_bwd`,
`bn_heatmap_backward`).  All four families are registered through one template,
fisnet_ext/opgroup.py.

The public names are those of ``__all__``, plus the modules `fisnet_ext.reference` (the
pure-PyTorch oracle) and `fisnet_ext.info`; the method layer (python/fisnet) uses nothing else
(tests/fisnet_ext/test_layering.py checks it).
"""
from .backend import BACKENDS, current_backend, use_backend
from .ops import (
    HAVE_C,
    HAVE_TRITON,
    WITH_CUDA,
    HeatmapSwitch,
    LRPReLU,
    family,
    lrp_relu,
    lrp_relu_,
    lrp_relu_bwd,
    lrp_relu_bwd_bwd,
    slot_mask,
)
from .bn_ops import bn_heatmap_backward, bn_train_bwd, bn_train_bwd_bwd
from .zplus_ops import zplus_ratio
from .act_ops import KINDS as ACT_KINDS, lrp_act

__all__ = [
    "BACKENDS", "current_backend", "use_backend", "HAVE_C", "HAVE_TRITON", "WITH_CUDA",
    "HeatmapSwitch", "LRPReLU", "family", "lrp_relu", "lrp_relu_", "lrp_relu_bwd", "lrp_relu_bwd_bwd", "slot_mask",
    "zplus_ratio", "bn_train_bwd", "bn_train_bwd_bwd", "bn_heatmap_backward", "lrp_act", "ACT_KINDS",
]
