"""Weight initialisation shared by the backbones (torchvision's scheme)."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn


def kaiming_init(model: nn.Module, linear_std: Optional[float] = None) -> None:
    """Convs: Kaiming normal (fan_out, ReLU), zero bias; BatchNorm/GroupNorm: weight 1, bias 0;
    Linear layers: N(0, linear_std²), zero bias, when `linear_std` is given (else left as built).
    Modules are visited in `model.modules()` order, so a seeded build is reproducible."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.constant_(m.bias, 0)
