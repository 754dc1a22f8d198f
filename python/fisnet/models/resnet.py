"""ResNet-18/34/50, written here in the torchvision layout (no torchvision needed).

The structure follows ``torchvision.models.resnet`` so that the LRP code, which intercepts
``nn.ReLU`` modules and functional ``F.relu`` calls, sees the same patterns as in the wild:

* every ``BasicBlock`` / ``Bottleneck`` owns ONE ``self.relu = nn.ReLU(inplace=True)`` module
  that is called two (basic) or three (bottleneck) times;
* the residual sum is written ``out += identity`` (in place) before the last ReLU.

Differences from torchvision, all chosen for small images:

* ``small_input=True`` replaces the 7x7/stride-2 stem convolution and the max-pool by one
  3x3/stride-1 convolution (the usual CIFAR stem). Default ``False`` (the torchvision stem),
  which already works on 28x28 inputs because the head uses ``AdaptiveAvgPool2d((1, 1))``.
* ``in_channels`` sets the number of input channels of the stem (1 for grey images).

Default LDS layers (``model.lds_layers``): the output of each stage, ``layer1`` .. ``layer4``.
Weights use torchvision's initialisation (Kaiming-normal, fan-out, for convolutions; BN weight 1,
bias 0; optional zero-init of the last BN of each residual branch).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Type, Union

import torch
import torch.nn as nn

from ._init import kaiming_init
from .weights import with_weights

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)  # one module, called twice
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)  # stride on the 3x3 (torchvision "v1.5")
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # one module, called three times
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision-style ResNet. ``lds_layers`` names the default LDS layers."""

    lds_layers = ("layer1", "layer2", "layer3", "layer4")
    classifier_modules = ("fc",)

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int],
                 num_classes: int = 10, in_channels: int = 3, small_input: bool = False,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got "
                             f"{num_classes} and {in_channels}")
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.Identity() if small_input
                        else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        kaiming_init(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: List[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(*, num_classes: int = 10, in_channels: int = 3, small_input: bool = False,
             zero_init_residual: bool = False, weights=None) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2])."""
    return with_weights(ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels,
                               small_input=small_input, zero_init_residual=zero_init_residual), weights)


def resnet34(*, num_classes: int = 10, in_channels: int = 3, small_input: bool = False,
             zero_init_residual: bool = False, weights=None) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3])."""
    return with_weights(ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels,
                               small_input=small_input, zero_init_residual=zero_init_residual), weights)


def resnet50(*, num_classes: int = 10, in_channels: int = 3, small_input: bool = False,
             zero_init_residual: bool = False, weights=None) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3])."""
    return with_weights(ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels,
                               small_input=small_input, zero_init_residual=zero_init_residual), weights)
