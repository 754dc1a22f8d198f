"""The Dual ISNet's z⁺ map on networks whose activations can be negative (GELU, SiLU, LayerNorm,
attention): it keeps its sign and, bias-free as ε → 0, conserves the positive-weight logits.

Oracles written here: the z⁺ seed Σ_k z⁺_k = Σ_k Σ_j (w_kj a_j)⁺ of the classifier computed by hand
from its input (a forward hook), and the sign of every map.  Also: the two-slot pass equals the two
passes on the backbones with squeeze-excitation (it used to crash there), and the Dual's ε map is the
LRP-ε map of Σ_k z_k computed without z⁺ taps.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fisnet
from fisnet import models
from fisnet.lrp import trace

DT = torch.float64


class ConvNeXtish(nn.Module):
    """conv → channels-last LayerNorm → Linear → GELU → Linear → layer scale → + residual →
    average pool (signed input) → classifier; every bias zero when `bias=False`."""

    def __init__(self, bias: bool, K: int = 4, inplace: bool = False):
        super().__init__()
        self.inplace = inplace  # ConvNeXt's own form: branch += identity, the branch not a conv output
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=bias)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16, bias=bias)
        self.fc2 = nn.Linear(16, 8, bias=bias)
        self.gamma = nn.Parameter(torch.randn(8, dtype=DT))
        self.head = nn.Linear(8, K, bias=bias)
        if not bias:
            nn.init.zeros_(self.norm.bias)
        nn.init.normal_(self.norm.weight)  # either sign

    def forward(self, x):
        h = self.stem(x)
        y = self.norm(h.permute(0, 2, 3, 1))
        y = (self.fc2(F.gelu(self.fc1(y))) * self.gamma).permute(0, 3, 1, 2)
        if self.inplace:
            y += h
            h = y
        else:
            h = h + y
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Attentionish(nn.Module):
    """patch conv → tokens + position embedding → LayerNorm → nn.MultiheadAttention → + residual →
    LayerNorm → MLP (GELU) → + residual → token mean → classifier (the position embedding zero when
    `bias=False`)."""

    def __init__(self, bias: bool, K: int = 4):
        super().__init__()
        self.embed = nn.Conv2d(1, 8, 4, stride=4, bias=bias)
        self.pos = nn.Parameter(torch.randn(1, 4, 8, dtype=DT) * (1.0 if bias else 0.0))
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, bias=bias, batch_first=True)
        self.norm2 = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16, bias=bias)
        self.fc2 = nn.Linear(16, 8, bias=bias)
        self.head = nn.Linear(8, K, bias=bias)
        if not bias:
            nn.init.zeros_(self.norm.bias)
            nn.init.zeros_(self.norm2.bias)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        u = self.norm(t)
        a, _ = self.attn(u, u, u, need_weights=False)
        t = t + a
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(t.mean(1))


def zplus_seed(model, x):
    """Σ over images and classes of z⁺_k = Σ_j (w_kj a_j)⁺ + b_k⁺ at the classifier, by hand."""
    seen = {}
    h = model.head.register_forward_hook(lambda m, i, o: seen.setdefault("a", i[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    a, w = seen["a"], model.head.weight.detach()
    contrib = (a[:, None, :] * w[None, :, :]).clamp(min=0).sum(-1)
    if model.head.bias is not None:
        contrib = contrib + model.head.bias.detach().clamp(min=0)
    return contrib.sum()


MODELS = {"convnextish": ConvNeXtish, "attentionish": Attentionish,
          "convnextish_inplace": lambda bias: ConvNeXtish(bias, inplace=True)}


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_conserves_and_keeps_sign_bias_free(name, batched, seed):
    model = MODELS[name](bias=False).to(DT).eval()
    x = torch.rand(3, 1, 8, 8, dtype=DT)
    assert bool((model(x) != 0).any())
    net = fisnet.ISNet(model, "dual", eps=1e-9, zb=False, dual_batched=batched).eval()
    zp = net(x, heatmaps=True).heatmaps[:, 1]
    assert float(zp.min()) >= -1e-12 * float(zp.abs().max())
    want = zplus_seed(model, x)
    assert float(want) > 0
    torch.testing.assert_close(zp.sum(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sign_with_biases_and_zb(name, seed):
    model = MODELS[name](bias=True).to(DT).eval()
    x = torch.rand(3, 1, 8, 8, dtype=DT)
    zp = fisnet.ISNet(model, "dual").eval()(x, heatmaps=True).heatmaps[:, 1]
    assert float(zp.min()) >= -1e-12 * float(zp.abs().max())
    assert float(zp.max()) > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eps_map_and_ordinary_gradient_unchanged_by_zplus_taps(name, seed):
    """The z⁺ taps act in the z⁺ pass only: the Dual's ε map is the plain trace's LRP-ε map of
    Σ_k z_k, and the classification gradient is the model's own."""
    model = MODELS[name](bias=True).to(DT).eval()
    x = torch.rand(2, 1, 8, 8, dtype=DT)
    eps_map = fisnet.ISNet(model, "dual").eval()(x, heatmaps=True).heatmaps[:, 0]
    t = trace(model, x)
    want = t.relevance(t.logits.sum(1, keepdim=True))["input"][:, 0]
    torch.testing.assert_close(eps_map, want, rtol=1e-10, atol=1e-13)

    xg = x.clone().requires_grad_(True)
    tz = trace(model, xg, zplus=True)
    g_traced = torch.autograd.grad(tz.logits.square().sum(), list(model.parameters()) + [xg])
    xg2 = x.clone().requires_grad_(True)
    g_plain = torch.autograd.grad(model(xg2).square().sum(), list(model.parameters()) + [xg2])
    for a, b in zip(g_traced, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zplus_map_gradcheck(name, seed):
    """fp64 gradcheck and gradgradcheck of the z⁺ map (the training step differentiates it) with
    respect to a weight of the norm and one of the attention/MLP (the trace takes the input as a
    leaf of its own, so the map is differentiated in the weights, as in training)."""
    model = MODELS[name](bias=True).to(DT).eval()
    x = torch.rand(2, 1, 8, 8, dtype=DT)
    wname = "attn.in_proj_weight" if name == "attentionish" else "fc1.weight"
    params = dict(model.named_parameters())
    probe = torch.randn(2, 1, 1, 8, 8, dtype=DT)

    def f(w_norm, w_other):
        m = _Swapped(model, {"norm.weight": w_norm, wname: w_other})
        with torch.enable_grad():
            t = trace(m, x, zb=False, zplus=True)
            r = t.relevance_zplus(create_graph=True)["input"]
        return (r * probe).sum()

    inputs = (params["norm.weight"].detach().clone().requires_grad_(True),
              params[wname].detach().clone().requires_grad_(True))
    g = torch.autograd.grad(f(*inputs), inputs)
    assert all(float(t.abs().sum()) > 0 for t in g)  # the map depends on both weights
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


class _Swapped(nn.Module):
    """`model` with some parameters replaced by given tensors (torch.func.functional_call)."""

    def __init__(self, model, tensors):
        super().__init__()
        self.model, self.tensors = model, tensors

    def forward(self, x):
        return torch.func.functional_call(self.model, self.tensors, (x,))


BACKBONES = ["convnext_micro", "efficientnet_micro", "mobilenet_v2_micro", "vit_digits"]


@pytest.mark.parametrize("name", BACKBONES)
def test_backbones_two_slot_pass_equals_two_passes_and_keeps_sign(name, seed):
    """Every map (input and the default LDS layers) of the two-slot pass equals the two passes, and
    the z⁺ maps keep their sign.  EfficientNet's squeeze-excitation made the two-slot pass (the
    CUDA default) raise before."""
    model = models.build(name, num_classes=10, in_channels=1).to(DT).eval()
    x = torch.rand(2, 1, 36, 36, dtype=DT)
    two = fisnet.ISNet(model, "dual", lds_layers="default", dual_batched=False).eval()(x, heatmaps=True).heatmaps
    one = fisnet.ISNet(model, "dual", lds_layers="default", dual_batched=True).eval()(x, heatmaps=True).heatmaps
    assert set(one) == set(two) and len(one) > 1
    for k in two:
        torch.testing.assert_close(one[k], two[k], rtol=1e-9, atol=1e-12 * float(two[k].abs().max()))
        if k != "input":  # the LDS maps: the z⁺ rule alone
            zp = two[k][:, 1]
            assert float(zp.min()) >= -1e-12 * float(zp.abs().max()), k
    # the input map with the z⁺ rule at the first layer too (with Zb, a Zb denominator that is 0 in
    # exact arithmetic — zero pixels at the lower bound — takes the sign of its rounding error, and
    # such pixels get ±1e-9 of the largest value)
    zp = fisnet.ISNet(model, "dual", zb=False, dual_batched=False).eval()(x, heatmaps=True).heatmaps[:, 1]
    assert float(zp.min()) >= -1e-12 * float(zp.abs().max())
