"""Images with foreground masks from a folder tree: :class:`ImageMaskFolder`.

Layout (two choices):

* default, ``mask_root=None``: ``root/images/<class>/<name>.<ext>`` and
  ``root/masks/<class>/<name>.png``;
* ``mask_root`` given: ``root/<class>/<name>.<ext>`` and ``mask_root/<class>/<name>.png``.

``<ext>`` is one of png, jpg, jpeg, bmp, tif, tiff, webp (case-insensitive). A mask has the
image's stem and is looked up as ``.png`` first, then with the other extensions. Classes are the
sub-folder names of the image folder, sorted (``.classes``; label = index). Every image must have
a mask: a missing one is reported at construction, naming the expected path.

Each item is ``(image, mask, label)``: image float32 (C, H, W) in [0, 1] (``channels`` 1 =
grey, 3 = RGB; default 3), mask float32 (1, H, W) in {0, 1}, label int64. The mask is read as
grey (an RGB mask is converted with the ITU-R 601 luma weights, alpha is dropped) and a pixel is
foreground iff its value is >= half the full range (>= 128 for 8-bit masks; >= 32768 for
16-bit or 32-bit integer masks with values above 255; >= 0.5 for float masks); 1 = foreground. An image and its mask must have the same size
(otherwise an error names both files and sizes). ``size`` (int or (H, W)) then resizes both:
the image bilinearly (antialiased), the mask by nearest neighbour. ``transform`` is called as
``image, mask = transform(image, mask)`` on the tensors, so geometric augmentations can move both
together. A mask with no foreground pixel is an error (the ISNet loss normalises by foreground
relevance) unless ``allow_empty_masks=True``. Unreadable images or masks raise ``ValueError``
naming the file. Pillow is required (``pip install pillow``).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ImageMaskFolder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ImageMaskFolder needs Pillow: pip install pillow") from e
    return Image


def _size_hw(size) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be an int or (H, W) of positive ints, got {size}")
    return size


class ImageMaskFolder(Dataset):
    """Classification images with foreground masks (see the module docstring)."""

    def __init__(self, root: str, mask_root: Optional[str] = None,
                 transform: Optional[Callable] = None,
                 size: Union[None, int, Sequence[int]] = None, channels: int = 3,
                 allow_empty_masks: bool = False) -> None:
        _pil()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if mask_root is None:
            image_root = os.path.join(root, "images")
            mask_root = os.path.join(root, "masks")
        else:
            image_root = root
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"image folder {image_root!r} does not exist")
        if not os.path.isdir(mask_root):
            raise FileNotFoundError(f"mask folder {mask_root!r} does not exist")
        classes = sorted(d for d in os.listdir(image_root)
                         if os.path.isdir(os.path.join(image_root, d)))
        if not classes:
            raise FileNotFoundError(f"no class sub-folders in {image_root!r} "
                                    f"(expected {image_root}/<class>/<image>)")
        samples: List[Tuple[str, str, int]] = []
        missing: List[str] = []
        for idx, cls in enumerate(classes):
            cdir = os.path.join(image_root, cls)
            for fname in sorted(os.listdir(cdir)):
                stem, ext = os.path.splitext(fname)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                mpath = self._find_mask(os.path.join(mask_root, cls), stem)
                if mpath is None:
                    missing.append(os.path.join(mask_root, cls, stem + ".png"))
                    continue
                samples.append((os.path.join(cdir, fname), mpath, idx))
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(f"missing mask for {len(missing)} image(s): expected "
                                    f"{', '.join(missing[:5])}{more}")
        if not samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                                    f"{image_root!r}")
        self.root, self.image_root, self.mask_root = root, image_root, mask_root
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = samples
        self.targets = [s[2] for s in samples]
        self.transform = transform
        self.size = _size_hw(size)
        self.channels = channels
        self.allow_empty_masks = allow_empty_masks

    @staticmethod
    def _find_mask(folder: str, stem: str) -> Optional[str]:
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                p = os.path.join(folder, stem + e)
                if os.path.isfile(p):
                    return p
        return None

    def __len__(self) -> int:
        return len(self.samples)

    def _open(self, path: str, kind: str):
        Image = _pil()
        try:
            im = Image.open(path)
            im.load()
        except Exception as e:
            raise ValueError(f"cannot read {kind} {path}: {e}") from e
        return im

    def _mask_array(self, im, path: str) -> np.ndarray:
        mode = im.mode
        if mode.startswith("I"):  # 32-bit or 16-bit integer masks
            arr = np.asarray(im, dtype=np.float64)
            full = 65535.0 if (mode.startswith("I;16") or arr.max() > 255) else 255.0
        elif mode in ("F", "1"):
            arr, full = np.asarray(im, dtype=np.float64), 1.0
        else:
            arr, full = np.asarray(im.convert("L"), dtype=np.float64), 255.0
        return (arr >= 0.5 * full).astype(np.float32)

    def __getitem__(self, i: int):
        Image = _pil()
        ipath, mpath, label = self.samples[i]
        im = self._open(ipath, "image")
        mk = self._open(mpath, "mask")
        if im.size != mk.size:
            raise ValueError(f"mask size {mk.size[1]}x{mk.size[0]} (HxW) of {mpath} differs "
                             f"from image size {im.size[1]}x{im.size[0]} of {ipath}")
        im = im.convert("L" if self.channels == 1 else "RGB")
        mask = self._mask_array(mk, mpath)
        if self.size is not None:
            h, w = self.size
            im = im.resize((w, h), Image.BILINEAR)
            mask = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize(
                (w, h), Image.NEAREST), dtype=np.float32) / 255.0
        if not self.allow_empty_masks and not mask.any():
            raise ValueError(f"mask {mpath} has no foreground pixel (>= half of full range); "
                             f"pass allow_empty_masks=True to accept it")
        arr = np.asarray(im, dtype=np.float32) / 255.0
        image = torch.from_numpy(arr).unsqueeze(0) if arr.ndim == 2 else \
            torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        mask_t = torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0)
        if self.transform is not None:
            image, mask_t = self.transform(image, mask_t)
        return image, mask_t, torch.tensor(label, dtype=torch.long)

    def __repr__(self) -> str:
        return (f"ImageMaskFolder(root={self.root!r}, n={len(self)}, classes={self.classes}, "
                f"size={self.size}, channels={self.channels})")
