"""DenseNet-121, written here in the torchvision layout (no torchvision needed).

Structure as ``torchvision.models.densenet``: ``features`` is an ``nn.Sequential`` of
``conv0, norm0, relu0, pool0, denseblock1, transition1, ..., denseblock4, norm5``; dense layers
are pre-activation (``norm1, relu1 (nn.ReLU inplace), conv1 1x1, norm2, relu2, conv2 3x3``) and
concatenate all previous feature maps; the head applies the *functional* ``F.relu`` (as
torchvision does), then adaptive average pooling and a linear classifier. Growth rate 32,
blocks (6, 12, 24, 16), 64 initial features, bottleneck width 4 x growth, compression 0.5.

Differences from torchvision, all for small images:

* the transitions' 2x2 average pools use ``ceil_mode=True``. On even sizes this is identical
  to torchvision; on odd sizes the last, partial window is averaged over its valid cells, so
  28x28 inputs work (28 -> 14 -> 7 -> 4 -> 2 -> 1) instead of shrinking to zero;
* ``small_input=True`` replaces the 7x7/stride-2 stem convolution and the max-pool by one
  3x3/stride-1 convolution (``pool0`` becomes ``nn.Identity``);
* ``in_channels`` sets the stem's input channels.

Default LDS layers (``model.lds_layers``): ``features.transition1`` .. ``features.transition3``
(the output of each transition) and ``features.norm5`` (the last feature map; the final ReLU is
functional, so the last module whose output is the last feature map is ``norm5``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import with_weights

__all__ = ["DenseNet", "densenet121"]


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int,
                 drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1,
                               stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, inputs) -> torch.Tensor:
        prev = [inputs] if isinstance(inputs, torch.Tensor) else inputs
        concated = torch.cat(prev, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int,
                 growth_rate: int, drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            _DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                        bn_size, drop_rate))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1,
                              stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)


class DenseNet(nn.Module):
    """torchvision-style DenseNet-BC. ``lds_layers`` names the default LDS layers."""

    classifier_modules = ("classifier",)

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 10, in_channels: int = 3, small_input: bool = False) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got "
                             f"{num_classes} and {in_channels}")
        if small_input:
            stem = [("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=3,
                                        stride=1, padding=1, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.Identity())]
        else:
            stem = [("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7,
                                        stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        self.features = nn.Sequential(OrderedDict(stem))

        num_features = num_init_features
        lds = []
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features,
                                bn_size=bn_size, growth_rate=growth_rate, drop_rate=drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                lds.append(f"features.transition{i + 1}")
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        lds.append("features.norm5")
        self.lds_layers = tuple(lds)
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet121(*, num_classes: int = 10, in_channels: int = 3, small_input: bool = False,
                drop_rate: float = 0.0, weights=None) -> DenseNet:
    """DenseNet-121: growth 32, blocks (6, 12, 24, 16), 64 initial features."""
    return with_weights(DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes, in_channels=in_channels,
                                 small_input=small_input, drop_rate=drop_rate), weights)
