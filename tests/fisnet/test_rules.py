"""The rule table (fisnet.rules): activations, norms with σ held constant, squeeze-excitation gates.

Oracle (written here, independent of the trace): as ε → 0 with Zb off, the heatmap equals
gradient × input of the same network in which each activation's gate h(z) = φ(z)/z, each norm's
σ and each SE gate is detached.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fisnet
from fisnet.rules import DEFAULT_RULES, describe_rules, resolve_rules

DT = torch.float64

PHI = {
    "relu6": lambda z: F.relu6(z), "leaky_relu": lambda z: F.leaky_relu(z, 0.1), "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu, "hardswish": F.hardswish,
    "elu": lambda z: F.elu(z, 0.7), "mish": F.mish,
}
MODULE = {
    "relu6": lambda: nn.ReLU6(), "leaky_relu": lambda: nn.LeakyReLU(0.1), "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": lambda: nn.SiLU(inplace=True),
    "hardswish": lambda: nn.Hardswish(), "elu": lambda: nn.ELU(0.7), "mish": lambda: nn.Mish(),
}


def held_act(z, phi):
    """z · h(z) with the gate h = φ(z)/z detached (φ'(0) at z = 0)."""
    zz = z.detach()
    safe = torch.where(zz == 0, torch.ones_like(zz), zz)
    with torch.enable_grad():
        z0 = torch.zeros_like(zz).requires_grad_(True)
        d0 = torch.autograd.grad(phi(z0).sum(), z0)[0]
    h = torch.where(zz == 0, d0, phi(zz) / safe)
    return z * h


class Net(nn.Module):
    """conv → act → conv → GroupNorm → act → squeeze-excitation → LayerNorm → linear → act → linear."""

    def __init__(self, act: str, oracle: bool = False, norm_last: str = "layer"):
        super().__init__()
        self.act, self.oracle = act, oracle
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.a1 = MODULE[act]()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.a2 = MODULE[act]()
        self.se1 = nn.Conv2d(8, 4, 1)
        self.se2 = nn.Conv2d(4, 8, 1)
        self.ln = nn.LayerNorm(8 * 6 * 6)
        self.fc1 = nn.Linear(8 * 6 * 6, 10)
        self.a3 = MODULE[act]()
        self.fc2 = nn.Linear(10, 3)

    def phi(self, mod, z):
        return held_act(z, PHI[self.act]) if self.oracle else mod(z)

    def norm(self, x, groups):
        if not self.oracle:
            return self.gn(x) if groups else self.ln(x)
        if groups:
            xg = x.reshape(x.shape[0], groups, -1)
            xc = xg - xg.mean(2, keepdim=True)
            y = (xc / torch.sqrt(xc.square().mean(2, keepdim=True) + self.gn.eps).detach()).reshape(x.shape)
            return y * self.gn.weight.reshape(1, -1, 1, 1) + self.gn.bias.reshape(1, -1, 1, 1)
        xc = x - x.mean(-1, keepdim=True)
        y = xc / torch.sqrt(xc.square().mean(-1, keepdim=True) + self.ln.eps).detach()
        return y * self.ln.weight + self.ln.bias

    def forward(self, x):
        h = self.phi(self.a1, self.conv1(x))
        h = self.phi(self.a2, self.norm(self.conv2(h), 2))
        s = F.adaptive_avg_pool2d(h, 1)
        s = torch.sigmoid(self.se2(F.silu(self.se1(s)) if not self.oracle else held_act(self.se1(s), F.silu)))
        h = h * (s.detach() if self.oracle else s)
        h = self.norm(h.flatten(1), 0)
        return self.fc2(self.phi(self.a3, self.fc1(h)))


def make(act, seed):
    torch.manual_seed(seed)
    net = Net(act).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    oracle = Net(act, oracle=True).to(DT)
    oracle.load_state_dict(net.state_dict())
    return net, oracle


@pytest.mark.parametrize("act", sorted(PHI))
def test_rules_equal_held_gradient_times_input(act, seed):
    net, oracle = make(act, seed)
    x = torch.rand(3, 3, 6, 6, dtype=DT)
    target = torch.tensor([0, 2, 1])
    r = fisnet.explain(net, x, target, eps=0.0, zb=False)[:, 0]
    xg = x.clone().requires_grad_(True)
    logit = oracle(xg).gather(1, target[:, None]).sum()
    expected = torch.autograd.grad(logit, xg)[0] * x
    torch.testing.assert_close(r, expected, rtol=1e-9, atol=1e-12)
    # the same forward values as the plain model; the map is not the plain gradient × input
    torch.testing.assert_close(net(x), oracle(x), rtol=1e-12, atol=1e-12)
    xg2 = x.clone().requires_grad_(True)
    plain = torch.autograd.grad(net(xg2).gather(1, target[:, None]).sum(), xg2)[0] * x
    assert not torch.allclose(plain, expected, rtol=1e-6, atol=1e-9)


def test_conservation_bias_free(seed):
    """No biases, no norm shifts, ε → 0: Σ R = the explained logit (the SE gate, the held σ and the
    identity rule conserve)."""
    torch.manual_seed(seed)
    net = Net("silu").to(DT)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.zero_()
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.bias.zero_()
    x = torch.rand(2, 3, 6, 6, dtype=DT)
    r = fisnet.explain(net, x, 1, eps=0.0, zb=False)
    # σ held constant: Σ_x x·centre(w·G)/σ = Σ (x − μ)·w·G/σ = Σ_y y·G (the centred sum vanishes)
    torch.testing.assert_close(r.sum((1, 2, 3, 4)), net(x)[:, 1], rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        net.gn.bias.fill_(0.3)  # a norm shift acts like a bias: it takes relevance
    r = fisnet.explain(net, x, 1, eps=0.0, zb=False)
    assert not torch.allclose(r.sum((1, 2, 3, 4)), net(x)[:, 1], rtol=1e-6)


def test_training_gradient_is_ordinary_and_heatmap_double_backward(seed):
    """One forward serves both: the logits' gradient is the plain model's; gradcheck of a heatmap
    loss in a weight through the activation, norm and gate rules (fp64)."""
    net, _ = make("gelu", seed)
    x = torch.rand(2, 3, 6, 6, dtype=DT)
    t = fisnet.trace(net, x, eps=0.01, zb=True)
    g_trace = torch.autograd.grad(t.logits.sum(), net.conv2.weight, retain_graph=True)[0]
    g_plain = torch.autograd.grad(net(x).sum(), net.conv2.weight)[0]
    torch.testing.assert_close(g_trace, g_plain, rtol=1e-12, atol=1e-14)

    names = ["conv1.bias", "gn.weight", "se2.bias"]  # activation, norm (σ) and gate paths; few entries
    params = {n: p for n, p in net.named_parameters()}

    def loss(*ws):
        sd = dict(params)
        sd.update(dict(zip(names, ws)))

        class F_(nn.Module):
            def forward(self, inp):
                return torch.func.functional_call(net, sd, (inp,))

        m = F_()
        m.dummy = nn.Parameter(torch.zeros(1, dtype=DT))  # the trace wants a parameter-carrying model
        r = fisnet.explain(m, x, 1, eps=0.01, zb=False, create_graph=True)
        return r.square().sum()

    ws = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss, ws, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_rules_override(seed):
    net, _ = make("silu", seed)
    x = torch.rand(2, 3, 6, 6, dtype=DT)
    base = fisnet.explain(net, x, 0, eps=0.0, zb=False)
    grad_all = fisnet.explain(net, x, 0, eps=0.0, zb=False,
                              rules={"activation": "gradient", "norm": "gradient", "gate": "gradient"})
    xg = x.clone().requires_grad_(True)
    plain = torch.autograd.grad(net(xg)[:, 0].sum(), xg)[0] * x
    torch.testing.assert_close(grad_all[:, 0], plain, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(base, grad_all)
    for kind in ("norm", "gate", "activation"):
        one = fisnet.explain(net, x, 0, eps=0.0, zb=False, rules={kind: "gradient"})
        assert not torch.allclose(one, base), kind
    with pytest.raises(ValueError, match="unknown op kind"):
        fisnet.explain(net, x, rules={"softmax": "cp"})
    with pytest.raises(ValueError, match="not a rule for"):
        fisnet.ISNet(net, rules={"norm": "identity"})
    assert resolve_rules() == DEFAULT_RULES
    assert "constant_scale" in describe_rules()


def test_sigmoid_outside_a_gate_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.sigmoid(self.c(x)).mean((2, 3)))

    with pytest.raises(fisnet.UnsupportedActivationError, match="gate"):
        fisnet.explain(M().to(DT), torch.rand(1, 3, 5, 5, dtype=DT))


@pytest.mark.parametrize("variant", ["original", "selective", "stochastic", "dual"])
def test_every_variant_on_the_rules_net(variant, seed):
    net, _ = make("hardswish", seed)
    net.train()
    x = torch.rand(2, 3, 6, 6, dtype=DT)
    isnet = fisnet.ISNet(net, variant)
    out = isnet(x, torch.tensor([0, 1]))
    hm = out.heatmaps
    assert torch.isfinite(hm).all()
    hm.square().sum().backward()
    assert net.conv1.weight.grad is not None and torch.isfinite(net.conv1.weight.grad).all()
    assert float(net.conv1.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("act", ["gelu", "leaky_relu", "silu"])
@pytest.mark.parametrize("batched", [False, True])
def test_zplus_with_signed_activations(act, batched, seed):
    """The Dual ISNet's z⁺ map through activations that go negative: only positive contributions
    count, so the map is ≥ 0, and with zero biases it conserves Σ_k z⁺_k as ε → 0."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), MODULE[act](),
                        nn.Conv2d(6, 6, 3, padding=1, bias=False), MODULE[act](), nn.Flatten(),
                        nn.Linear(6 * 5 * 5, 4, bias=False)).to(DT).eval()
    x = torch.rand(3, 3, 5, 5, dtype=DT)
    out = fisnet.ISNet(net, "dual", eps=1e-12, dual_batched=batched)(x, heatmaps=True, create_graph=False)
    zp = out.heatmaps[:, 1]
    assert bool((zp >= -1e-12).all()), float(zp.min())
    with torch.no_grad():
        feats = net[:5](x)
        assert bool((feats < 0).any())  # the classifier's inputs are signed
        # the classifier's z⁺ with signed inputs: W⁺a⁺ + W⁻a⁻ per class
        w = net[5].weight
        zplus = F.linear(feats.clamp(min=0), w.clamp(min=0)) + F.linear(feats.clamp(max=0), w.clamp(max=0))
    torch.testing.assert_close(zp.sum((1, 2, 3)), zplus.sum(1), rtol=1e-8, atol=1e-10)


class ResMLP(nn.Module):
    """Bias-free residual MLP: h = relu(W1 x); out = relu(W3 relu(W2 h) + h); logits = Wf out."""

    def __init__(self, inplace):
        super().__init__()
        self.l1, self.l2, self.l3 = (nn.Linear(12, 12, bias=False) for _ in range(3))
        self.fc = nn.Linear(12, 4, bias=False)
        self.inplace = inplace

    def forward(self, x):
        h = torch.relu(self.l1(x.flatten(1)))
        u = self.l3(torch.relu(self.l2(h)))
        if self.inplace:
            u += h
        else:
            u = h + u
        return self.fc(torch.relu(u))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_zplus_residual_sum_is_one_layer(inplace, batched, seed):
    """The z⁺ map through a residual sum: ≥ 0 and conservative as ε → 0 with zero biases (the sum
    and the last linear layer of the branch are one z⁺ layer; issue 9)."""
    torch.manual_seed(seed)
    net = ResMLP(inplace).to(DT).eval()
    x = torch.rand(4, 12, dtype=DT)
    hm = fisnet.ISNet(net, "dual", eps=1e-12, zb=False, dual_batched=batched)(x, heatmaps=True).heatmaps
    zp = hm[:, 1]
    assert bool((zp >= 0).all())
    with torch.no_grad():
        h = torch.relu(net.l1(x))
        out = torch.relu(net.l3(torch.relu(net.l2(h))) + h)
        seeds = F.linear(out, net.fc.weight.clamp(min=0)).sum(1)
    torch.testing.assert_close(zp.sum(1), seeds, rtol=1e-9, atol=1e-12)


def test_zplus_resnet_lds_maps_nonnegative(seed):
    torch.manual_seed(seed)
    from fisnet.models import resnet18
    m = resnet18(num_classes=3).to(DT).eval()
    x = torch.rand(2, 3, 32, 32, dtype=DT)
    maps = [fisnet.ISNet(m, "dual", lds_layers=["layer1", "layer2.0", "layer3"], dual_batched=b)(
        x, heatmaps=True).heatmaps for b in (False, True)]
    for k in maps[0]:
        assert bool((maps[0][k][:, 1] >= 0).all()), k
        torch.testing.assert_close(maps[0][k], maps[1][k], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("follow", ["gelu", "layer_norm", "nothing"])
def test_zb_whatever_follows_the_first_layer(follow, seed):
    """Zb at the first conv followed by an activation, a LayerNorm (ConvNeXt's stem) or only linear
    ops: bias-free, ε → 0, Σ R tracks the logit; and the map differs from Zb off."""
    torch.manual_seed(seed)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 2, stride=2, bias=False)
            self.ln = nn.LayerNorm(4, elementwise_affine=False)
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.fc = nn.Linear(4 * 4 * 4, 3, bias=False)

        def forward(self, x):
            h = self.stem(x)
            if follow == "gelu":
                h = F.gelu(h)
            elif follow == "layer_norm":
                h = self.ln(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.fc(F.gelu(self.conv(h)).flatten(1))

    m = M().to(DT)
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    r = fisnet.explain(m, x, 1, eps=1e-12)
    torch.testing.assert_close(r.sum((1, 2, 3, 4)), m(x)[:, 1], rtol=1e-8, atol=1e-10)
    assert torch.isfinite(r).all()
    assert not torch.allclose(r, fisnet.explain(m, x, 1, eps=1e-12, zb=False))


@pytest.mark.parametrize("variant", ["dual", "selective"])
def test_training_step_frees_its_graph(variant, seed):
    """No reference cycle through autograd nodes keeps a step's tensors alive (the Dual ISNet
    leaked ~40 MB per step when z⁺ records were held strongly by the nodes' contexts)."""
    import gc
    import weakref
    from fisnet.models import resnet18
    torch.manual_seed(seed)
    m = resnet18(num_classes=3).to(DT).train()
    net = fisnet.ISNet(m, variant, lds_layers=["layer1"])
    x = torch.rand(2, 3, 16, 16, dtype=DT)
    out = net(x, torch.tensor([0, 1]))
    loss = out.heatmaps["input"].square().sum() + out.heatmaps["layer1"].square().sum() + out.logits.sum()
    loss.backward()
    refs = [weakref.ref(out.logits), weakref.ref(out.heatmaps["layer1"])]
    del out, loss
    gc.collect()
    assert all(r() is None for r in refs)
