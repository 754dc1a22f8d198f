"""Pretrained weights (`weights=PATH` on every backbone; fisnet.models.weights).

The state dicts are written here by hand with torchvision's key names and shapes (not taken from
fisnet's own models), so a renamed module in fisnet fails these tests.
"""
import os
import pickle
import sys
import warnings
from collections import OrderedDict

import pytest
import torch

from fisnet import models
from fisnet.models import load_weights, read_state_dict


def _bn(sd, prefix, c, g):
    sd[f"{prefix}.weight"] = torch.rand(c, generator=g) + 0.5
    sd[f"{prefix}.bias"] = torch.randn(c, generator=g)
    sd[f"{prefix}.running_mean"] = torch.randn(c, generator=g)
    sd[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7)


def _conv(sd, key, cout, cin, k, g):
    sd[key] = torch.randn(cout, cin, k, k, generator=g) * 0.05


def tv_resnet18(num_classes=1000, seed=0):
    """torchvision.models.resnet18().state_dict(), by hand: 62 parameters + 60 BN buffers."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    _conv(sd, "conv1.weight", 64, 3, 7, g)
    _bn(sd, "bn1", 64, g)
    inplanes = 64
    for i, planes in enumerate([64, 128, 256, 512], start=1):
        for b in range(2):
            p = f"layer{i}.{b}"
            cin = inplanes if b == 0 else planes
            _conv(sd, f"{p}.conv1.weight", planes, cin, 3, g)
            _bn(sd, f"{p}.bn1", planes, g)
            _conv(sd, f"{p}.conv2.weight", planes, planes, 3, g)
            _bn(sd, f"{p}.bn2", planes, g)
            if b == 0 and i > 1:
                _conv(sd, f"{p}.downsample.0.weight", planes, inplanes, 1, g)
                _bn(sd, f"{p}.downsample.1", planes, g)
        inplanes = planes
    sd["fc.weight"] = torch.randn(num_classes, 512, generator=g) * 0.01
    sd["fc.bias"] = torch.randn(num_classes, generator=g) * 0.01
    return sd


def tv_densenet121(num_classes=1000, seed=0, old_names=False):
    """torchvision.models.densenet121().state_dict(), by hand (old_names: the pre-0.3 keys
    `denselayerN.norm.1.weight` that torchvision still converts)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    _conv(sd, "features.conv0.weight", 64, 3, 7, g)
    _bn(sd, "features.norm0", 64, g)
    c = 64
    for i, n in enumerate((6, 12, 24, 16), start=1):
        for j in range(1, n + 1):
            p = f"features.denseblock{i}.denselayer{j}"
            sep = "." if old_names else ""
            _bn(sd, f"{p}.norm{sep}1", c + (j - 1) * 32, g)
            _conv(sd, f"{p}.conv{sep}1.weight", 128, c + (j - 1) * 32, 1, g)
            _bn(sd, f"{p}.norm{sep}2", 128, g)
            _conv(sd, f"{p}.conv{sep}2.weight", 32, 128, 3, g)
        c += n * 32
        if i < 4:
            _bn(sd, f"features.transition{i}.norm", c, g)
            _conv(sd, f"features.transition{i}.conv.weight", c // 2, c, 1, g)
            c //= 2
    _bn(sd, "features.norm5", c, g)
    sd["classifier.weight"] = torch.randn(num_classes, c, generator=g) * 0.01
    sd["classifier.bias"] = torch.zeros(num_classes)
    return sd


def tv_vgg11_bn_features(seed=0):
    """The `features.*` part of torchvision's vgg11_bn (config A: conv-BN-ReLU, 'M' = max-pool)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    idx, cin = 0, 3
    for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if v == "M":
            idx += 1
            continue
        _conv(sd, f"features.{idx}.weight", v, cin, 3, g)
        sd[f"features.{idx}.bias"] = torch.randn(v, generator=g) * 0.01
        _bn(sd, f"features.{idx + 1}", v, g)
        idx += 3
        cin = v
    return sd


def _save(sd, path):
    torch.save(sd, path)
    return str(path)


def _assert_loaded(model, sd, skip=()):
    own = model.state_dict()
    for k, v in sd.items():
        if any(k.startswith(s) for s in skip):
            continue
        assert torch.equal(own[k], v.to(own[k].dtype)), k


def test_resnet18_torchvision_names_and_counts(tmp_path):
    sd = tv_resnet18()
    assert len(sd) == 122  # torchvision's resnet18 state dict: 62 parameters, 60 BN buffers
    path = _save(sd, tmp_path / "resnet18.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1000 classes: the classifier fits, no warning
        net = models.resnet18(num_classes=1000, weights=path)
    _assert_loaded(net, sd)


def test_classifier_reinitialised_with_a_warning(tmp_path):
    sd = tv_resnet18(num_classes=1000)
    path = _save(sd, tmp_path / "resnet18.pth")
    torch.manual_seed(3)
    fresh = models.resnet18(num_classes=2)
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match=r"classifier \(fc\) re-initialised.*fc\.weight \[1000, 512\] in the file, "
                                         r"\[2, 512\] in the model"):
        net = models.resnet18(num_classes=2, weights=path)
    _assert_loaded(net, sd, skip=("fc.",))
    # the classifier is the fresh one (same seed), not a slice of the file's
    torch.testing.assert_close(net.fc.weight, fresh.fc.weight, rtol=0, atol=0)
    torch.testing.assert_close(net.fc.bias, fresh.fc.bias, rtol=0, atol=0)
    assert not torch.equal(net.conv1.weight, fresh.conv1.weight)


def test_build_by_name_and_report(tmp_path):
    sd = tv_resnet18(num_classes=3)
    path = _save(sd, tmp_path / "w.pt")
    net = models.build("resnet18", num_classes=3, weights=path)
    _assert_loaded(net, sd)
    with pytest.warns(UserWarning, match="re-initialised"):
        rep = load_weights(models.resnet18(num_classes=5), path)
    assert rep.reinitialised == ["fc.weight", "fc.bias"]
    assert len(rep.loaded) == 120 and "fc.weight" not in rep.loaded


def test_missing_unexpected_and_shape_errors_list_the_keys(tmp_path):
    sd = tv_resnet18()
    bad = OrderedDict(sd)
    del bad["layer1.0.bn1.running_var"]
    bad["layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing from the file \(1\): layer1\.0\.bn1\.running_var.*"
                                         r"in the file but not in the model \(1\): layer5\.0\.conv1\.weight"):
        models.resnet18(num_classes=1000, weights=_save(bad, tmp_path / "bad.pth"))
    # a grey-image model cannot take RGB stem weights
    with pytest.raises(ValueError, match=r"conv1\.weight \[64, 3, 7, 7\] vs \[64, 1, 7, 7\].*in_channels"):
        models.resnet18(num_classes=1000, in_channels=1, weights=_save(sd, tmp_path / "rgb.pth"))
    # the CIFAR stem (3x3) is another architecture
    with pytest.raises(ValueError, match=r"conv1\.weight"):
        models.resnet18(num_classes=1000, small_input=True, weights=str(tmp_path / "rgb.pth"))
    # a ResNet file into a DenseNet: everything listed, nothing loaded silently
    with pytest.raises(ValueError, match=r"does not fit DenseNet: missing from the file"):
        load_weights(models.densenet121(num_classes=1000), str(tmp_path / "rgb.pth"))


def test_old_files_without_num_batches_tracked_load(tmp_path):
    sd = OrderedDict((k, v) for k, v in tv_resnet18().items() if not k.endswith("num_batches_tracked"))
    assert len(sd) == 102
    net = models.resnet18(num_classes=1000, weights=_save(sd, tmp_path / "old.pth"))
    _assert_loaded(net, sd)


def test_wrapped_and_ddp_prefixed_state_dicts(tmp_path):
    sd = tv_resnet18(num_classes=4)
    wrapped = {"state_dict": OrderedDict(("module." + k, v) for k, v in sd.items()), "epoch": 3}
    net = models.resnet18(num_classes=4, weights=_save(wrapped, tmp_path / "ck.pth"))
    _assert_loaded(net, sd)


def test_densenet121_torchvision_and_old_names(tmp_path):
    sd = tv_densenet121(num_classes=1000)
    net = models.densenet121(num_classes=1000, weights=_save(sd, tmp_path / "d.pth"))
    _assert_loaded(net, sd)
    old = tv_densenet121(num_classes=1000, seed=1, old_names=True)
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    load_weights(net, _save(old, tmp_path / "d_old.pth"))
    renamed = OrderedDict((k.replace(".norm.", ".norm").replace(".conv.", ".conv")
                           if ".denselayer" in k else k, v) for k, v in old.items())
    _assert_loaded(net, renamed)


def test_vgg_features_load_and_small_image_head_is_reinitialised(tmp_path):
    sd = tv_vgg11_bn_features()
    # torchvision's head reads a 7x7x512 map (25088 inputs); fisnet's small-image head reads 512.
    # A head of another shape (kept small here) stands in for it.
    sd["classifier.0.weight"] = torch.zeros(64, 512 * 4)
    sd["classifier.0.bias"] = torch.zeros(64)
    sd["classifier.3.weight"] = torch.zeros(64, 64)
    sd["classifier.3.bias"] = torch.zeros(64)
    sd["classifier.6.weight"] = torch.zeros(1000, 64)
    sd["classifier.6.bias"] = torch.zeros(1000)
    with pytest.warns(UserWarning, match=r"classifier \(classifier\) re-initialised"):
        net = models.vgg11_bn(num_classes=2, weights=_save(sd, tmp_path / "vgg.pth"))
    _assert_loaded(net, sd, skip=("classifier.",))
    assert net.classifier[0].weight.abs().sum() > 0  # not the file's zeros


def test_small_cnn_round_trip(tmp_path):
    torch.manual_seed(1)
    a = models.small_cnn(num_classes=3, in_channels=1, width=8)
    path = _save(a.state_dict(), tmp_path / "s.pth")
    torch.manual_seed(2)
    b = models.small_cnn(num_classes=3, in_channels=1, width=8, weights=path)
    torch.testing.assert_close(b.state_dict(), a.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"block1\.0\.weight \[8, 1, 3, 3\] vs \[16, 1, 3, 3\]"):
        models.small_cnn(num_classes=3, in_channels=1, width=16, weights=path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    evil = {"conv1.weight": torch.zeros(1), "payload": _Evil(marker)}
    p1 = tmp_path / "evil.pth"
    torch.save(evil, p1)  # zip format
    p2 = tmp_path / "evil_legacy.pt"
    with open(p2, "wb") as f:  # a bare pickle
        pickle.dump(evil, f, protocol=2)
    for p in (p1, p2):
        with pytest.raises(ValueError, match=r"weights_only=True.*never unpickles code"):
            models.resnet18(num_classes=2, weights=str(p))
        assert not os.path.exists(marker), "loading the file ran code"


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resnet18(weights=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a plain state dict"):
        read_state_dict(junk)
    torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="not tensors: epoch"):
        read_state_dict(tmp_path / "mixed.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        read_state_dict(tmp_path / "list.pth")


def test_safetensors_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"needs the safetensors package \(pip install safetensors\)"):
        models.resnet18(weights=str(p))


def test_safetensors_file_loads(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    sd = tv_resnet18(num_classes=1000)
    p = tmp_path / "w.safetensors"
    st.save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    net = models.resnet18(num_classes=1000, weights=str(p))
    _assert_loaded(net, sd)


def test_cli_train_weights_flag(tmp_path, capsys):
    from fisnet import cli
    args = cli.build_parser().parse_args(["train", "--weights", "w.pth"])
    assert args.weights == "w.pth"
    assert cli.build_parser().parse_args(["train"]).weights is None
    rc = cli.main(["train", "--n-train", "16", "--n-test", "8", "--epochs", "0", "--no-progress",
                   "--weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "weights file" in err[0] and "missing.pth" in err[0] and "does not exist" in err[0]


def test_every_builder_takes_weights_and_names_its_classifier():
    import inspect
    for name in models.names():
        fn = models._REGISTRY[name]
        assert "weights" in inspect.signature(fn).parameters, f"{name} has no weights= argument"
    for cls in (models.ResNet, models.DenseNet, models.VGG, models.SmallCNN):
        assert getattr(cls, "classifier_modules", None), f"{cls.__name__} names no classifier"
