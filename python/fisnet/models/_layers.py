"""Building blocks of the MobileNet-V2, EfficientNet and ConvNeXt backbones, written here in the
layout of ``torchvision.ops.misc`` / ``torchvision.ops.stochastic_depth`` (module and parameter
names as torchvision's, so torchvision state dicts load):

* :class:`Conv2dNormActivation` — an ``nn.Sequential`` of conv (index 0), norm (1) and activation
  (2, when given); "same" padding ``(k - 1) // 2 * dilation`` unless ``padding`` is given; the conv
  has a bias only without a norm layer (or when ``bias=True``);
* :class:`SqueezeExcitation` — ``avgpool``, ``fc1`` / ``fc2`` (1x1 convs), ``activation``,
  ``scale_activation``; returns ``scale * input`` (the gate the "gate" rule holds constant);
* :class:`StochasticDepth` — identity in eval mode (or at p = 0); in training mode the input times
  a per-sample (``"row"``) or per-batch Bernoulli mask divided by the survival rate: a
  multiplication by a constant, so linear for LRP;
* :class:`Permute` and :class:`LayerNorm2d` (ConvNeXt's channels-first LayerNorm: permute to
  channels-last, ``F.layer_norm``, permute back).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["make_divisible", "Conv2dNormActivation", "SqueezeExcitation", "StochasticDepth",
           "Permute", "LayerNorm2d"]


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's ``_make_divisible``: round `v` to a multiple of `divisor`, not below
    `min_value` (default `divisor`) and not more than 10 % below `v`."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


class Conv2dNormActivation(nn.Sequential):
    """conv → norm → activation, as ``torchvision.ops.Conv2dNormActivation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, groups: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = nn.BatchNorm2d,
                 activation_layer: Optional[Callable[..., nn.Module]] = nn.ReLU,
                 dilation: int = 1, inplace: Optional[bool] = True, bias: Optional[bool] = None) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers: List[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                             dilation=dilation, groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al.), as ``torchvision.ops.SqueezeExcitation``:
    ``input * scale_activation(fc2(activation(fc1(avgpool(input)))))``."""

    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: Callable[..., nn.Module] = nn.ReLU,
                 scale_activation: Callable[..., nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._scale(x)
        return scale * x


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """Drop whole residual branches (Huang et al.): identity unless training and p > 0."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"stochastic depth probability must be in [0, 1], got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"stochastic depth mode must be 'batch' or 'row', got {mode!r}")
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    size = [x.shape[0]] + [1] * (x.dim() - 1) if mode == "row" else [1] * x.dim()
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return x * noise


class StochasticDepth(nn.Module):
    """``torchvision.ops.StochasticDepth`` (no parameters)."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        if p < 0.0 or p > 1.0 or mode not in ("batch", "row"):
            raise ValueError(f"StochasticDepth: p must be in [0, 1] and mode 'batch' or 'row', got {p}, {mode!r}")
        self.p = float(p)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.mode, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


class Permute(nn.Module):
    """``torch.permute(x, dims)`` as a module (``torchvision.ops.Permute``)."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor (ConvNeXt's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
