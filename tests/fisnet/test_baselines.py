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
