"""ISNet variants (docs/spec.md §3), z⁺ (§3.1), the C1/C2 heuristic (§4.3), backbones × variants,
invariants 5, 7, 9 and bad input."""
import inspect
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fisnet
from fisnet import models
from fisnet.lrp import trace
from fisnet.variants import selective_quantity, stochastic_classes

DT = torch.float64


def small_net(bias=True, bn=True, k=5):
    layers = [nn.Conv2d(2, 4, 3, padding=1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, k, bias=bias)]
    net = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def test_unknown_variant_and_selective_class():
    with pytest.raises(ValueError, match="unknown ISNet variant 'fast'.*original"):
        fisnet.ISNet(small_net(), "fast")
    with pytest.raises(ValueError, match="selective_class"):
        fisnet.ISNet(small_net(), selective_class="median")


@pytest.mark.parametrize("variant,M", [("original", 5), ("selective", 1), ("stochastic", 1), ("dual", 2)])
def test_shapes_train_and_eval(variant, M, seed):
    net = fisnet.ISNet(small_net(), variant).train()
    x = torch.rand(3, 2, 8, 8, dtype=DT)
    out = net(x, torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 5)
    assert out.heatmaps.shape == (3, M, 2, 8, 8)
    assert out.heatmaps.requires_grad  # differentiable in training mode
    (out.heatmaps.abs().sum() + out.logits.sum()).backward()
    assert net.model[0].weight.grad is not None and net.model[0].weight.grad.abs().sum() > 0
    net.eval()
    plain = net(x)
    assert plain.heatmaps is None
    torch.testing.assert_close(plain.logits, net.model(x))
    hm = net(x, heatmaps=True).heatmaps
    assert hm.shape == (3, M, 2, 8, 8) and not hm.requires_grad


def test_original_equals_single_explanations(seed):
    m = small_net().eval()
    x = torch.rand(3, 2, 8, 8, dtype=DT)
    out = fisnet.ISNet(m, "original").eval()(x, heatmaps=True)
    for k in range(5):
        single = fisnet.explain(m, x, torch.full((3,), k))
        torch.testing.assert_close(out.heatmaps[:, k], single[:, 0], rtol=1e-10, atol=1e-12)


def test_selective_invariant_5(seed):
    """R(η) = Σ_k ∂η/∂z_k · R(z_k)."""
    m = small_net().eval()
    x = torch.rand(3, 2, 8, 8, dtype=DT)
    for cls in ("argmin", "argmax", "label"):
        net = fisnet.ISNet(m, "selective", selective_class=cls).eval()
        labels = torch.tensor([4, 0, 2])
        out = net(x, labels, heatmaps=True)
        z = m(x).detach().requires_grad_()
        c = out.targets
        if cls == "label":
            assert torch.equal(c, labels)
        elif cls == "argmin":
            assert torch.equal(c, z.argmin(1))
        eta = selective_quantity(z, c, 0.01)
        (deta,) = torch.autograd.grad(eta.sum(), z)
        r_all = fisnet.explain(m, x, "all")
        expect = (deta[:, :, None, None, None] * r_all).sum(1)
        torch.testing.assert_close(out.heatmaps[:, 0], expect, rtol=1e-9, atol=1e-12)


def test_selective_label_needs_labels():
    net = fisnet.ISNet(small_net(), "selective", selective_class="label").eval()
    with pytest.raises(ValueError, match="needs labels"):
        net(torch.rand(2, 2, 8, 8, dtype=DT), heatmaps=True)


def test_stochastic_frequency_and_vectorised(seed):
    B, K = 20000, 7
    logits = torch.randn(B, K)
    labels = torch.randint(0, K, (B,))
    g = torch.Generator().manual_seed(int(seed))
    c = stochastic_classes(logits, labels, g)
    same = (c == labels).double().mean().item()
    assert abs(same - 0.5) < 0.02, same
    others = c[c != labels]
    # the other classes are uniform over the K-1 non-label classes
    diff = (others - labels[c != labels]) % K
    counts = torch.bincount(diff, minlength=K)[1:].double()
    assert counts.min() / counts.max() > 0.85
    # predicted class when no labels
    c2 = stochastic_classes(logits, None, g)
    assert abs((c2 == logits.argmax(1)).double().mean().item() - 0.5) < 0.02


def test_stochastic_map_is_the_drawn_logit(seed):
    m = small_net().eval()
    x = torch.rand(4, 2, 8, 8, dtype=DT)
    out = fisnet.ISNet(m, "stochastic", generator=torch.Generator().manual_seed(1)).eval()(x, heatmaps=True)
    torch.testing.assert_close(out.heatmaps, fisnet.explain(m, x, out.targets))


def test_dual_eps_map_is_sum_of_logits(seed):
    m = small_net().eval()
    x = torch.rand(3, 2, 8, 8, dtype=DT)
    out = fisnet.ISNet(m, "dual").eval()(x, heatmaps=True)
    expect = fisnet.explain(m, x, "all").sum(1)
    torch.testing.assert_close(out.heatmaps[:, 0], expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("zb", [True, False])
def test_zplus_nonnegative_and_conservative_invariant_7(zb, seed):
    m = small_net(bias=False, bn=False).eval()
    x = torch.rand(3, 2, 8, 8, dtype=DT)
    t = trace(m, x, eps=1e-12, zb=zb, zplus=True)
    r = t.relevance_zplus()["input"]
    assert r.min() >= 0
    with torch.no_grad():
        feats = m[:-1](x)
        zp = (feats @ m[-1].weight.clamp(min=0).T).sum(1)
    torch.testing.assert_close(r.sum((1, 2, 3, 4)), zp, rtol=1e-8, atol=1e-12)
    # with biases and BN (folded) still non-negative
    m2 = small_net().eval()
    r2 = trace(m2, x, eps=1e-2, zb=zb, zplus=True).relevance_zplus()["input"]
    assert r2.min() >= 0 and r2.sum() > 0


def test_zplus_matches_hand_written_rule(seed):
    """z⁺ on a 2-layer MLP by explicit matrices, BN folded."""
    torch.manual_seed(int(seed))
    m = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(DT).eval()
    with torch.no_grad():
        m[2].running_mean.uniform_(-0.3, 0.3)
        m[2].running_var.uniform_(0.5, 2)
        m[2].weight.uniform_(0.5, 1.5)
    x = torch.rand(4, 2, 2, 2, dtype=DT)
    eps = 0.05
    r = trace(m, x, eps=eps, zb=False, zplus=True).relevance_zplus()["input"][:, 0]
    with torch.no_grad():
        a0 = x.flatten(1)
        bn = m[2]
        sig = torch.sqrt(bn.running_var + bn.eps)
        W1 = m[1].weight * (bn.weight / sig)[:, None]
        b1 = (m[1].bias - bn.running_mean) * bn.weight / sig + bn.bias
        z1 = a0 @ W1.T + b1
        a1 = z1.clamp(min=0)
        W2p, b2p = m[4].weight.clamp(min=0), m[4].bias.clamp(min=0)
        z2p = a1 @ W2p.T + b2p
        R2 = z2p  # seed: positive-weight logits
        R1 = a1 * ((R2 / (z2p + eps)) @ W2p)
        W1p, b1p = W1.clamp(min=0), b1.clamp(min=0)
        z1p = a0 @ W1p.T + b1p
        R0 = a0 * ((R1 / (z1p + eps)) @ W1p)
    torch.testing.assert_close(r.flatten(1), R0, rtol=1e-9, atol=1e-12)


def test_lds_layers_dict(seed):
    m = models.small_cnn(num_classes=4, in_channels=1).to(DT).eval()
    x = torch.rand(2, 1, 16, 16, dtype=DT)
    for variant, M in (("selective", 1), ("dual", 2), ("original", 4)):
        out = fisnet.ISNet(m, variant, lds_layers="default").eval()(x, heatmaps=True)
        assert set(out.heatmaps) == {"input", *m.lds_layers}
        for name, r in out.heatmaps.items():
            assert r.shape[:2] == (2, M), (name, r.shape)


# the full-size new backbones are covered by their small configurations (same blocks; the full
# ones take seconds per step on CPU): test_models_mobilenet_efficientnet_convnext.py and test_models_vit.py build them
FULL_SIZE_NEW = {"convnext_tiny", "efficientnet_b0", "mobilenet_v2", "vit_small", "vit_tiny"}


@pytest.mark.parametrize("name", [n for n in models.names() if n not in FULL_SIZE_NEW])
@pytest.mark.parametrize("variant", fisnet.VARIANTS)
def test_every_variant_on_every_backbone(name, variant, seed):
    K = 3
    # small_input keeps ResNet/DenseNet stages above 1x1 at 16x16: training-mode BatchNorm over a
    # batch of 1x1 maps has a near-zero variance and its backward (so the heatmap) explodes
    kw = {"small_input": True} if "small_input" in inspect.signature(getattr(models, name)).parameters else {}
    m = models.build(name, num_classes=K, in_channels=1, **kw)
    x = torch.rand(4, 1, 16, 16)
    labels = torch.tensor([0, 2, 1, 1])
    net = fisnet.ISNet(m, variant).train()
    out = net(x, labels)
    M = {"original": K, "dual": 2}.get(variant, 1)
    assert out.heatmaps.shape == (4, M, 1, 16, 16)
    assert torch.isfinite(out.heatmaps).all()
    masks = torch.zeros(4, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1
    crit = fisnet.ISNetLoss(cuts=[(1.0, 10.0)] * (2 if variant == "dual" else 1))
    loss = crit(out, labels, masks)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_heatmap_loss_gradgradcheck_through_explain(seed):
    """Invariant 9 end to end: the ISNet loss through explain, fp64, small CNN."""
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).to(DT).eval()
    x = torch.rand(2, 1, 5, 5, dtype=DT)
    masks = torch.zeros(2, 1, 5, 5, dtype=DT)
    masks[:, :, 1:4, 1:4] = 1
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    target = torch.tensor([0, 2])

    def f(*ps):
        with torch.nn.utils.stateless._reparametrize_module(m, dict(zip(names, ps))):
            maps = fisnet.explain(m, x, target, eps=0.1, create_graph=True)
        return fisnet.heatmap_loss(maps, masks, cuts=(0.01, 0.5), d=0.9)

    assert torch.autograd.gradcheck(f, params)
    assert torch.autograd.gradgradcheck(f, params[:2])


def test_tune_cuts_and_save_load(tmp_path, seed):
    torch.manual_seed(int(seed))
    m = models.small_cnn(num_classes=3, in_channels=1)
    x = torch.rand(16, 1, 16, 16)
    y = torch.randint(0, 3, (16,))
    masks = torch.ones(16, 1, 16, 16)
    loader = [(x[:8], masks[:8], y[:8]), (x[8:], masks[8:], y[8:])]
    for variant, kinds in (("selective", 1), ("dual", 2)):
        net = fisnet.ISNet(m, variant, lds_layers="default")
        cuts = fisnet.tune_cuts(net, loader, epochs=2, progress=False)
        assert set(cuts) == {"input", *m.lds_layers}
        for pairs in cuts.values():
            assert len(pairs) == kinds
            for c1, c2 in pairs:
                assert 0 < c1 < c2 <= 25 * c1 + 1e-9
        p = tmp_path / f"cuts-{variant}.json"
        fisnet.save_cuts(cuts, str(p))
        assert fisnet.load_cuts(str(p)) == cuts
        assert "cuts" in json.loads(p.read_text())
        crit = fisnet.ISNetLoss(cuts=cuts)
        out = net.train()(x[:4], y[:4])
        assert torch.isfinite(crit(out, y[:4], masks[:4]))


def test_cuts_formula():
    from fisnet.cuts import RelevanceStats

    st = RelevanceStats()
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=DT)
    maps = {"input": v.reshape(5, 1, 1, 1, 1)}
    st.update(maps, "selective")
    mu, sd = v.mean().item(), v.std().item()
    c1 = max(mu / 5, mu - 3 * sd)
    c2 = min(25 * c1, mu + 3 * sd)
    got = st.cuts()["input"][0]
    assert got == pytest.approx([c1, c2], rel=1e-12)


def test_bad_inputs():
    m = small_net()
    x = torch.rand(2, 2, 8, 8, dtype=DT)
    net = fisnet.ISNet(m, "selective", selective_class="label").train()
    with pytest.raises(IndexError, match="outside 0..4"):
        net(x, torch.tensor([0, 9]))
    with pytest.raises(IndexError, match=r"\[7\] out of range"):
        fisnet.explain(m.eval(), x, torch.tensor([1, 7]))
    bad = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(72, 2)).to(DT)
    with pytest.raises(fisnet.UnsupportedActivationError, match="'1' is Tanh"):
        fisnet.ISNet(bad, "dual").train()(x)
    out = net(x, torch.tensor([0, 1]))
    crit = fisnet.ISNetLoss(cuts=(2.0, 1.0))
    with pytest.raises(ValueError, match="C1"):
        crit(out, torch.tensor([0, 1]), torch.ones(2, 1, 8, 8, dtype=DT))
    crit = fisnet.ISNetLoss(cuts=(1.0, 2.0))
    with pytest.raises(ValueError, match="binary|0/1|non-binary"):
        crit(out, torch.tensor([0, 1]), torch.full((2, 1, 8, 8), 0.5, dtype=DT))
    with pytest.raises(ValueError, match="batch"):
        crit(out, torch.tensor([0, 1]), torch.ones(3, 1, 8, 8, dtype=DT))
    nan = out.heatmaps.detach().clone()
    nan[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"\[1\]"):
        fisnet.heatmap_loss(nan, torch.ones(2, 1, 8, 8, dtype=DT), cuts=(1.0, 2.0))
    with pytest.raises(ValueError, match="5-D|\\(B, M, C, H, W\\)"):
        fisnet.heatmap_loss(nan[:, 0], torch.ones(2, 1, 8, 8, dtype=DT), cuts=(1.0, 2.0))


def _param_grads(m, loss):
    return torch.autograd.grad(loss, list(m.parameters()), allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("zb", [True, False])
@pytest.mark.parametrize("arch", ["small", "resnet18"])
def test_dual_two_slot_pass_equals_two_passes(arch, zb, seed):
    """The batched Dual pass (one backward over two rule slots) gives the same maps, and the same
    weight gradients of a heatmap loss, as the two sequential passes."""
    if arch == "small":
        m = small_net().train()
        x = torch.rand(3, 2, 8, 8, dtype=DT)
    else:
        m = models.build("resnet18", num_classes=4, in_channels=2, small_input=True).to(DT).train()
        x = torch.rand(3, 2, 16, 16, dtype=DT)
    outs = []
    for batched in (False, True):
        net = fisnet.ISNet(m, "dual", zb=zb, dual_batched=batched).train()
        out = net(x)
        loss = (out.heatmaps ** 2).sum() + out.heatmaps.abs().sum() + out.logits.sum()
        outs.append((out.heatmaps.detach(), _param_grads(m, loss)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-14)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert outs[0][0][:, 1].min() >= 0  # the z⁺ slot is the z⁺ map


def test_original_batched_training_gradients_equal_per_class_loop(seed):
    """The batched Original (torch.func.vmap over the K seeds, create_graph=True) backpropagates
    the same weight gradients as K separate single-class relevance passes."""
    m = small_net().train()
    x = torch.rand(3, 2, 8, 8, dtype=DT)
    masks = torch.zeros(3, 1, 8, 8, dtype=DT)
    masks[:, :, 2:6, 2:6] = 1
    t = trace(m, x)
    batched = t.relevance(t.logits, create_graph=True)["input"]
    t2 = trace(m, x)
    loop = torch.cat([t2.relevance(t2.logits[:, k:k + 1], create_graph=True)["input"] for k in range(5)], 1)
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-14)
    crit = lambda h: fisnet.heatmap_loss(h, masks, cuts=(0.01, 1.0))  # noqa: E731
    for a, b in zip(_param_grads(m, crit(batched)), _param_grads(m, crit(loop))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_slot_mask():
    import fisnet_ext

    t = torch.arange(6.0).reshape(2, 3)
    kept = torch.func.vmap(lambda u: fisnet_ext.slot_mask(u, 1))(t)
    assert torch.equal(kept, torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 5.0]]))
    with pytest.raises(RuntimeError, match="vmap"):
        fisnet_ext.slot_mask(t, 0)
