"""VGG-11/16 with and without BatchNorm, written here (no torchvision needed).

``features`` follows torchvision's layout (configs "A" = VGG-11 and "D" = VGG-16: 3x3 convs,
``nn.ReLU(inplace=True)`` modules, optional BatchNorm after each conv, five 2x2 max-pools), so
module names such as ``features.0`` match torchvision's.

Changes for small images (documented choice):

* the max-pools use ``ceil_mode=True``: identical to torchvision on even sizes, and 28x28
  inputs work (28 -> 14 -> 7 -> 4 -> 2 -> 1) instead of shrinking to zero;
* the head is ``AdaptiveAvgPool2d((1, 1))`` followed by ``Linear(512, hidden)-ReLU-Dropout-
  Linear(hidden, hidden)-ReLU-Dropout-Linear(hidden, num_classes)`` with ``hidden=512`` by
  default (the common CIFAR-VGG head). torchvision's ``(7, 7)`` pool and 4096-wide layers would
  add ~120M parameters that replicate one 1x1 map 49 times on a 32x32 input. ``dropout`` sets the
  dropout probability (0.5 default, 0 disables it).

Default LDS layers (``model.lds_layers``): the output of each of the five pooling stages
(the ``features.<i>`` names of the ``MaxPool2d`` modules; the last is the last feature map).
Initialisation as torchvision: Kaiming-normal (fan-out) convs, BN 1/0, linear N(0, 0.01).
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn as nn

from ._init import kaiming_init
from .weights import with_weights

__all__ = ["VGG", "vgg11", "vgg16", "vgg11_bn", "vgg16_bn", "CFGS"]

CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_layers(cfg: Sequence[Union[str, int]], batch_norm: bool, in_channels: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        else:
            conv = nn.Conv2d(c, int(v), kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv, nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            else:
                layers += [conv, nn.ReLU(inplace=True)]
            c = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with a small-image head. ``lds_layers`` names the default LDS layers."""

    classifier_modules = ("classifier",)

    def __init__(self, features: nn.Sequential, num_classes: int = 10, hidden: int = 512,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        last = [m for m in features if isinstance(m, nn.Conv2d)][-1].out_channels
        self.classifier = nn.Sequential(
            nn.Linear(last, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self.lds_layers = tuple(f"features.{i}" for i, m in enumerate(features)
                                if isinstance(m, nn.MaxPool2d))
        kaiming_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _vgg(cfg: str, batch_norm: bool, num_classes: int, in_channels: int, hidden: int,
         dropout: float, weights=None) -> VGG:
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be >= 1, got "
                         f"{num_classes} and {in_channels}")
    return with_weights(VGG(make_layers(CFGS[cfg], batch_norm, in_channels), num_classes=num_classes,
                            hidden=hidden, dropout=dropout), weights)


def vgg11(*, num_classes: int = 10, in_channels: int = 3, hidden: int = 512,
          dropout: float = 0.5, weights=None) -> VGG:
    """VGG-11 (config "A"), no BatchNorm."""
    return _vgg("A", False, num_classes, in_channels, hidden, dropout, weights)


def vgg11_bn(*, num_classes: int = 10, in_channels: int = 3, hidden: int = 512,
             dropout: float = 0.5, weights=None) -> VGG:
    """VGG-11 (config "A") with BatchNorm after every conv."""
    return _vgg("A", True, num_classes, in_channels, hidden, dropout, weights)


def vgg16(*, num_classes: int = 10, in_channels: int = 3, hidden: int = 512,
          dropout: float = 0.5, weights=None) -> VGG:
    """VGG-16 (config "D"), no BatchNorm."""
    return _vgg("D", False, num_classes, in_channels, hidden, dropout, weights)


def vgg16_bn(*, num_classes: int = 10, in_channels: int = 3, hidden: int = 512,
             dropout: float = 0.5, weights=None) -> VGG:
    """VGG-16 (config "D") with BatchNorm after every conv."""
    return _vgg("D", True, num_classes, in_channels, hidden, dropout, weights)
