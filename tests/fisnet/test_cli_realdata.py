"""Issue 13: real image+mask folders and faults, through the API and the real `fisnet` command.

Every CLI test runs `python -m fisnet` in a subprocess on tiny folders under tmp_path (8x8 grey
PNGs, a few images, 1-2 epochs, width-4 CNN without BatchNorm).
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

SMALL = ["--channels", "1", "--width", "4", "--no-batchnorm", "--batch-size", "4", "--threads", "1"]


def fisnet(*args, cwd=None, timeout=240, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", FISNET_MALLOC_TUNING="0")
    env.pop("FISNET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fisnet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, **kw)


def no_traceback(r):
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr  # one clear line
    return lines[0]


def make_folder(root, classes=("a", "b"), n=3, size=8, fg=255, seed=0, image_dtype=np.uint8):
    """root/images/<class>/<i>.png and root/masks/<class>/<i>.png; class c has brightness ~ c."""
    rng = np.random.RandomState(seed)
    for k, cls in enumerate(classes):
        os.makedirs(root / "images" / cls, exist_ok=True)
        os.makedirs(root / "masks" / cls, exist_ok=True)
        for i in range(n):
            hi = np.iinfo(image_dtype).max
            img = (rng.rand(size, size) * hi * 0.2 + hi * 0.7 * k / max(len(classes) - 1, 1)).astype(image_dtype)
            Image.fromarray(img).save(root / "images" / cls / f"{i}.png")
            m = np.zeros((size, size), "uint8")
            m[2:6, 2:6] = fg
            Image.fromarray(m).save(root / "masks" / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 1-epoch run (classes a, b, c) shared by the tests that only read it."""
    base = tmp_path_factory.mktemp("trained")
    ds = make_folder(base / "ds", classes=("a", "b", "c"))
    test = make_folder(base / "test", classes=("b", "c"), seed=1)  # class "a" missing
    run = base / "run"
    r = fisnet("train", "--folder", ds, "--test-folder", test, *SMALL, "--epochs", "1", "--P", "0",
               "--lr", "0.05", "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr
    return {"ds": ds, "test": test, "run": run, "stdout": r.stdout, "stderr": r.stderr}


# ----------------------------------------------------------------------------- 1. 16-bit images

def _ramp16(h=16, w=16):
    return np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_images_full_depth(tmp_path, ext):
    from fisnet.data import ImageMaskFolder
    ramp = _ramp16()
    os.makedirs(tmp_path / "images" / "a")
    os.makedirs(tmp_path / "masks" / "a")
    Image.fromarray(ramp).save(tmp_path / "images" / "a" / f"x.{ext}")
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 4:8] = 255
    Image.fromarray(m).save(tmp_path / "masks" / "a" / "x.png")
    for channels in (1, 3):
        x, _, _ = ImageMaskFolder(str(tmp_path), channels=channels)[0]
        assert x.shape == (channels, 16, 16)
        for c in range(channels):
            np.testing.assert_allclose(x[c].numpy(), ramp / 65535.0, atol=1e-6)
        assert float((x == 1.0).float().mean()) < 0.01  # was 99.6 % saturated
    # a window in raw units: [0, 32767.5] -> [0, 1], clipped above
    x, _, _ = ImageMaskFolder(str(tmp_path), channels=1, window=(0, 32767.5))[0]
    np.testing.assert_allclose(x[0].numpy(), np.clip(ramp / 32767.5, 0, 1), atol=1e-6)
    # explain's loader reads the same way
    from fisnet.cli import load_image
    xe = load_image(str(tmp_path / "images" / "a" / f"x.{ext}"), 1)
    np.testing.assert_allclose(xe[0, 0].numpy(), ramp / 65535.0, atol=1e-6)
    # resized at full depth
    xr, mr, _ = ImageMaskFolder(str(tmp_path), channels=1, size=8)[0]
    assert xr.shape == (1, 8, 8) and len(torch.unique(xr)) > 32 and mr.shape == (1, 8, 8)


def test_float_image_out_of_range_needs_window(tmp_path):
    from fisnet.data import ImageMaskFolder
    os.makedirs(tmp_path / "images" / "a")
    os.makedirs(tmp_path / "masks" / "a")
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(tmp_path / "images" / "a" / "x.tif")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "masks" / "a" / "x.png")
    with pytest.raises(ValueError, match=r"x\.tif.*window"):
        ImageMaskFolder(str(tmp_path))[0]
    x, _, _ = ImageMaskFolder(str(tmp_path), window=(0, 600))[0]
    assert torch.allclose(x, torch.full_like(x, 0.5))


def test_int32_image_16bit_values_and_out_of_range(tmp_path):
    from fisnet.data import ImageMaskFolder
    os.makedirs(tmp_path / "images" / "a")
    os.makedirs(tmp_path / "masks" / "a")
    ramp = _ramp16().astype(np.int32)
    Image.fromarray(ramp).save(tmp_path / "images" / "a" / "x.tif")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "masks" / "a" / "x.png")
    assert Image.open(tmp_path / "images" / "a" / "x.tif").mode == "I"
    x, _, _ = ImageMaskFolder(str(tmp_path), channels=1)[0]
    np.testing.assert_allclose(x[0].numpy(), ramp / 65535.0, atol=1e-6)
    Image.fromarray(ramp * 4).save(tmp_path / "images" / "a" / "x.tif")
    with pytest.raises(ValueError, match=r"x\.tif.*window"):
        ImageMaskFolder(str(tmp_path), channels=1)[0]


def test_dicom_without_pydicom_is_a_clear_error(tmp_path):
    from fisnet.data import ImageMaskFolder
    if __import__("importlib").util.find_spec("pydicom") is not None:
        pytest.skip("pydicom is installed")
    os.makedirs(tmp_path / "images" / "a")
    os.makedirs(tmp_path / "masks" / "a")
    (tmp_path / "images" / "a" / "x.dcm").write_bytes(b"\0" * 132)
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "masks" / "a" / "x.png")
    with pytest.raises(ImportError, match=r"pydicom.*x\.dcm|x\.dcm.*pydicom"):
        ImageMaskFolder(str(tmp_path))[0]


# ----------------------------------------------------------------------------- 2. class names

def test_test_folder_classes_map_by_name(tmp_path):
    from fisnet.data import ImageMaskFolder
    train = ImageMaskFolder(str(make_folder(tmp_path / "tr", classes=("a", "b", "c"))))
    test = ImageMaskFolder(str(make_folder(tmp_path / "te", classes=("b", "c"))), classes=train.classes)
    assert test.classes == ["a", "b", "c"]
    assert sorted(set(test.targets)) == [1, 2]
    make_folder(tmp_path / "te", classes=("zebra",))
    with pytest.raises(ValueError, match="zebra"):
        ImageMaskFolder(str(tmp_path / "te"), classes=train.classes)


def test_cli_class_names_saved_and_test_folder_mapped(trained):
    from fisnet.data import ImageMaskFolder
    from fisnet.metrics import evaluate
    from fisnet.train import load_checkpoint, model_from_checkpoint
    ck = load_checkpoint(str(trained["run"]))
    assert ck["config"]["classes"] == ["a", "b", "c"]
    assert json.loads((trained["run"] / "config.json").read_text())["config"]["classes"] == ["a", "b", "c"]
    model = model_from_checkpoint(ck).eval()
    test = ImageMaskFolder(str(trained["test"]), classes=["a", "b", "c"], channels=1)
    logged = json.loads((trained["run"] / "log.json").read_text())[-1]["test"]["test"]["accuracy"]
    assert logged == pytest.approx(evaluate(model, test))


def test_cli_unknown_test_class_is_an_error(tmp_path, trained):
    bad = make_folder(tmp_path / "bad", classes=("a", "zebra"))
    r = fisnet("train", "--folder", trained["ds"], "--test-folder", bad, *SMALL, "--epochs", "1",
               "--P", "0", "--out", tmp_path / "run", "--no-progress")
    assert r.returncode != 0
    assert "zebra" in no_traceback(r)


def test_cli_explain_prints_class_name(tmp_path, trained):
    pytest.importorskip("matplotlib")
    img = trained["ds"] / "images" / "c" / "0.png"
    r = fisnet("explain", img, "--checkpoint", trained["run"], "--out", tmp_path / "h.png", "--target", "b")
    assert r.returncode == 0, r.stderr
    assert "explained class 1 (b)" in r.stdout and "predicted class" in r.stdout


# ----------------------------------------------------------------------------- 3. safe checkpoints

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path):
    marker = tmp_path / "PWNED"
    zip_ck = tmp_path / "evil_zip" / "checkpoint.pt"
    os.makedirs(zip_ck.parent)
    torch.save({"model": {}, "config": {"model_spec": {"name": "small_cnn"}}, "x": _Evil(marker)}, zip_ck)
    raw_ck = tmp_path / "evil_raw" / "checkpoint.pt"
    os.makedirs(raw_ck.parent)
    with open(raw_ck, "wb") as f:
        pickle.dump({"x": _Evil(marker)}, f)
    return marker, zip_ck, raw_ck


def test_malicious_checkpoint_refused_api(tmp_path):
    from fisnet.train import load_checkpoint
    marker, zip_ck, raw_ck = _evil_files(tmp_path)
    for ck in (zip_ck, raw_ck):
        with pytest.raises(ValueError, match="refus") as e:
            load_checkpoint(str(ck))
        assert str(ck) in str(e.value)
        assert not marker.exists()


def test_malicious_checkpoint_refused_cli(tmp_path, trained):
    marker, zip_ck, raw_ck = _evil_files(tmp_path)
    img = trained["ds"] / "images" / "a" / "0.png"
    for ck in (zip_ck, raw_ck):
        r = fisnet("explain", img, "--checkpoint", ck, "--out", tmp_path / "h.png")
        assert r.returncode != 0 and not marker.exists()
        assert "refus" in no_traceback(r)
        r = fisnet("train", "--out", ck.parent, "--resume", "--no-progress")
        assert r.returncode != 0 and not marker.exists()
        assert str(ck) in no_traceback(r)


def test_saved_checkpoint_loads_with_weights_only(trained):
    ck = torch.load(trained["run"] / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and "rng" in ck


# ----------------------------------------------------------------------------- 4. existing run folder

def test_cli_refuses_to_overwrite_a_run(tmp_path):
    ds = make_folder(tmp_path / "ds")
    run = tmp_path / "run"
    args = ["train", "--folder", ds, *SMALL, "--P", "0", "--out", run, "--no-progress"]
    assert fisnet(*args, "--epochs", "2").returncode == 0
    before = (run / "checkpoint.pt").read_bytes()
    r = fisnet(*args, "--epochs", "1")
    assert r.returncode != 0
    line = no_traceback(r)
    assert "--resume" in line and "--out" in line
    assert (run / "checkpoint.pt").read_bytes() == before
    assert len(json.loads((run / "log.json").read_text())) == 2


# ----------------------------------------------------------------------------- 5. divergence

def test_cli_diverging_plain_run_fails(tmp_path):
    ds = make_folder(tmp_path / "ds")
    run = tmp_path / "run"
    r = fisnet("train", "--folder", ds, *SMALL, "--P", "0", "--lr", "1e30", "--clip", "0", "--epochs", "2",
               "--out", run, "--no-progress")
    assert r.returncode != 0
    assert "diverged" in no_traceback(r)
    if (run / "checkpoint.pt").exists():
        ck = torch.load(run / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.parametrize("clip,lr", [(None, 1e30), (1.0, 1e6)])
def test_divergence_keeps_last_finite_checkpoint(tmp_path, monkeypatch, clip, lr):
    from fisnet import models
    from fisnet.data import MaskedImageDataset
    from fisnet.train import Trainer, TrainConfig, TrainingDivergedError
    g = torch.Generator().manual_seed(0)
    ds = MaskedImageDataset(torch.rand(32, 1, 8, 8, generator=g), torch.ones(32, 1, 8, 8),
                            torch.randint(0, 3, (32,), generator=g))
    torch.manual_seed(0)
    model = models.small_cnn(num_classes=3, in_channels=1, width=4, batchnorm=False)
    cfg = TrainConfig(epochs=30, P=0.0, clip=clip, batch_size=8, progress=False, verbose=False)
    tr = Trainer(model, ds, None, str(tmp_path), cfg)
    monkeypatch.setattr(Trainer, "lr_at", lambda self, e: 1e-2 if e == 0 else lr)
    with pytest.raises(TrainingDivergedError, match="diverged") as e:
        tr.fit()
    assert "checkpoint" in str(e.value)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] >= 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


# ----------------------------------------------------------------------------- 6. resume

def test_cli_resume_uses_saved_config(tmp_path):
    ds = make_folder(tmp_path / "ds")
    run = tmp_path / "run"
    r = fisnet("train", "--folder", ds, *SMALL, "--P", "0", "--lr", "0.05", "--optimizer", "adam",
               "--epochs", "1", "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr
    r = fisnet("train", "--out", run, "--resume", "--epochs", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert [row["epoch"] for row in json.loads((run / "log.json").read_text())] == [1, 2]
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert cfg["lr"] == 0.05 and cfg["optimizer"] == "adam" and cfg["epochs"] == 2
    r = fisnet("train", "--out", run, "--resume", "--epochs", "3", "--lr", "0.1", "--no-progress")
    assert r.returncode != 0
    line = no_traceback(r)
    assert "--lr" in line and "0.05" in line
    assert len(json.loads((run / "log.json").read_text())) == 2
    # a matching flag is fine
    r = fisnet("train", "--out", run, "--resume", "--epochs", "3", "--lr", "0.05", "--no-progress")
    assert r.returncode == 0, r.stderr


def test_api_resume_refuses_other_settings(tmp_path):
    from fisnet import models
    from fisnet.data import MaskedImageDataset
    from fisnet.train import Trainer, TrainConfig
    ds = MaskedImageDataset(torch.rand(8, 1, 8, 8), torch.ones(8, 1, 8, 8), torch.randint(0, 2, (8,)))
    mk = lambda: models.small_cnn(num_classes=2, in_channels=1, width=4, batchnorm=False)
    Trainer(mk(), ds, None, str(tmp_path), TrainConfig(epochs=1, P=0.0, batch_size=4, progress=False)).fit()
    with pytest.raises(ValueError, match="lr"):
        Trainer(mk(), ds, None, str(tmp_path), TrainConfig(epochs=2, P=0.0, lr=0.5, batch_size=4,
                                                           progress=False), resume=True)
    t = Trainer(mk(), ds, None, str(tmp_path), TrainConfig(epochs=2, P=0.0, batch_size=4, progress=False),
                resume=True)
    assert t.epoch == 1


# ----------------------------------------------------------------------------- 7. binary masks

@pytest.mark.parametrize("fg", [1, 255])
def test_binary_masks_01_and_0255(tmp_path, fg):
    from fisnet.data import ImageMaskFolder
    make_folder(tmp_path, fg=fg)
    _, m, _ = ImageMaskFolder(str(tmp_path))[0]
    assert int(m.sum()) == 16 and set(m.unique().tolist()) == {0.0, 1.0}


def test_cli_trains_on_01_masks_and_help_documents_rule(tmp_path):
    ds = make_folder(tmp_path / "ds", fg=1)
    r = fisnet("train", "--folder", ds, *SMALL, "--epochs", "1", "--tune-epochs", "1", "--out", tmp_path / "r",
               "--no-progress")
    assert r.returncode == 0, r.stderr
    h = fisnet("train", "--help").stdout
    assert "{0, 1}" in h and "{0, 255}" in h and "half" in h


# ----------------------------------------------------------------------------- 8. folder validation

def test_cli_validates_folder_before_training(tmp_path):
    ds = make_folder(tmp_path / "ds")
    run = tmp_path / "run"
    args = ["train", "--folder", ds, *SMALL, "--P", "0", "--epochs", "1", "--out", run, "--no-progress"]
    bad = ds / "images" / "b" / "2.png"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated PNG
    r = fisnet(*args)
    assert r.returncode != 0 and "b/2.png" in no_traceback(r).replace(os.sep, "/")
    assert "epoch 1" not in r.stdout and not (run / "checkpoint.pt").exists()
    bad.write_bytes(good)
    mask = ds / "masks" / "a" / "1.png"
    Image.fromarray(np.full((9, 8), 255, np.uint8)).save(mask)  # mask of another size
    r = fisnet(*args)
    assert r.returncode != 0 and "a/1.png" in no_traceback(r).replace(os.sep, "/")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)
    img = ds / "images" / "a" / "0.png"
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(img)  # image (and mask) of another size
    Image.fromarray(np.full((12, 12), 255, np.uint8)).save(ds / "masks" / "a" / "0.png")
    r = fisnet(*args)
    line = no_traceback(r)
    assert r.returncode != 0 and "a/0.png" in line.replace(os.sep, "/") and "--size" in line
    r = fisnet(*args, "--size", "8")
    assert r.returncode == 0, r.stderr
    assert "resiz" in r.stdout + r.stderr


def test_validate_api(tmp_path):
    from fisnet.data import ImageMaskFolder
    make_folder(tmp_path)
    ds = ImageMaskFolder(str(tmp_path))
    info = ds.validate(progress=False)
    assert info["n"] == 6 and tuple(info["image_size"]) == (8, 8)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "b" / "1.png")  # empty mask
    with pytest.raises(ValueError, match=r"b.1\.png.*no foreground"):
        ImageMaskFolder(str(tmp_path)).validate(progress=False)


# ----------------------------------------------------------------------------- 9. bad checkpoint files

def test_empty_and_truncated_checkpoints(tmp_path, trained):
    from fisnet.train import load_checkpoint
    good = (trained["run"] / "checkpoint.pt").read_bytes()
    img = trained["ds"] / "images" / "a" / "0.png"
    for name, data in (("empty.pt", b""), ("trunc.pt", good[: len(good) // 2])):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError) as e:
            load_checkpoint(str(p))
        assert str(p) in str(e.value)
        r = fisnet("explain", img, "--checkpoint", p, "--out", tmp_path / "h.png")
        assert r.returncode != 0 and str(p) in no_traceback(r)


# ----------------------------------------------------------------------------- 10. CLI errors

def test_cli_user_error_one_line_and_debug_traceback(tmp_path):
    r = fisnet("train", "--folder", tmp_path / "nope", *SMALL, "--out", tmp_path / "r")
    assert r.returncode != 0 and "nope" in no_traceback(r)
    r = fisnet("train", "--folder", tmp_path / "nope", *SMALL, "--out", tmp_path / "r", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a build or machine without CUDA")
def test_cli_device_cuda_on_cpu_build(tmp_path):
    ds = make_folder(tmp_path / "ds")
    r = fisnet("train", "--folder", ds, *SMALL, "--P", "0", "--epochs", "1", "--out", tmp_path / "r",
               "--device", "cuda")
    assert r.returncode != 0 and "CUDA" in no_traceback(r)


def test_cli_ctrl_c_says_how_to_resume(tmp_path):
    ds = make_folder(tmp_path / "ds", n=8)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", FISNET_MALLOC_TUNING="0")
    p = subprocess.Popen([sys.executable, "-m", "fisnet", "train", "--folder", str(ds), *SMALL, "--P", "0",
                          "--epochs", "100000", "--out", str(run), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        t0 = time.time()
        while not (run / "checkpoint.pt").exists() and time.time() - t0 < 120 and p.poll() is None:
            time.sleep(0.2)
        assert (run / "checkpoint.pt").exists()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    assert "Traceback" not in err
    assert f"fisnet train --out {run} --resume" in err


# ----------------------------------------------------------------------------- smaller items

def test_cli_progress_lines_and_no_bars_when_piped(tmp_path):
    ds = make_folder(tmp_path / "ds")
    base = ["train", "--folder", ds, *SMALL, "--P", "0", "--epochs", "1"]
    r = fisnet(*base, "--out", tmp_path / "a", "--no-progress")
    assert r.returncode == 0 and "epoch 1:" in r.stdout  # accuracy lines stay with --no-progress
    r = fisnet(*base, "--out", tmp_path / "b")  # output is a pipe: no progress bars
    assert r.returncode == 0 and "epoch 1:" in r.stdout
    assert "\r" not in r.stderr and "it/s" not in r.stderr and "s/it" not in r.stderr


def test_cli_epochs_0_prints_no_checkpoint_path(tmp_path):
    ds = make_folder(tmp_path / "ds")
    r = fisnet("train", "--folder", ds, *SMALL, "--P", "0", "--epochs", "0", "--out", tmp_path / "r",
               "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
    assert "checkpoint.pt" not in r.stdout and "no checkpoint" in r.stdout


def test_cli_lr_schedule_cosine(tmp_path):
    ds = make_folder(tmp_path / "ds")
    r = fisnet("train", "--folder", ds, *SMALL, "--P", "0", "--epochs", "1", "--lr-schedule", "cosine",
               "--out", tmp_path / "r", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["lr_schedule"] == "cosine"


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_torchrun_workers_exit_when_launcher_is_killed(tmp_path):
    ds = make_folder(tmp_path / "ds", n=4)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", FISNET_MALLOC_TUNING="0")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "fisnet", "train", "--folder", str(ds), *SMALL, "--P", "0", "--device", "cpu",
                          "--epochs", "100000", "--out", str(run), "--no-progress"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    workers = []
    try:
        t0 = time.time()
        while not (run / "checkpoint.pt").exists() and time.time() - t0 < 180 and p.poll() is None:
            time.sleep(0.5)
        assert (run / "checkpoint.pt").exists(), "the 2-process run did not start"
        workers = _children(p.pid)
        assert len(workers) == 2
        p.kill()  # kill -9 the launcher
        p.wait()
        t0 = time.time()
        while any(_alive(w) for w in workers) and time.time() - t0 < 60:
            time.sleep(0.5)
        assert not any(_alive(w) for w in workers), "workers outlived the torchrun launcher"
    finally:
        if p.poll() is None:
            p.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
