"""Which functions the LRP trace knows, and how it treats each (docs/method.md, "The op table").

Every function a traced forward calls on a tensor that depends on the model input falls in one
of three classes:

* **linear** in its tensor inputs (conv, linear, average pooling, add, cat, reshape, pad,
  interpolate, dropout, …): its plain gradient is the LRP-0 rule, and the heatmap backward uses it
  unchanged (ε sits at the next activation);
* **has a rule**: ReLU (LRP-ε by the modified ReLU backward), max-pooling (winner-take-all: the
  plain gradient), BatchNorm (an affine map, folded into the layer for Zb and z⁺);
* **non-linear without a rule** (softmax, attention, LayerNorm/GroupNorm/InstanceNorm, sigmoid, a
  product of two input-dependent tensors, …): refused with `UnsupportedActivationError`.

A function not in any table is refused too (never silently linear); `register_linear(func)`
declares a function linear for every later trace, when the user knows that it is.

Multiplicative functions (mul, div, matmul, einsum, …) are linear when at most one operand
depends on the input (a product with a parameter, a constant, a mask) and refused otherwise
(a gate or attention); a division by an input-dependent tensor is refused.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

_T = torch.Tensor


def _funcs(*items):
    out = {}
    for owner, names in items:
        for n in names.split():
            f = getattr(owner, n, None)
            if f is not None:
                out[f] = f"{ {torch: 'torch', F: 'F', _T: 'Tensor'}[owner] }.{n}".replace(" ", "")
    return out


# linear in the tensor inputs: the plain gradient is LRP-0
LINEAR: Dict[Callable, str] = _funcs(
    (F, "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear "
        "avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
        "pad interpolate upsample upsample_nearest upsample_bilinear pixel_shuffle pixel_unshuffle "
        "dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout unfold fold channel_shuffle "
        "native_channel_shuffle"),
    (torch, "add sub subtract neg negative cat concat concatenate stack hstack vstack dstack flatten reshape "
            "permute transpose swapaxes swapdims t squeeze unsqueeze narrow select split chunk tensor_split unbind "
            "flip fliplr flipud roll rot90 movedim moveaxis sum mean nansum cumsum diagonal tile repeat_interleave "
            "index_select gather take_along_dim masked_select clone conv1d conv2d conv3d conv_transpose1d "
            "conv_transpose2d conv_transpose3d avg_pool1d adaptive_avg_pool1d dropout feature_dropout alpha_dropout "
            "trace real unflatten ravel broadcast_to atleast_1d atleast_2d atleast_3d squeeze_copy "
            "view_copy permute_copy channel_shuffle pixel_shuffle pixel_unshuffle"),
    (_T, "add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ neg neg_ __neg__ __pos__ "
         "flatten reshape reshape_as view view_as permute transpose transpose_ t t_ swapaxes swapdims squeeze "
         "squeeze_ unsqueeze unsqueeze_ expand expand_as repeat repeat_interleave narrow select split chunk "
         "tensor_split unbind __getitem__ __setitem__ flip roll rot90 movedim moveaxis sum mean nansum cumsum "
         "diagonal tile index_select gather masked_select contiguous clone to type type_as float double half "
         "bfloat16 cpu cuda unflatten ravel __iter__ as_strided narrow_copy copy_"),
)

LINEAR_NAMES = set(LINEAR.values())

# has a rule (see the module docstring)
RULES: Dict[Callable, str] = _funcs(
    (F, "relu relu_ batch_norm max_pool1d max_pool2d max_pool3d adaptive_max_pool1d adaptive_max_pool2d "
        "adaptive_max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices"),
    (torch, "relu relu_ batch_norm max_pool1d max_pool2d max_pool3d max amax"),
    (_T, "relu relu_ max amax"),
)
# winner-take-all functions are a rule only when reducing one tensor (torch.max(a, b) is not pooling)
REDUCTIONS = {torch.max, _T.max, torch.amax, _T.amax}

# products: linear only when at most one operand depends on the input
PRODUCTS: Dict[Callable, str] = _funcs(
    (torch, "mul multiply matmul mm bmm einsum tensordot inner outer dot vdot kron addmm addbmm baddbmm "
            "addcmul"),
    (_T, "mul mul_ __mul__ __rmul__ __imul__ multiply matmul __matmul__ __rmatmul__ mm bmm dot outer"),
)
# divisions: linear only when the divisor does not depend on the input
DIVISIONS: Dict[Callable, str] = _funcs(
    (torch, "div divide true_divide"),
    (_T, "div div_ __truediv__ __itruediv__ divide true_divide"),
)
# refused, with a pointer to what to do (the rule that is planned, or a rewrite)
NO_RULE: Dict[Callable, str] = _funcs(
    (F, "softmax log_softmax softmin gumbel_softmax scaled_dot_product_attention multi_head_attention_forward "
        "layer_norm group_norm instance_norm rms_norm local_response_norm normalize glu gelu silu mish "
        "hardswish hardsigmoid hardtanh relu6 elu selu celu leaky_relu prelu rrelu softplus softsign sigmoid "
        "tanh logsigmoid tanhshrink softshrink hardshrink threshold lp_pool1d lp_pool2d cosine_similarity"),
    (torch, "softmax log_softmax layer_norm group_norm instance_norm rms_norm sigmoid tanh exp log sqrt rsqrt "
            "pow square abs clamp clip maximum minimum erf prelu rrelu selu celu norm var std logsumexp "
            "reciprocal sign"),
    (_T, "softmax log_softmax sigmoid sigmoid_ tanh tanh_ exp exp_ log log_ sqrt rsqrt pow __pow__ square "
         "abs abs_ clamp clamp_ clip clip_ maximum minimum erf norm var std logsumexp reciprocal __rtruediv__ "
         "__abs__ sign"),
)
_HINT = {
    "softmax": "return logits (the ISNet and explain take softmaxes themselves); for attention use "
               "F.scaled_dot_product_attention, nn.MultiheadAttention or softmax(q @ k.transpose(-2, -1) * s) @ v",
    "attention": "attention has no LRP rule in fisnet yet (the cp/attnlrp rules are planned)",
    "norm": "the rule table treats F.layer_norm/F.group_norm/F.instance_norm/F.rms_norm (σ held constant); "
            "call those (or nn.LayerNorm/GroupNorm/InstanceNorm) rather than this form",
}


def hint(name: str) -> str:
    low = name.lower()
    if "attention" in low:
        return _HINT["attention"]
    if "softmax" in low or "softmin" in low:
        return _HINT["softmax"]
    if low.endswith("_norm") or "normalize" in low:
        return _HINT["norm"]
    return "replace it with a ReLU (F.relu / nn.ReLU), or explain a model without it"


def register_linear(func: Callable, name: str = "") -> None:
    """Declare `func` linear in its tensor inputs (its plain gradient is then the LRP-0 rule) for every
    later trace.  Only for functions that are: a non-linear function declared linear gives wrong maps."""
    LINEAR[func] = name or getattr(func, "__qualname__", repr(func))
    LINEAR_NAMES.add(LINEAR[func])


def func_name(func) -> str:
    for table in (LINEAR, RULES, PRODUCTS, DIVISIONS, NO_RULE):
        if func in table:
            return table[func]
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", None)
    return f"{mod}.{name}" if mod and mod not in ("builtins",) else name
