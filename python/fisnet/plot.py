"""PNG figures (matplotlib, Agg backend): heatmap grids, single heatmaps, loss curves.

Heatmaps are drawn signed: the relevance summed over channels, in the 'bwr' colormap centred at 0
(red = evidence for the explained class, blue = against), each map scaled by its own max |R|.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["heatmap_grid", "save_heatmap_png", "loss_curves", "to_2d"]


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def to_2d(t) -> np.ndarray:
    """(M, C, H, W) / (C, H, W) / (H, W) relevance → (H, W): summed over maps and channels."""
    t = torch.as_tensor(t).detach().float().cpu()
    while t.dim() > 2:
        t = t.sum(0)
    return t.numpy()


def _image(img) -> np.ndarray:
    x = torch.as_tensor(img).detach().float().cpu()
    if x.dim() == 3:
        x = x.permute(1, 2, 0) if x.shape[0] in (1, 3) else x
        if x.shape[-1] == 1:
            x = x[..., 0]
    return x.clamp(0, 1).numpy()


def _show_map(ax, r2d: np.ndarray):
    v = float(np.abs(r2d).max()) or 1.0
    ax.imshow(r2d, cmap="bwr", vmin=-v, vmax=v, interpolation="nearest")


def _show_image(ax, img):
    a = _image(img)
    ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")


def heatmap_grid(images, heatmaps: Mapping[str, object], path: str, *, titles: Optional[Sequence[str]] = None,
                 masks=None, dpi: int = 110) -> str:
    """One row per image: the image (with its mask outline, if given), then one column per entry
    of ``heatmaps`` ({column title: (B, M, C, H, W) or (B, H, W) relevance}). Writes ``path``."""
    plt = _plt()
    B = len(images)
    cols = 1 + len(heatmaps)
    fig, axes = plt.subplots(B, cols, figsize=(1.9 * cols, 1.9 * B), squeeze=False)
    for i in range(B):
        ax = axes[i][0]
        _show_image(ax, images[i])
        if masks is not None:
            ax.contour(to_2d(masks[i]), levels=[0.5], colors="lime", linewidths=0.6)
        if titles is not None:
            ax.set_ylabel(titles[i], fontsize=7)
        for j, (name, maps) in enumerate(heatmaps.items()):
            _show_map(axes[i][j + 1], to_2d(maps[i]))
            if i == 0:
                axes[i][j + 1].set_title(name, fontsize=8)
        if i == 0:
            axes[i][0].set_title("image", fontsize=8)
    for row in axes:
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_heatmap_png(image, heatmap, path: str, *, title: Optional[str] = None, dpi: int = 120) -> str:
    """Image and its heatmap side by side, plus the heatmap over the image (for `fisnet explain`)."""
    plt = _plt()
    r = to_2d(heatmap)
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    _show_image(axes[0], image)
    axes[0].set_title("image", fontsize=9)
    _show_map(axes[1], r)
    axes[1].set_title("relevance (bwr, 0 = white)", fontsize=9)
    _show_image(axes[2], image)
    v = float(np.abs(r).max()) or 1.0
    axes[2].imshow(r, cmap="bwr", vmin=-v, vmax=v, alpha=0.55, interpolation="nearest")
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def loss_curves(histories: Mapping[str, List[Mapping]], path: str, dpi: int = 110) -> str:
    """Training loss parts and test accuracies per epoch for each run ({run name: history})."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, hist in histories.items():
        if not hist:
            continue
        ep = [r["epoch"] for r in hist]
        for key, style in (("train_ce", "-"), ("train_background", "--"), ("train_foreground", ":")):
            vals = [r.get(key) for r in hist]
            if all(v is not None for v in vals):
                axes[0].plot(ep, vals, style, marker="o", ms=3, label=f"{name} {key[6:]}")
        tests = hist[-1].get("test") or {}
        for tname in tests:
            accs = [100 * r["test"][tname]["accuracy"] for r in hist if r.get("test")]
            axes[1].plot(ep[-len(accs):], accs, marker="o", ms=3, label=f"{name} {tname}")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("test accuracy (%)")
    axes[1].set_ylim(0, 100)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
