"""MobileNet-V2, written here in the torchvision layout (no torchvision needed).

Structure and names as ``torchvision.models.mobilenetv2``: ``features`` is an ``nn.Sequential`` of
a stem ``Conv2dNormActivation`` (3x3, stride 2, BN, ``nn.ReLU6``), the ``InvertedResidual`` blocks
(``.conv``: an optional 1x1 expansion ConvBNReLU6, a depthwise 3x3 ConvBNReLU6, a 1x1 projection
conv and its BatchNorm; ``x + self.conv(x)`` when stride 1 and the widths match) and a last 1x1
ConvBNReLU6 to ``last_channel``; then adaptive average pooling, ``torch.flatten`` and
``classifier = Sequential(Dropout, Linear)``. So ``features.1.conv.0.0.weight`` or
``classifier.1.weight`` are torchvision's keys and torchvision state dicts load
(``weights=PATH``).

Additions to torchvision's signature: ``in_channels`` (the stem's input channels) and
``small_input=True`` (stem stride 1 instead of 2, for inputs of 16-64 px).

``mobilenet_v2_micro``: the same blocks in a configuration that trains on the CPU on 36x36 digits
(stem 16 channels, stride 2; four stages (t, c, n, s) = (1, 16, 1, 1), (4, 24, 2, 2),
(4, 32, 2, 2), (4, 64, 2, 2); last 1x1 conv to 256 channels; ``width_mult`` applies as usual).

Default LDS layers (``model.lds_layers``): the output of the last block of each resolution (the
block before each stride-2 block, and the last 1x1 ConvBNReLU6). For ``mobilenet_v2``:
``features.1, features.3, features.6, features.13, features.18``.
Initialisation as torchvision: Kaiming-normal (fan-out) convs, BN 1/0, linear N(0, 0.01).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._init import kaiming_init
from ._layers import Conv2dNormActivation, make_divisible
from .weights import with_weights

__all__ = ["MobileNetV2", "InvertedResidual", "mobilenet_v2", "mobilenet_v2_micro",
           "MOBILENET_V2_SETTING", "MOBILENET_V2_MICRO_SETTING"]

# (expand ratio t, output channels c, repeats n, first stride s)
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))
MOBILENET_V2_MICRO_SETTING = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2))


class InvertedResidual(nn.Module):
    """MobileNet-V2 block: expand (1x1) → depthwise (3x3) → project (1x1, linear)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6,
                                               inplace=None))
        layers += [
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                                 activation_layer=nn.ReLU6, inplace=None),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision-style MobileNet-V2. ``lds_layers`` names the default LDS layers."""

    classifier_modules = ("classifier",)

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: Optional[Sequence[Sequence[float]]] = None,
                 round_nearest: int = 8, dropout: float = 0.2, in_channels: int = 3,
                 small_input: bool = False, input_channel: int = 32, last_channel: int = 1280) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or not width_mult > 0:
            raise ValueError(f"num_classes and in_channels must be >= 1 and width_mult > 0, got "
                             f"{num_classes}, {in_channels}, {width_mult}")
        setting = MOBILENET_V2_SETTING if inverted_residual_setting is None else inverted_residual_setting
        if len(setting) == 0 or any(len(row) != 4 for row in setting):
            raise ValueError(f"inverted_residual_setting should be a non-empty list of (t, c, n, s) rows, "
                             f"got {setting}")
        input_channel = make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [Conv2dNormActivation(in_channels, input_channel, stride=1 if small_input else 2,
                                                          activation_layer=nn.ReLU6, inplace=None)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(int(n)):
                features.append(InvertedResidual(input_channel, output_channel, int(s) if i == 0 else 1,
                                                 expand_ratio=t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             activation_layer=nn.ReLU6, inplace=None))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        # LDS: the last block at each resolution (before every stride-2 block), and the last conv
        strided = [i for i, m in enumerate(features) if isinstance(m, InvertedResidual) and m.stride == 2]
        self.lds_layers = tuple(f"features.{i - 1}" for i in strided if i > 1) + (f"features.{len(features) - 1}",)
        kaiming_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(*, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2, small_input: bool = False, weights=None) -> MobileNetV2:
    """MobileNet-V2 (torchvision's configuration; ``width_mult`` scales every width)."""
    return with_weights(MobileNetV2(num_classes=num_classes, width_mult=width_mult, dropout=dropout,
                                    in_channels=in_channels, small_input=small_input), weights)


def mobilenet_v2_micro(*, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                       dropout: float = 0.1, small_input: bool = False, weights=None) -> MobileNetV2:
    """A small MobileNet-V2 for 28-64 px images on the CPU (see the module docstring)."""
    return with_weights(MobileNetV2(num_classes=num_classes, width_mult=width_mult,
                                    inverted_residual_setting=MOBILENET_V2_MICRO_SETTING, dropout=dropout,
                                    in_channels=in_channels, small_input=small_input, input_channel=16,
                                    last_channel=256), weights)
