"""Images with foreground masks from a folder tree: :class:`ImageMaskFolder`.

Layout (two choices):

* default, ``mask_root=None``: ``root/images/<class>/<name>.<ext>`` and
  ``root/masks/<class>/<name>.png``;
* ``mask_root`` given: ``root/<class>/<name>.<ext>`` and ``mask_root/<class>/<name>.png``.

``<ext>`` is one of png, jpg, jpeg, bmp, tif, tiff, webp, dcm (case-insensitive; .dcm needs the
optional ``pydicom``). A mask has the image's stem and is looked up as ``.png`` first, then with
the other extensions. Classes are the sub-folder names of the image folder, sorted (``.classes``;
label = index), unless ``classes`` is given: then labels are the positions of the folder names in
that list (a test folder lacking a class, or holding an empty one, keeps the training labels) and
a folder whose name is not in the list is an error. Every image must have a mask: a missing one
is reported at construction, naming the expected path.

Each item is ``(image, mask, label)``: image float32 (C, H, W) in [0, 1] (``channels`` 1 =
grey, 3 = RGB; default 3), mask float32 (1, H, W) in {0, 1}, label int64.

Image depth (:func:`load_image`): images are read at full depth and scaled by the range of their
pixel type: 8-bit by 255, 16-bit (PNG/TIFF mode ``I;16``) by 65535, 32-bit integer (mode ``I``)
by 65535 when every value lies in [0, 65535] (16-bit data stored as 32-bit), float (mode ``F``)
taken as is when it lies in [0, 1]; any other range is an error asking for a window. DICOM: by
the range of BitsStored (signed or not), after the rescale slope/intercept, MONOCHROME1 inverted.
``window=(lo, hi)`` replaces the type's range: ``(raw - lo) / (hi - lo)`` clipped to [0, 1], in
raw pixel units (e.g. ``(0, 4095)`` for 12-bit data in 16-bit files). A grey image with
``channels=3`` is repeated over the 3 channels; a colour image with ``channels=1`` is converted
with the ITU-R 601 luma weights (PIL's "L"). 16-bit colour PNGs are read by Pillow as 8-bit RGB.

Mask rule: a mask is read as grey (an RGB mask is converted with the ITU-R 601 luma weights,
alpha is dropped). A mask whose values are all 0 or 1 is a binary {0, 1} mask (1 = foreground);
otherwise a pixel is foreground iff its value is >= half the full range of its type (>= 128 for
8-bit masks, so {0, 255} masks work; >= 32768 for 16-bit or 32-bit integer masks with values
above 255; >= 0.5 for float masks). Grey-level masks are thus thresholded at half range.

An image and its mask must have the same size (otherwise an error names both files and sizes).
``size`` (int or (H, W)) then resizes both: the image bilinearly (antialiased, at full depth), the
mask by nearest neighbour; without ``size`` nothing is resized. ``transform`` is called as
``image, mask = transform(image, mask)`` on the tensors, so geometric augmentations can move both
together. A mask with no foreground pixel is an error (the ISNet loss normalises by foreground
relevance) unless ``allow_empty_masks=True``. Unreadable images or masks raise ``ValueError``
naming the file. :meth:`ImageMaskFolder.validate` checks a whole folder up front (readable files,
mask sizes, non-empty masks, one image size when ``size`` is None). Pillow is required
(``pip install pillow``).
"""
from __future__ import annotations

import math
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ImageMaskFolder", "IMAGE_EXTENSIONS", "load_image", "read_image_array"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


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
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be an int or (H, W) of positive ints, got {size}")
    return size


def _window(window) -> Optional[Tuple[float, float]]:
    if window is None:
        return None
    lo, hi = (float(v) for v in window)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"window must be (lo, hi) with lo < hi, got {window}")
    return lo, hi


def _is_dicom(path: str) -> bool:
    return path.lower().endswith(".dcm")


def _read_dicom(path: str) -> Tuple[np.ndarray, float, float]:
    """(raw float64 array (H, W) or (H, W, 3), lo, hi of its type's range) of a DICOM file."""
    try:
        import pydicom
    except ImportError as e:
        raise ImportError(f"reading DICOM {path} needs the optional pydicom: pip install pydicom") from e
    try:
        ds = pydicom.dcmread(path)
        arr = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception as e:
        raise ValueError(f"cannot read DICOM {path}: {e}") from e
    bits = int(getattr(ds, "BitsStored", 16) or 16)
    signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0 ** bits - 1)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    icpt = float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr, lo, hi = arr * slope + icpt, lo * slope + icpt, hi * slope + icpt
    if slope < 0:
        lo, hi = hi, lo
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = lo + hi - arr
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3):
        raise ValueError(f"DICOM {path} holds {arr.shape[0]} frames; only single-frame images are read")
    return arr, lo, hi


def read_image_array(path: str, channels: int, window=None) -> np.ndarray:
    """The image at ``path`` as float32 (H, W, channels) in [0, 1], read at full depth.

    Scaling by the pixel type's range or by ``window`` — see the module docstring."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    window = _window(window)
    if _is_dicom(path):
        arr, lo, hi = _read_dicom(path)
    else:
        Image = _pil()
        try:
            im = Image.open(path)
            im.load()
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
        if im.mode in _HIGH_DEPTH_MODES:
            arr = np.asarray(im, dtype=np.float64)
            if im.mode.startswith("I;16"):
                lo, hi = 0.0, 65535.0
            elif im.mode == "I":
                lo, hi = 0.0, 65535.0
                if window is None and arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise ValueError(f"32-bit integer image {path} has values in [{arr.min():g}, {arr.max():g}], "
                                     f"outside the 16-bit range: give a window (--window LO,HI)")
            else:  # "F"
                lo, hi = 0.0, 1.0
                if window is None and arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1):
                    raise ValueError(f"float image {path} has values in [{np.nanmin(arr):g}, {np.nanmax(arr):g}], "
                                     f"outside [0, 1]: give a window (--window LO,HI)")
        else:  # 8-bit modes: PIL's own conversion (luma weights, palette, alpha dropped)
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)  # x / 255 as before
            lo, hi = 0.0, 255.0
    if window is not None:
        lo, hi = window
    out = np.clip((arr - arr.dtype.type(lo)) / arr.dtype.type(hi - lo), 0.0, 1.0).astype(np.float32)
    if out.ndim == 2:
        out = out[:, :, None]
    if out.shape[-1] == 1 and channels == 3:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 3 and channels == 1:
        out = (0.299 * out[..., :1] + 0.587 * out[..., 1:2] + 0.114 * out[..., 2:3]).astype(np.float32)
    return out


def _resize(arr: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of a float (H, W, C) array, one PIL "F" image per channel."""
    Image = _pil()
    h, w = hw
    if arr.shape[:2] == (h, w):
        return arr
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32)).resize((w, h), Image.BILINEAR),
                        dtype=np.float32) for c in range(arr.shape[-1])]
    return np.clip(np.stack(chans, -1), 0.0, 1.0)


def load_image(path: str, channels: int = 3, size=None, window=None) -> torch.Tensor:
    """The image at ``path`` as float32 (C, H, W) in [0, 1] (full depth; optional resize to ``size``)."""
    arr = read_image_array(path, channels, window)
    hw = _size_hw(size)
    if hw is not None:
        arr = _resize(arr, hw)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def _mask_array(im) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I"):  # 32-bit or 16-bit integer masks
        arr = np.asarray(im, dtype=np.float64)
        full = 65535.0 if (mode.startswith("I;16") or (arr.size and arr.max() > 255)) else 255.0
    elif mode in ("F", "1"):
        arr, full = np.asarray(im, dtype=np.float64), 1.0
    else:
        arr, full = np.asarray(im.convert("L"), dtype=np.float64), 255.0
    if arr.size and arr.max() <= 1 and np.isin(arr, (0.0, 1.0)).all():
        return (arr == 1.0).astype(np.float32)  # a binary {0, 1} mask
    return (arr >= 0.5 * full).astype(np.float32)


class ImageMaskFolder(Dataset):
    """Classification images with foreground masks (see the module docstring)."""

    def __init__(self, root: str, mask_root: Optional[str] = None,
                 transform: Optional[Callable] = None,
                 size: Union[None, int, Sequence[int]] = None, channels: int = 3,
                 allow_empty_masks: bool = False, classes: Optional[Sequence[str]] = None,
                 window: Optional[Sequence[float]] = None) -> None:
        _pil()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if mask_root is None:
            image_root = os.path.join(root, "images")
            mask_root = os.path.join(root, "masks")
        else:
            image_root = root
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"image folder {image_root!r} does not exist "
                                    f"(expected {image_root}/<class>/<image>)")
        if not os.path.isdir(mask_root):
            raise FileNotFoundError(f"mask folder {mask_root!r} does not exist")
        found = sorted(d for d in os.listdir(image_root) if os.path.isdir(os.path.join(image_root, d)))
        if not found:
            raise FileNotFoundError(f"no class sub-folders in {image_root!r} "
                                    f"(expected {image_root}/<class>/<image>)")
        if classes is None:
            classes = found
        else:
            classes = [str(c) for c in classes]
            unknown = [d for d in found if d not in classes]
            if unknown:
                raise ValueError(f"class folder(s) {', '.join(repr(u) for u in unknown)} in {image_root} are not "
                                 f"among the training classes {classes}")
        class_to_idx = {c: i for i, c in enumerate(classes)}
        samples: List[Tuple[str, str, int]] = []
        missing: List[str] = []
        for cls in found:
            cdir = os.path.join(image_root, cls)
            for fname in sorted(os.listdir(cdir)):
                stem, ext = os.path.splitext(fname)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                mpath = self._find_mask(os.path.join(mask_root, cls), stem)
                if mpath is None:
                    missing.append(os.path.join(mask_root, cls, stem + ".png"))
                    continue
                samples.append((os.path.join(cdir, fname), mpath, class_to_idx[cls]))
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(f"missing mask for {len(missing)} image(s): expected "
                                    f"{', '.join(missing[:5])}{more}")
        if not samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                                    f"{image_root!r}")
        self.root, self.image_root, self.mask_root = root, image_root, mask_root
        self.classes = list(classes)
        self.class_to_idx = class_to_idx
        self.samples = samples
        self.targets = [s[2] for s in samples]
        self.transform = transform
        self.size = _size_hw(size)
        self.channels = channels
        self.allow_empty_masks = allow_empty_masks
        self.window = _window(window)

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

    def _read_mask(self, mpath: str) -> np.ndarray:
        if _is_dicom(mpath):
            arr, lo, hi = _read_dicom(mpath)
            arr = arr if arr.ndim == 2 else arr[..., 0]
            if arr.size and arr.max() <= 1 and np.isin(arr, (0.0, 1.0)).all():
                return (arr == 1.0).astype(np.float32)
            return (arr >= lo + 0.5 * (hi - lo)).astype(np.float32)
        return _mask_array(self._open(mpath, "mask"))

    def _check_pair(self, ipath: str, mpath: str, img_hw, mask: np.ndarray) -> None:
        if tuple(img_hw) != tuple(mask.shape[:2]):
            raise ValueError(f"mask size {mask.shape[0]}x{mask.shape[1]} (HxW) of {mpath} differs "
                             f"from image size {img_hw[0]}x{img_hw[1]} of {ipath}")

    def __getitem__(self, i: int):
        Image = _pil()
        ipath, mpath, label = self.samples[i]
        arr = read_image_array(ipath, self.channels, self.window)
        mask = self._read_mask(mpath)
        self._check_pair(ipath, mpath, arr.shape[:2], mask)
        if self.size is not None:
            h, w = self.size
            arr = _resize(arr, (h, w))
            if mask.shape != (h, w):
                mask = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize(
                    (w, h), Image.NEAREST), dtype=np.float32) / 255.0
        if not self.allow_empty_masks and not mask.any():
            raise ValueError(f"mask {mpath} has no foreground pixel (see the mask rule: values all 0/1, "
                             f"else >= half of full range); pass allow_empty_masks=True "
                             f"(fisnet train --allow-empty-masks) to accept it")
        image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
        mask_t = torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0)
        if self.transform is not None:
            image, mask_t = self.transform(image, mask_t)
        return image, mask_t, torch.tensor(label, dtype=torch.long)

    def _image_size(self, ipath: str) -> Tuple[int, int]:
        """(H, W) of an image, checking that the file is readable (PIL's verify, no full decode)."""
        if _is_dicom(ipath):
            arr, _, _ = _read_dicom(ipath)
            return arr.shape[:2]
        Image = _pil()
        try:
            with Image.open(ipath) as im:
                w, h = im.size
                im.verify()  # PNG: every chunk and its CRC, without decompressing
            if not ipath.lower().endswith(".png"):  # other formats' verify is shallow: decode
                with Image.open(ipath) as im:
                    im.load()
        except Exception as e:
            raise ValueError(f"cannot read image {ipath}: {e}") from e
        return h, w

    def validate(self, progress: Optional[bool] = None, min_bar: int = 500) -> dict:
        """Check every file before training: images readable, masks readable, of their image's size and
        (unless ``allow_empty_masks``) not empty; without ``size``, all images of one size. Raises
        ``ValueError`` naming the first bad file (and the number of further problems). Returns
        ``{"n", "image_size" (H, W) or None when they differ and ``size`` resizes, "sizes": {hw: count}}``.
        A tqdm bar is shown for folders of at least ``min_bar`` images when ``progress`` (default:
        stderr is a terminal)."""
        import sys
        if progress is None:
            progress = sys.stderr.isatty()
        it = self.samples
        if progress and len(self.samples) >= min_bar:
            try:
                from tqdm.auto import tqdm
                it = tqdm(self.samples, desc=f"checking {self.image_root}", leave=False, unit="img")
            except ImportError:  # pragma: no cover
                pass
        problems: List[str] = []
        sizes: dict = {}
        first_of: dict = {}
        for ipath, mpath, _ in it:
            try:
                hw = self._image_size(ipath)
                mask = self._read_mask(mpath)
                self._check_pair(ipath, mpath, hw, mask)
                if not self.allow_empty_masks and not mask.any():
                    raise ValueError(f"mask {mpath} has no foreground pixel (see the mask rule: values all 0/1, "
                                     f"else >= half of full range); allow_empty_masks=True (fisnet train "
                                     f"--allow-empty-masks) accepts it")
            except (ValueError, ImportError) as e:
                problems.append(str(e))
                continue
            sizes[hw] = sizes.get(hw, 0) + 1
            first_of.setdefault(hw, ipath)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s) in this folder)" if len(problems) > 1 else ""
            raise ValueError(problems[0] + more)
        if len(sizes) > 1 and self.size is None:
            common = max(sizes, key=sizes.get)
            odd = next(hw for hw in sizes if hw != common)
            raise ValueError(f"images differ in size: {first_of[odd]} is {odd[0]}x{odd[1]} (HxW) but "
                             f"{sizes[common]} image(s) such as {first_of[common]} are {common[0]}x{common[1]}; "
                             f"resize them all with --size N (size=...)")
        return {"n": len(self.samples), "image_size": next(iter(sizes)) if len(sizes) == 1 else None,
                "sizes": sizes}

    def __repr__(self) -> str:
        return (f"ImageMaskFolder(root={self.root!r}, n={len(self)}, classes={self.classes}, "
                f"size={self.size}, channels={self.channels})")
