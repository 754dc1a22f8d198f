"""Full MNIST from the standard IDX files in a user-given folder (nothing is downloaded).

``load_mnist_idx(folder, split)`` looks in ``folder`` for

* ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (split "train"),
* ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (split "test"),

each either raw or gzip-compressed with a ``.gz`` suffix; the dotted variant
(``train-images.idx3-ubyte``) found in some redistributions is accepted too. Errors name the
missing file (and every name tried), a bad magic number, or a truncated file.

``make_biased_mnist(folder, ...)`` builds the biased-digits benchmark (``fisnet.data.digits``,
same canvas, masks and markers, same code) on full MNIST: training digits from the train files,
the three test sets from the t10k files.
"""
from __future__ import annotations

import gzip
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .digits import BiasConfig, MaskedImageDataset, make_biased_splits

__all__ = ["load_mnist_idx", "read_idx", "write_idx", "make_biased_mnist", "IDX_FILES"]

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _candidates(base: str):
    dotted = base.replace("-idx", ".idx")
    names = [base, base + ".gz"]
    if dotted != base:
        names += [dotted, dotted + ".gz"]
    return names


def _find(folder: str, base: str) -> str:
    tried = _candidates(base)
    for name in tried:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"MNIST file {base!r} not found in {folder!r} "
                            f"(tried: {', '.join(tried)})")


def read_idx(path: str, expect_ndim: Optional[int] = None) -> np.ndarray:
    """Read one IDX file (raw or .gz). Magic: two zero bytes, a type code (0x08 = ubyte),
    the number of dimensions; then big-endian uint32 sizes, then the data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4:
        raise ValueError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _DTYPES or ndim == 0 or \
            (expect_ndim is not None and ndim != expect_ndim):
        want = (f"0x0000080{expect_ndim}" if expect_ndim is not None else "0x000008NN")
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08X} (expected {want}); "
                         f"not an IDX file of the expected kind")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[code])
    count = int(np.prod(dims)) if dims else 0
    need = header + count * dtype.itemsize
    if len(data) != need:
        raise ValueError(f"{path}: IDX size mismatch: header says {dims} "
                         f"({need} bytes in all) but the file has {len(data)} bytes")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed when ``path`` ends in .gz).
    Used by tests; handy for making small MNIST-format files."""
    arr = np.ascontiguousarray(np.asarray(array, dtype=np.uint8))
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(head + arr.tobytes())


def load_mnist_idx(folder: str, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST images and labels of ``split`` ("train" or "test"; "t10k" is an alias of "test")
    from the IDX files in ``folder``: (uint8 images (N, 28, 28), int64 labels (N,))."""
    key = {"t10k": "test"}.get(split, split)
    if key not in IDX_FILES:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"MNIST folder {folder!r} does not exist")
    img_name, lab_name = IDX_FILES[key]
    img_path, lab_path = _find(folder, img_name), _find(folder, lab_name)
    images = read_idx(img_path, expect_ndim=3)
    labels = read_idx(lab_path, expect_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"{img_path} / {lab_path}: expected unsigned-byte IDX data")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} has {images.shape[0]} images but {lab_path} has "
                         f"{labels.shape[0]} labels")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def make_biased_mnist(folder: str, seed: int = 0, *, n_train: Optional[int] = None,
                      n_val: int = 0, n_test: Optional[int] = None,
                      **config_kw) -> Dict[str, MaskedImageDataset]:
    """The biased-digits benchmark on full MNIST (see ``fisnet.data.digits``).

    ``n_train`` (None = all 60000 minus ``n_val``) training digits and ``n_val`` validation
    digits are drawn, disjoint, from the train files with ``seed``; ``n_test`` (None = all
    10000) test digits from the t10k files, shared by "biased", "unbiased" and "deceiving".
    Keyword arguments of :class:`~fisnet.data.digits.BiasConfig` set canvas and marker.
    Memory: every split is held as float32 tensors (about 10 KB per 36x36 image and mask)."""
    cfg = BiasConfig(**config_kw)
    tr_x, tr_y = load_mnist_idx(folder, "train")
    te_x, te_y = load_mnist_idx(folder, "test")
    g = torch.Generator().manual_seed(int(seed))
    n_tr_all = tr_x.shape[0]
    n_train_ = n_tr_all - n_val if n_train is None else n_train
    if n_train_ < 1 or n_val < 0 or n_train_ + n_val > n_tr_all:
        raise ValueError(f"n_train={n_train}, n_val={n_val} do not fit in the {n_tr_all} "
                         f"training images")
    perm = torch.randperm(n_tr_all, generator=g)
    tr, va = perm[:n_train_], perm[n_train_:n_train_ + n_val]
    n_test_ = te_x.shape[0] if n_test is None else n_test
    if not 1 <= n_test_ <= te_x.shape[0]:
        raise ValueError(f"n_test={n_test} must be in [1, {te_x.shape[0]}]")
    te = torch.randperm(te_x.shape[0], generator=g)[:n_test_] if n_test is not None \
        else torch.arange(te_x.shape[0])
    return make_biased_splits(tr_x[tr], tr_y[tr], te_x[te], te_y[te], seed=seed,
                              val_images=tr_x[va] if n_val else None,
                              val_labels=tr_y[va] if n_val else None, config=cfg)
