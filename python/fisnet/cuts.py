"""The C1/C2 heuristic (docs/spec.md §4.3).

Train a plain classifier (P = 0) for a few epochs; during the last epoch record, for every
training image, the total absolute relevance v = Σ_{C,H,W} |R| of each heatmap kind (mean over
the variant's maps of that kind) and each LDS layer; then with μ, σ of v over the epoch

    C1 = max(μ/5, μ − 3σ),   C2 = min(25·C1, μ + 3σ).

The result is a plain dict {layer: [[C1, C2], ...]} — "input" always, LDS layers when used;
one pair per heatmap kind (two for the Dual ISNet: ε map, z⁺ map) — which `ISNetLoss(cuts=...)`
accepts as it is, and which `save_cuts` / `load_cuts` write and read as JSON.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from .variants import ISNet

Cuts = Dict[str, List[List[float]]]


class RelevanceStats:
    """Running mean/std (Welford, float64) of per-image total relevance per (layer, kind)."""

    def __init__(self):
        self.n: Dict[str, int] = {}
        self.mean: Dict[str, torch.Tensor] = {}
        self.m2: Dict[str, torch.Tensor] = {}

    def update(self, maps: Dict[str, torch.Tensor], variant: str) -> None:
        for name, r in maps.items():
            v = r.detach().abs().flatten(2).sum(-1).double()  # (B, M)
            v = v if variant == "dual" else v.mean(1, keepdim=True)  # one kind, or ε and z⁺
            for row in v:  # Chan et al. batch merge would do too; B rows is cheap
                n = self.n.get(name, 0) + 1
                mean = self.mean.get(name, torch.zeros_like(row))
                delta = row - mean
                mean = mean + delta / n
                self.m2[name] = self.m2.get(name, torch.zeros_like(row)) + delta * (row - mean)
                self.mean[name], self.n[name] = mean, n

    def cuts(self) -> Cuts:
        out: Cuts = {}
        for name, mean in self.mean.items():
            n = self.n[name]
            std = torch.sqrt(self.m2[name] / max(n - 1, 1))
            pairs = []
            for mu, sd in zip(mean.tolist(), std.tolist()):
                c1 = max(mu / 5.0, mu - 3.0 * sd)
                c2 = min(25.0 * c1, mu + 3.0 * sd)
                if not (math.isfinite(c1) and math.isfinite(c2)) or c1 <= 0 or c2 <= c1:
                    raise ValueError(f"C1/C2 heuristic for layer {name!r} gave C1={c1}, C2={c2} (μ={mu}, σ={sd} "
                                     f"over {n} images): the heatmaps are degenerate (all zero?); check the model")
                pairs.append([c1, c2])
            out[name] = pairs
        return out


def estimate_cuts(net: ISNet, batches: Iterable, device=None) -> Cuts:
    """C1/C2 from the relevance of `net` over `batches` of (images, masks, labels) — no training."""
    stats = RelevanceStats()
    was = net.training
    net.eval()
    try:
        for batch in batches:
            x, _, y = batch[0], batch[1], batch[2]
            if device is not None:
                x, y = x.to(device), y.to(device)
            out = net(x, y, heatmaps=True)
            maps = out.heatmaps if isinstance(out.heatmaps, dict) else {"input": out.heatmaps}
            stats.update(maps, net.variant)
    finally:
        net.train(was)
    return stats.cuts()


def tune_cuts(net: ISNet, loader: Iterable, *, epochs: int = 5, lr: float = 1e-2, momentum: float = 0.9,
              clip: Optional[float] = 1.0, device=None, progress: bool = True) -> Cuts:
    """docs/spec.md §4.3: train `net.model` as a plain classifier (P = 0, SGD) for `epochs` epochs over
    `loader` (batches of images, masks, labels) and return the cuts measured during the last
    epoch (heatmaps of the training-mode model, as the ISNet will see them).  Trains in place."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model = net.model
    if device is not None:
        model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    stats = RelevanceStats()
    net.train()
    bar = None
    for epoch in range(epochs):
        last = epoch == epochs - 1
        it = loader
        if progress:
            try:
                from tqdm.auto import tqdm

                it = bar = tqdm(loader, desc=f"tune cuts {epoch + 1}/{epochs}", leave=False)
            except ImportError:  # pragma: no cover
                pass
        for batch in it:
            x, y = batch[0], batch[2]
            if device is not None:
                x, y = x.to(device), y.to(device)
            if last:
                out = net(x, y, create_graph=False)
                maps = out.heatmaps if isinstance(out.heatmaps, dict) else {"input": out.heatmaps}
                stats.update(maps, net.variant)
                logits = out.logits
            else:
                logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        if bar is not None:
            bar.close()
    return stats.cuts()


def save_cuts(cuts: Cuts, path: str) -> None:
    """Write cuts as JSON, atomically (a temporary file renamed over the target)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".cuts-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"cuts": cuts, "rule": "C1=max(mu/5, mu-3sd), C2=min(25*C1, mu+3sd)"}, f, indent=2)
    os.replace(tmp, path)


def load_cuts(path: str) -> Cuts:
    with open(path) as f:
        data = json.load(f)
    cuts = data.get("cuts", data)
    if not isinstance(cuts, dict) or "input" not in cuts:
        raise ValueError(f"{path} does not hold fisnet cuts (expected a dict with an 'input' entry)")
    return cuts
