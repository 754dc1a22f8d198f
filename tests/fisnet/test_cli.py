"""The `fisnet` command: --help texts, demo --quick, train + explain, tune-cuts, bench."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fisnet.cli import build_parser, main

SUBCOMMANDS = ["demo", "train", "tune-cuts", "explain", "bench"]


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for c in SUBCOMMANDS:
        assert c in out


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: fisnet " + cmd in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "fisnet", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "demo" in r.stdout


def test_demo_quick(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    for key in ("accuracy", "background_share", "cuts", "config", "timings"):
        assert key in rep
    for model in ("plain", "isnet"):
        assert set(rep["accuracy"][model]) == {"biased", "unbiased", "deceiving"}
        assert all(0.0 <= v <= 1.0 for v in rep["accuracy"][model].values())
        assert all(0.0 <= v <= 1.0 for v in rep["background_share"][model].values())
    assert "input" in rep["cuts"]
    for png in ("heatmaps.png", "loss_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert (out / "isnet" / "checkpoint.pt").exists() and (out / "isnet" / "log.csv").exists()



def test_demo_lds_flag(tmp_path):
    """--lds: the ISNet trains with LRP deep supervision (cuts per LDS layer, the run's config says
    so); the default is on for ConvNeXt and ViT only, and --no-lds turns it off."""
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    from fisnet.cli import _demo_lds
    from fisnet.models import build
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--lds", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    layers = build("small_cnn", num_classes=10, in_channels=1).lds_layers
    assert set(rep["cuts"]) == {"input", *layers}
    assert rep["config"]["lds"] is True and rep["config"]["isnet"]["lds"] is True
    assert rep["config"]["plain"]["lds"] is False
    assert _demo_lds("small_cnn", None) is False and _demo_lds("efficientnet_micro", None) is False
    assert _demo_lds("convnext_micro", None) is True and _demo_lds("convnext_tiny", None) is True
    assert _demo_lds("vit_digits", None) is True and _demo_lds("vit_tiny", None) is True
    assert _demo_lds("convnext_micro", False) is False and _demo_lds("vit_digits", False) is False
    assert build_parser().parse_args(["demo", "--no-lds"]).lds is False
    assert build_parser().parse_args(["demo"]).lds is None


def test_demo_backbone_defaults():
    """ViT backbones start the demo from lr 1e-3, P 0.8 and 16 ISNet epochs (DEMO_BACKBONE_DEFAULTS);
    the command line overrides them; other backbones and --quick keep theirs."""
    from fisnet.cli import DEMO_DEFAULTS, QUICK_DEFAULTS, _demo_params
    p = _demo_params(False, None, None, {}, "vit_digits_stem")
    assert p["lr"] == 1e-3 and p["isnet_epochs"] == 16 and p["P"] == 0.8
    assert p["n_train"] == DEMO_DEFAULTS["n_train"] and p["plain_epochs"] == DEMO_DEFAULTS["plain_epochs"]
    p = _demo_params(False, 7, None, {"lr": 5e-4, "P": 0.6}, "vit_digits")
    assert p["lr"] == 5e-4 and p["isnet_epochs"] == 7 and p["P"] == 0.6
    p = _demo_params(False, None, None, {}, "convnext_micro")
    assert p["lr"] == DEMO_DEFAULTS["lr"] and p["isnet_epochs"] == DEMO_DEFAULTS["isnet_epochs"]
    assert _demo_params(True, None, None, {}, "vit_digits")["lr"] == QUICK_DEFAULTS["lr"]


def _folder_dataset(root, n=6, size=16):
    from PIL import Image
    import numpy as np
    rng = np.random.RandomState(0)
    for cls in ("a", "b"):
        os.makedirs(root / "images" / cls)
        os.makedirs(root / "masks" / cls)
        for i in range(n):
            img = (rng.rand(size, size) * 255).astype("uint8")
            Image.fromarray(img).save(root / "images" / cls / f"{i}.png")
            m = np.zeros((size, size), "uint8")
            m[4:12, 4:12] = 255
            Image.fromarray(m).save(root / "masks" / cls / f"{i}.png")
    return root / "images" / "a" / "0.png"


def test_train_folder_then_explain(tmp_path):
    pytest.importorskip("PIL")
    pytest.importorskip("matplotlib")
    img = _folder_dataset(tmp_path / "ds")
    run = tmp_path / "run"
    common = ["--folder", str(tmp_path / "ds"), "--channels", "1", "--width", "4", "--no-batchnorm",
              "--batch-size", "4", "--no-progress", "--out", str(run)]
    # tune cuts separately, then train with them
    cuts = tmp_path / "cuts.json"
    assert main(["tune-cuts", "--folder", str(tmp_path / "ds"), "--channels", "1", "--width", "4",
                 "--no-batchnorm", "--epochs", "1", "--batch-size", "4", "--out", str(cuts), "--no-progress"]) == 0
    assert "input" in json.loads(cuts.read_text())["cuts"]
    assert main(["train", *common, "--epochs", "1", "--cuts", str(cuts), "--test-folder", str(tmp_path / "ds")]) == 0
    assert main(["train", *common, "--epochs", "2", "--resume"]) == 0
    log = json.loads((run / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2] and "test" in log[0]
    png = tmp_path / "heat.png"
    assert main(["explain", str(img), "--checkpoint", str(run / "checkpoint.pt"), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_helpers(tmp_path):
    from fisnet.plot import heatmap_grid, loss_curves, save_heatmap_png
    x = torch.rand(2, 1, 10, 10)
    R = torch.randn(2, 1, 1, 10, 10)
    heatmap_grid(x, {"a": R, "b": -R}, str(tmp_path / "g.png"), titles=["x", "y"], masks=torch.ones(2, 1, 10, 10))
    save_heatmap_png(x[0], R[0], str(tmp_path / "h.png"))
    hist = [{"epoch": 1, "train_ce": 1.0, "train_background": 0.5, "train_foreground": 0.1,
             "test": {"t": {"accuracy": 0.5}}},
            {"epoch": 2, "train_ce": 0.5, "train_background": 0.3, "train_foreground": 0.1,
             "test": {"t": {"accuracy": 0.7}}}]
    loss_curves({"run": hist}, str(tmp_path / "c.png"))
    for f in ("g.png", "h.png", "c.png"):
        assert (tmp_path / f).stat().st_size > 500


def test_bench_quick_subset(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["bench", "--quick", "--classes", "2,3", "--repeats", "1", "--batch", "4", "--size", "12",
                 "--width", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "original_loop" in out and "selective" in out
    csvs = [f for f in os.listdir(tmp_path) if f.endswith(".csv")]
    assert len(csvs) == 1
    text = (tmp_path / csvs[0]).read_text().splitlines()
    assert text[0].startswith("variant,classes,ms_median,ratio_to_plain")
    from fisnet.bench_scaling import VARIANTS
    assert len(text) == 1 + 2 * len(VARIANTS)  # a row per variant and K
    assert {line.split(",")[0] for line in text[1:]} == set(VARIANTS)
