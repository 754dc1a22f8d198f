"""The four ISNet variants (docs/spec.md §3): what each explains, on one shared forward pass.

`ISNet(model, variant)` wraps a ReLU classifier.  In training mode a call returns the logits
and differentiable heatmaps (B, M, C, H, W) — a dict keyed by layer with LDS — from one forward
pass; the classification gradient through the same logits is the ordinary one.  In eval mode a
call costs what the plain model costs, unless `heatmaps=True` is passed.

| variant      | M | explained per image                                              |
|--------------|---|------------------------------------------------------------------|
| "original"   | K | every logit z_k (one batched backward)                           |
| "selective"  | 1 | η = log(p_c + ε_s) − log(1 − p_c + ε_s), c = argmin by default    |
| "stochastic" | 1 | z_c, c = predicted class (or label) w.p. 1/2, else another class  |
| "dual"       | 2 | [0] LRP-ε map of Σ_k z_k, [1] LRP-z⁺ map of Σ_k z⁺_k (§3.1)       |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from .lrp import select_logits, trace

VARIANTS = ("original", "selective", "stochastic", "dual")
SELECTIVE_CLASSES = ("argmin", "argmax", "label")


@dataclass
class ISNetOutput:
    logits: torch.Tensor
    heatmaps: Optional[Union[torch.Tensor, Dict[str, torch.Tensor]]] = None
    targets: Optional[torch.Tensor] = None  # the explained class per image (selective/stochastic)
    variant: str = ""


def selective_quantity(logits: torch.Tensor, cls: torch.Tensor, eps_s: float) -> torch.Tensor:
    """η = log(p_c + ε_s) − log(1 − p_c + ε_s) per image, (B, 1)."""
    p = torch.softmax(logits, dim=1).gather(1, cls[:, None])
    return torch.log(p + eps_s) - torch.log(1.0 - p + eps_s)


def stochastic_classes(logits: torch.Tensor, labels: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per image: the label (or predicted class) with probability 1/2, else a uniformly drawn
    other class.  Vectorised; no host synchronisation."""
    B, K = logits.shape
    base = labels if labels is not None else logits.detach().argmax(1)
    base = base.to(logits.device).long()
    if K == 1:
        return base
    dev = logits.device
    other = (base + 1 + torch.randint(0, K - 1, (B,), device=dev, generator=generator)) % K
    keep = torch.rand(B, device=dev, generator=generator) < 0.5
    return torch.where(keep, base, other)


class ISNet(nn.Module):
    """An ISNet around `model` (docs/spec.md §3).  See the module docstring for the variants.

    Args: variant; eps (LRP-ε); zb and bounds (Zb first-layer rule); selective_eps and
    selective_class ("argmin" default, "argmax", "label"); lds_layers (module names of the
    model, or "default" for the built-in backbones' `lds_layers`); zb_layer (name of the first
    layer when automatic detection fails); generator (for the stochastic draws); dual_batched
    (Dual: both maps from one backward over two rule slots — the default on CUDA — or from two
    backward passes — the default on CPU, where it measured faster); rules (overrides of the rule
    table, {op kind: rule name}: fisnet.rules.DEFAULT_RULES).
    """

    def __init__(self, model: nn.Module, variant: str = "selective", *, eps: float = 1e-2, zb: bool = True,
                 bounds=(0.0, 1.0), selective_eps: float = 0.01, selective_class: str = "argmin",
                 lds_layers: Optional[Union[str, Sequence[str]]] = None, zb_layer: Optional[str] = None,
                 generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                 dual_batched: Optional[bool] = None, rules=None):
        super().__init__()
        from .rules import resolve_rules
        resolve_rules(rules)  # a clear error now rather than at the first training step
        self.rules = dict(rules) if rules else None
        if variant not in VARIANTS:
            raise ValueError(f"unknown ISNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if selective_class not in SELECTIVE_CLASSES:
            raise ValueError(f"selective_class must be one of {SELECTIVE_CLASSES}, got {selective_class!r}")
        if lds_layers == "default":
            lds_layers = getattr(model, "lds_layers", None)
            if not lds_layers:
                raise ValueError("lds_layers='default' needs a built-in fisnet.models backbone (with .lds_layers); "
                                 "name the layers instead")
        self.model = model
        self.variant = variant
        self.eps = float(eps)
        self.zb = zb
        self.bounds = bounds
        self.selective_eps = float(selective_eps)
        self.selective_class = selective_class
        self.lds_layers = list(lds_layers) if lds_layers else None
        self.zb_layer = zb_layer
        self.generator = generator
        self.backend = backend
        self.dual_batched = dual_batched

    @property
    def maps_per_image(self) -> Optional[int]:
        return {"selective": 1, "stochastic": 1, "dual": 2}.get(self.variant)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None,
                heatmaps: Optional[bool] = None, create_graph: Optional[bool] = None) -> ISNetOutput:
        """`heatmaps`: compute them (default: in training mode only).  `create_graph`: keep them
        differentiable in the weights (default: in training mode with grad enabled)."""
        want = self.training if heatmaps is None else heatmaps
        if not want:
            return ISNetOutput(self.model(x), variant=self.variant)
        if create_graph is None:
            create_graph = self.training and torch.is_grad_enabled()
        with torch.enable_grad():
            t = trace(self.model, x, eps=self.eps, zb=self.zb, bounds=self.bounds, layers=self.lds_layers,
                      zb_layer=self.zb_layer, backend=self.backend, zplus=self.variant == "dual", rules=self.rules)
            logits = t.logits
            if logits.dim() != 2:
                raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; ISNet expects (B, K)")
            K = logits.shape[1]
            if labels is not None and labels.dim() == 1 and labels.numel() and not labels.is_floating_point():
                if bool(((labels < 0) | (labels >= K)).any()):
                    raise IndexError(f"labels hold classes outside 0..{K - 1} (the model has {K} classes)")
            targets = None
            if self.variant == "original":
                maps = t.relevance(logits, create_graph=create_graph, retain_graph=True)
            elif self.variant == "selective":
                targets = self._selective_class(logits, labels)
                q = selective_quantity(logits, targets, self.selective_eps)
                maps = t.relevance(q, create_graph=create_graph, retain_graph=True)
            elif self.variant == "stochastic":
                lab = labels if (labels is not None and labels.dim() == 1 and not labels.is_floating_point()) else None
                targets = stochastic_classes(logits, lab, self.generator)
                maps = t.relevance(select_logits(logits, targets), create_graph=create_graph, retain_graph=True)
            else:  # dual: ε map of Σ_k z_k and z⁺ map from one forward
                # one two-slot pass: the default on CUDA, except under autocast, where PyTorch's
                # BatchNorm backward fails under vmap with mixed dtypes (measured on CPU, bf16)
                batched = self.dual_batched if self.dual_batched is not None else (
                    x.device.type == "cuda" and not torch.is_autocast_enabled(x.device.type))
                if batched:  # one backward over two rule slots
                    maps = t.relevance_dual(create_graph=create_graph)
                else:  # two backward passes (faster on CPU, measured: docs/status.md)
                    eps_maps = t.relevance(logits.sum(1, keepdim=True), create_graph=create_graph, retain_graph=True)
                    zp_maps = t.relevance_zplus(create_graph=create_graph, retain_graph=True)
                    maps = {k: torch.cat([eps_maps[k], zp_maps[k]], dim=1) for k in eps_maps}
        if not create_graph:
            maps = {k: v.detach() for k, v in maps.items()}
            logits = logits.detach() if not torch.is_grad_enabled() else logits
        hm = maps if self.lds_layers else maps["input"]
        return ISNetOutput(logits, hm, targets, self.variant)

    def _selective_class(self, logits, labels):
        if self.selective_class == "argmin":
            return logits.detach().argmin(1)
        if self.selective_class == "argmax":
            return logits.detach().argmax(1)
        if labels is None:
            raise ValueError("selective_class='label' needs labels: call net(x, labels)")
        return labels.to(logits.device).long()

    def extra_repr(self):
        return f"variant={self.variant!r}, eps={self.eps}, zb={self.zb}"
