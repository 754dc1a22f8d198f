"""ConvNeXt-Tiny, written here in the torchvision layout (no torchvision needed).

Structure and names as ``torchvision.models.convnext``: ``features`` is an ``nn.Sequential`` of a
stem ``Conv2dNormActivation`` (``Conv2d(k=4, s=4)`` with bias, then ``LayerNorm2d``; no
activation), then per stage an ``nn.Sequential`` of ``CNBlock`` and, between stages, a
downsampling ``Sequential(LayerNorm2d, Conv2d(k=2, s=2))``; then ``avgpool``
(``AdaptiveAvgPool2d(1)``) and ``classifier = Sequential(LayerNorm2d, Flatten(1), Linear)``.
A ``CNBlock`` has ``.block = Sequential(depthwise 7x7 conv, Permute(0, 2, 3, 1), LayerNorm,
Linear(d, 4d), GELU, Linear(4d, d), Permute(0, 3, 1, 2))``, a ``layer_scale`` parameter (d, 1, 1)
and ``stochastic_depth``; its output is ``stochastic_depth(layer_scale * block(x)) + x``. Keys such
as ``features.1.0.layer_scale``, ``features.1.0.block.3.weight`` and ``classifier.2.weight`` are
torchvision's, so torchvision state dicts load (``weights=PATH``). LayerNorm eps 1e-6.
``LayerNorm2d`` permutes to channels-last, calls ``F.layer_norm`` and permutes back (the "norm"
rule of the trace holds its σ constant in the heatmap backward).

Additions to torchvision's signature: ``in_channels``; ``small_input=True`` (a 2x2/stride-2 stem
instead of 4x4/stride-4: ConvNeXt-Tiny then works down to 16x16 inputs; with the 4x4 stem the
input side must be at least 32 so that the last downsampling sees a 2x2 map).

``convnext_micro``: the same blocks in a configuration that trains on the CPU on 36x36 digits
(2x2/stride-2 stem; three stages of widths 24, 48, 96 and depths 1, 1, 2: 36 -> 18 -> 9 -> 4;
layer scale 1e-6 and stochastic depth 0 by default). Not called ``convnext_small``: torchvision's
``convnext_small`` is a larger network (depths 3, 3, 27, 3).

Default LDS layers (``model.lds_layers``): the output of each stage of CNBlocks. For
``convnext_tiny``: ``features.1, features.3, features.5, features.7``.
Initialisation as torchvision: convs and linear layers truncated-normal (std 0.02), zero biases;
LayerNorm 1/0.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ._layers import Conv2dNormActivation, LayerNorm2d, Permute, StochasticDepth
from .weights import with_weights

__all__ = ["ConvNeXt", "CNBlock", "CNBlockConfig", "LayerNorm2d", "convnext_tiny", "convnext_micro"]


@dataclass
class CNBlockConfig:
    """One stage: width, width after the downsampling that follows it (None: last stage), depth."""

    input_channels: int
    out_channels: Optional[int]
    num_layers: int


class CNBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 → LayerNorm → Linear(4d) → GELU → Linear(d), scaled, residual."""

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.layer_scale * self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


class ConvNeXt(nn.Module):
    """torchvision-style ConvNeXt. ``lds_layers`` names the default LDS layers."""

    classifier_modules = ("classifier",)

    def __init__(self, block_setting: Sequence[CNBlockConfig], stochastic_depth_prob: float = 0.0,
                 layer_scale: float = 1e-6, num_classes: int = 1000, in_channels: int = 3,
                 small_input: bool = False) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")
        if not block_setting or not all(isinstance(c, CNBlockConfig) for c in block_setting):
            raise ValueError("block_setting should be a non-empty list of CNBlockConfig")
        norm_layer = partial(LayerNorm2d, eps=1e-6)
        patch = 2 if small_input else 4
        first = block_setting[0].input_channels
        layers: List[nn.Module] = [Conv2dNormActivation(in_channels, first, kernel_size=patch, stride=patch,
                                                        padding=0, norm_layer=norm_layer, activation_layer=None,
                                                        bias=True)]
        total = sum(c.num_layers for c in block_setting)
        block_id = 0
        lds = []
        for cnf in block_setting:
            stage: List[nn.Module] = []
            for _ in range(cnf.num_layers):
                sd = stochastic_depth_prob * block_id / (total - 1.0) if total > 1 else 0.0
                stage.append(CNBlock(cnf.input_channels, layer_scale, sd))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            lds.append(f"features.{len(layers) - 1}")
            if cnf.out_channels is not None:
                layers.append(nn.Sequential(norm_layer(cnf.input_channels),
                                            nn.Conv2d(cnf.input_channels, cnf.out_channels, kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = block_setting[-1]
        last_out = last.out_channels if last.out_channels is not None else last.input_channels
        self.classifier = nn.Sequential(norm_layer(last_out), nn.Flatten(1), nn.Linear(last_out, num_classes))
        self.lds_layers = tuple(lds)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(x)


def convnext_tiny(*, num_classes: int = 10, in_channels: int = 3, stochastic_depth_prob: float = 0.1,
                  layer_scale: float = 1e-6, small_input: bool = False, weights=None) -> ConvNeXt:
    """ConvNeXt-Tiny (torchvision's configuration: widths 96-768, depths 3, 3, 9, 3)."""
    setting = [CNBlockConfig(96, 192, 3), CNBlockConfig(192, 384, 3), CNBlockConfig(384, 768, 9),
               CNBlockConfig(768, None, 3)]
    return with_weights(ConvNeXt(setting, stochastic_depth_prob, layer_scale, num_classes=num_classes,
                                 in_channels=in_channels, small_input=small_input), weights)


def convnext_micro(*, num_classes: int = 10, in_channels: int = 3, stochastic_depth_prob: float = 0.0,
                   layer_scale: float = 1e-6, small_input: bool = True, weights=None) -> ConvNeXt:
    """A small ConvNeXt for 28-64 px images on the CPU (see the module docstring)."""
    setting = [CNBlockConfig(24, 48, 1), CNBlockConfig(48, 96, 1), CNBlockConfig(96, None, 2)]
    return with_weights(ConvNeXt(setting, stochastic_depth_prob, layer_scale, num_classes=num_classes,
                                 in_channels=in_channels, small_input=small_input), weights)
