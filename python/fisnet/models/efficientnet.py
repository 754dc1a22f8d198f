"""EfficientNet-B0, written here in the torchvision layout (no torchvision needed).

Structure and names as ``torchvision.models.efficientnet``: ``features`` is an ``nn.Sequential`` of
a stem ``Conv2dNormActivation`` (3x3, stride 2, BN, ``nn.SiLU``), one ``nn.Sequential`` of
``MBConv`` blocks per stage and a last 1x1 ConvBNSiLU (4x the last stage's width); then
``avgpool`` (``AdaptiveAvgPool2d(1)``), ``torch.flatten`` and ``classifier = Sequential(Dropout,
Linear)``. An ``MBConv`` has ``.block``: an optional 1x1 expansion ConvBNSiLU, a depthwise
ConvBNSiLU, a ``SqueezeExcitation`` (``fc1``/``fc2`` 1x1 convs, SiLU, Sigmoid gate; squeeze width
input/4) and a 1x1 projection ConvBN; with stride 1 and equal widths the output is
``stochastic_depth(block(x)) + x`` (in place, as torchvision). Keys such as
``features.2.0.block.2.fc1.weight`` and ``classifier.1.weight`` are torchvision's, so torchvision
state dicts load (``weights=PATH``). BatchNorm eps 1e-5 (torchvision's B0).

For LRP the Sigmoid of the squeeze-excitation is a gate (the "gate" rule holds it constant in the
heatmap backward); StochasticDepth is identity in eval mode and a multiplication by a constant
per-sample mask in training mode (linear).

Additions to torchvision's signature: ``in_channels``, ``small_input=True`` (stem stride 1).

``efficientnet_micro``: the same blocks in a configuration that trains on the CPU on 36x36 digits
(stem 16 channels, stride 2; stages (expand, kernel, stride, in, out, repeats) = (1, 3, 1, 16, 8, 1),
(4, 3, 2, 8, 16, 2), (4, 5, 2, 16, 24, 2), (4, 3, 2, 24, 40, 2); last conv 160 channels;
stochastic depth 0 and dropout 0.1 by default).

Default LDS layers (``model.lds_layers``): the output of the last stage at each resolution (the
stage before each stride-2 stage) and the last 1x1 conv. For ``efficientnet_b0``:
``features.1, features.2, features.3, features.5, features.8``.
Initialisation as torchvision: Kaiming-normal (fan-out) convs, BN 1/0, linear U(±1/√out).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import List, Sequence

import torch
import torch.nn as nn

from ._init import kaiming_init
from ._layers import Conv2dNormActivation, SqueezeExcitation, StochasticDepth, make_divisible
from .weights import with_weights

__all__ = ["EfficientNet", "MBConv", "MBConvConfig", "efficientnet_b0", "efficientnet_micro",
           "EFFICIENTNET_B0_SETTING", "EFFICIENTNET_MICRO_SETTING"]


@dataclass
class MBConvConfig:
    """One stage: expand ratio, kernel, first stride, input and output widths, repeats."""

    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int

    @staticmethod
    def adjust_channels(channels: int, width_mult: float, min_value=None) -> int:
        return make_divisible(channels * width_mult, 8, min_value)


def _stages(rows, width_mult: float = 1.0, depth_mult: float = 1.0) -> List[MBConvConfig]:
    return [MBConvConfig(t, k, s, MBConvConfig.adjust_channels(i, width_mult),
                         MBConvConfig.adjust_channels(o, width_mult), int(math.ceil(n * depth_mult)))
            for t, k, s, i, o, n in rows]


# (expand ratio, kernel, stride, input channels, output channels, repeats)
EFFICIENTNET_B0_SETTING = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                           (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
EFFICIENTNET_MICRO_SETTING = ((1, 3, 1, 16, 8, 1), (4, 3, 2, 8, 16, 2), (4, 5, 2, 16, 24, 2), (4, 3, 2, 24, 40, 2))


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (EfficientNet's block)."""

    def __init__(self, cnf: MBConvConfig, stochastic_depth_prob: float) -> None:
        super().__init__()
        if cnf.stride not in (1, 2):
            raise ValueError(f"illegal stride value {cnf.stride}")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: List[nn.Module] = []
        expanded = cnf.adjust_channels(cnf.input_channels, cnf.expand_ratio)
        if expanded != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, expanded, kernel_size=1,
                                               activation_layer=nn.SiLU, inplace=None))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel_size=cnf.kernel, stride=cnf.stride,
                                           groups=expanded, activation_layer=nn.SiLU, inplace=None))
        squeeze = max(1, cnf.input_channels // 4)
        layers.append(SqueezeExcitation(expanded, squeeze, activation=partial(nn.SiLU, inplace=True)))
        layers.append(Conv2dNormActivation(expanded, cnf.out_channels, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cnf.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(nn.Module):
    """torchvision-style EfficientNet. ``lds_layers`` names the default LDS layers."""

    classifier_modules = ("classifier",)

    def __init__(self, inverted_residual_setting: Sequence[MBConvConfig], dropout: float,
                 stochastic_depth_prob: float = 0.2, num_classes: int = 1000, in_channels: int = 3,
                 small_input: bool = False, last_channel=None) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")
        if not inverted_residual_setting or not all(isinstance(c, MBConvConfig) for c in inverted_residual_setting):
            raise ValueError("inverted_residual_setting should be a non-empty list of MBConvConfig")
        first = inverted_residual_setting[0].input_channels
        layers: List[nn.Module] = [Conv2dNormActivation(in_channels, first, kernel_size=3,
                                                        stride=1 if small_input else 2,
                                                        activation_layer=nn.SiLU, inplace=None)]
        total = sum(c.num_layers for c in inverted_residual_setting)
        block_id = 0
        for cnf in inverted_residual_setting:
            stage: List[nn.Module] = []
            for _ in range(cnf.num_layers):
                c = copy.copy(cnf)
                if stage:
                    c.input_channels = c.out_channels
                    c.stride = 1
                stage.append(MBConv(c, stochastic_depth_prob * float(block_id) / total))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = inverted_residual_setting[-1].out_channels
        last_out = last_channel if last_channel is not None else 4 * last_in
        layers.append(Conv2dNormActivation(last_in, last_out, kernel_size=1, activation_layer=nn.SiLU,
                                           inplace=None))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last_out, num_classes))
        # LDS: the stage before every stride-2 stage, and the last conv
        n = len(inverted_residual_setting)
        self.lds_layers = tuple(f"features.{i + 1}" for i in range(n - 1)
                                if inverted_residual_setting[i + 1].stride == 2) + (f"features.{n + 1}",)
        kaiming_init(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def efficientnet_b0(*, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.2,
                    stochastic_depth_prob: float = 0.2, small_input: bool = False, weights=None) -> EfficientNet:
    """EfficientNet-B0 (torchvision's configuration)."""
    return with_weights(EfficientNet(_stages(EFFICIENTNET_B0_SETTING), dropout, stochastic_depth_prob,
                                     num_classes=num_classes, in_channels=in_channels,
                                     small_input=small_input), weights)


def efficientnet_micro(*, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                       dropout: float = 0.1, stochastic_depth_prob: float = 0.0, small_input: bool = False,
                       weights=None) -> EfficientNet:
    """A small EfficientNet for 28-64 px images on the CPU (see the module docstring)."""
    stages = _stages(EFFICIENTNET_MICRO_SETTING, width_mult)
    return with_weights(EfficientNet(stages, dropout, stochastic_depth_prob, num_classes=num_classes,
                                     in_channels=in_channels, small_input=small_input,
                                     last_channel=4 * stages[-1].out_channels), weights)
