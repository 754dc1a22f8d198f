"""Backbones written here (no torchvision): ResNet, DenseNet, VGG and a small CNN (ReLU only), and
MobileNet-V2 (ReLU6), EfficientNet-B0 (SiLU, squeeze-excitation) and ConvNeXt-Tiny (GELU,
LayerNorm) with CPU-sized ``*_micro`` configurations (docs/backbones.md).

All are in the torchvision module layout and names, and LRP-Flex traces them unchanged (its rule
table, ``fisnet.rules.DEFAULT_RULES``, covers their activations, norms and gates). Every builder takes the keyword
arguments ``num_classes=10`` and ``in_channels=3``; every model has ``model.lds_layers``, a tuple
of module names (keys of ``dict(model.named_modules())``) whose outputs are the default LDS layers.

Pretrained weights: every builder takes ``weights=PATH``, a state dict in torchvision's format and
names (``.pth``/``.pt``, read with ``torch.load(weights_only=True)``; ``.safetensors`` with the
safetensors package). A classifier of another shape (``model.classifier_modules``) keeps its fresh
initialisation, with a warning; any other mismatch is a ``ValueError`` listing the keys
(see :mod:`fisnet.models.weights`).

>>> from fisnet import models
>>> net = models.build("resnet18", num_classes=2, in_channels=1)
>>> models.default_lds_layers(net)
('layer1', 'layer2', 'layer3', 'layer4')
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch.nn as nn

from .convnext import ConvNeXt, convnext_micro, convnext_tiny
from .densenet import DenseNet, densenet121
from .efficientnet import EfficientNet, efficientnet_b0, efficientnet_micro
from .mobilenet import MobileNetV2, mobilenet_v2, mobilenet_v2_micro
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from .small import SmallCNN, small_cnn
from .vgg import VGG, vgg11, vgg11_bn, vgg16, vgg16_bn
from .vit import VisionTransformer, vit_digits, vit_digits_stem, vit_small, vit_tiny
from .weights import WeightsReport, load_weights, read_state_dict

__all__ = ["build", "names", "default_lds_layers", "ResNet", "BasicBlock", "Bottleneck",
           "DenseNet", "VGG", "SmallCNN", "resnet18", "resnet34", "resnet50", "densenet121",
           "vgg11", "vgg16", "vgg11_bn", "vgg16_bn", "small_cnn",
           "MobileNetV2", "EfficientNet", "ConvNeXt", "mobilenet_v2", "mobilenet_v2_micro",
           "efficientnet_b0", "efficientnet_micro", "convnext_tiny", "convnext_micro",
           "VisionTransformer", "vit_tiny", "vit_small", "vit_digits", "vit_digits_stem",
           "load_weights", "read_state_dict", "WeightsReport"]

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "densenet121": densenet121,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "vgg11_bn": vgg11_bn,
    "vgg16_bn": vgg16_bn,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v2_micro": mobilenet_v2_micro,
    "efficientnet_b0": efficientnet_b0,
    "efficientnet_micro": efficientnet_micro,
    "convnext_tiny": convnext_tiny,
    "convnext_micro": convnext_micro,
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_digits": vit_digits,
    "vit_digits_stem": vit_digits_stem,
}


def names() -> Tuple[str, ...]:
    """Names accepted by :func:`build`, sorted."""
    return tuple(sorted(_REGISTRY))


def build(name: str, **kwargs) -> nn.Module:
    """Build the backbone ``name`` (see :func:`names`) with the builder's keyword arguments,
    e.g. ``build("vgg11_bn", num_classes=2, in_channels=1)`` or
    ``build("resnet18", num_classes=2, weights="resnet18.pth")``."""
    key = str(name).lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(names())}")
    return _REGISTRY[key](**kwargs)


def default_lds_layers(model: nn.Module) -> Tuple[str, ...]:
    """The default LDS layer names of a built-in backbone (``model.lds_layers``).

    Raises ``ValueError`` for a model without ``lds_layers`` (name the layers yourself) and
    ``KeyError`` if a listed name is not a module of the model."""
    layers = getattr(model, "lds_layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no default LDS layers (no `lds_layers` "
                         f"attribute); pass the layer names explicitly")
    layers = tuple(layers)
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise KeyError(f"LDS layers {missing} are not modules of {type(model).__name__}")
    return layers
