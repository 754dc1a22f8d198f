"""Attention rules of the rule table ("cp", "attnlrp") for F.scaled_dot_product_attention and
nn.MultiheadAttention.

Oracle (written here, independent of the trace): as ε → 0 with Zb off, the map equals gradient ×
input of the same network written by hand, with A = softmax(q kᵀ/√d) detached (cp), or with the
gradients reaching q and k scaled by 1/4 and v by 1/2 through tensor hooks (attnlrp).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fisnet

DT = torch.float64


class Tiny(nn.Module):
    """patch conv → tokens → (attention + residual) → mean → linear; `mode` picks how attention
    runs: "sdpa", "mha" (nn.MultiheadAttention, batch_first), or the hand-written oracles."""

    def __init__(self, mode="sdpa", bias=True, heads=2, need_weights=False):
        super().__init__()
        self.mode, self.heads, self.need_weights = mode, heads, need_weights
        self.patch = nn.Conv2d(3, 8, 2, stride=2, bias=bias)
        self.mha = nn.MultiheadAttention(8, heads, batch_first=True, bias=bias)
        self.fc = nn.Linear(8, 3, bias=bias)
        self.mask = torch.zeros(())  # an additive attention mask (constant) for the hand-written modes

    def attend(self, t):
        w, b = self.mha.in_proj_weight, self.mha.in_proj_bias
        q, k, v = F.linear(t, w, b).chunk(3, dim=-1)
        B, N, E = q.shape
        q, k, v = (z.reshape(B, N, self.heads, E // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.mode == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.mode == "hand":  # written by hand: recognised by the trace
            scores = torch.matmul(q, k.transpose(-2, -1)) * (E // self.heads) ** -0.5
            o = F.dropout(torch.softmax(scores + self.mask, dim=-1), 0.0) @ v
        else:
            if self.mode == "attnlrp_oracle":
                q.register_hook(lambda g: g / 4)
                k.register_hook(lambda g: g / 4)
                v.register_hook(lambda g: g / 2)
            a = torch.softmax(q @ k.transpose(-2, -1) / (E // self.heads) ** 0.5 + self.mask, dim=-1)
            o = (a.detach() if self.mode == "cp_oracle" else a) @ v
        o = o.transpose(1, 2).reshape(B, N, E)
        return F.linear(o, self.mha.out_proj.weight, self.mha.out_proj.bias)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, 8)
        if self.mode == "mha":
            a = self.mha(t, t, t, need_weights=self.need_weights)[0]
        else:
            a = self.attend(t)
        t = torch.relu(t + a)
        return self.fc(t.mean(1))


def maps_and_oracle(rule, mode, seed, **kw):
    torch.manual_seed(seed)
    net = Tiny(mode, **kw).to(DT).eval()
    oracle = Tiny("cp_oracle" if rule == "cp" else "attnlrp_oracle", **kw).to(DT).eval()
    oracle.load_state_dict(net.state_dict())
    x = torch.rand(3, 3, 8, 8, dtype=DT)
    target = torch.tensor([0, 1, 2])
    r = fisnet.explain(net, x, target, eps=0.0, zb=False, rules={"attention": rule})[:, 0]
    xg = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(oracle(xg).gather(1, target[:, None]).sum(), xg)[0] * x
    return net, x, r, expected


@pytest.mark.parametrize("rule", ["cp", "attnlrp"])
@pytest.mark.parametrize("mode,need_weights", [("sdpa", False), ("mha", False), ("mha", True), ("hand", False)])
def test_attention_rules_equal_oracle(rule, mode, need_weights, seed):
    net, x, r, expected = maps_and_oracle(rule, mode, seed, need_weights=need_weights)
    torch.testing.assert_close(r, expected, rtol=1e-9, atol=1e-12)
    xg = x.clone().requires_grad_(True)  # not the plain gradient × input
    plain = torch.autograd.grad(net(xg)[:, 0].sum(), xg)[0] * x
    assert not torch.allclose(plain[:1], expected[:1], rtol=1e-6)


def test_cp_conserves_bias_free(seed):
    torch.manual_seed(seed)
    net = Tiny("sdpa", bias=False).to(DT).eval()
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    r = fisnet.explain(net, x, 1, eps=1e-12, zb=False)
    torch.testing.assert_close(r.sum((1, 2, 3, 4)), net(x)[:, 1], rtol=1e-8, atol=1e-10)


def test_attention_heatmap_loss_gradcheck(seed):
    torch.manual_seed(seed)
    net = Tiny("sdpa").to(DT).eval()
    x = torch.rand(1, 3, 4, 4, dtype=DT)
    params = dict(net.named_parameters())

    for rule in ("cp", "attnlrp"):
        def loss(w, rule=rule):
            sd = dict(params)
            sd["mha.in_proj_bias"] = w

            class M(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.p = nn.Parameter(torch.zeros(1, dtype=DT))

                def forward(self, inp):
                    return torch.func.functional_call(net, sd, (inp,))

            r = fisnet.explain(M(), x, 0, eps=0.01, zb=False, create_graph=True, rules={"attention": rule})
            return r.square().sum()

        w = params["mha.in_proj_bias"].detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(loss, (w,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("variant", ["original", "selective", "stochastic", "dual"])
def test_every_variant_on_attention(variant, seed):
    torch.manual_seed(seed)
    net = Tiny("mha").to(DT).train()
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    out = fisnet.ISNet(net, variant)(x, torch.tensor([0, 2]))
    assert torch.isfinite(out.heatmaps).all()
    out.heatmaps.square().sum().backward()
    g = net.mha.in_proj_weight.grad
    assert g is not None and torch.isfinite(g).all() and float(g.abs().sum()) > 0


@pytest.mark.parametrize("rule", ["cp", "attnlrp"])
def test_handwritten_attention_with_mask_equals_sdpa(rule, seed):
    """Attention written by hand (matmul, scale, additive mask, softmax, dropout 0, matmul) is recognised:
    its maps, at ε = 0.01 with Zb, and the weight gradient of a heatmap loss through them (the training
    step's double backward) equal those of the same weights through F.scaled_dot_product_attention."""
    torch.manual_seed(seed)
    hand = Tiny("hand").to(DT).train()
    sdpa = Tiny("sdpa").to(DT).train()
    sdpa.load_state_dict(hand.state_dict())
    mask = torch.randn(4, 4, dtype=DT)
    hand.mask = mask
    sdpa_attend = sdpa.attend

    def attend_masked(t):  # the same network through SDPA with the mask as attn_mask
        orig = F.scaled_dot_product_attention
        try:
            F.scaled_dot_product_attention = lambda q, k, v: orig(q, k, v, attn_mask=mask)
            return sdpa_attend(t)
        finally:
            F.scaled_dot_product_attention = orig

    sdpa.attend = attend_masked
    x = torch.rand(3, 3, 4, 4, dtype=DT)
    res = []
    for net in (hand, sdpa):
        r = fisnet.explain(net, x, torch.tensor([0, 1, 2]), create_graph=True, rules={"attention": rule})
        w = net.mha.in_proj_weight
        g, = torch.autograd.grad(r.abs().sum(), w)
        res.append((r.detach(), g))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-9, atol=1e-11)


def test_handwritten_attention_dual_and_variants(seed):
    torch.manual_seed(seed)
    hand = Tiny("hand").to(DT).train()
    sdpa = Tiny("sdpa").to(DT).train()
    sdpa.load_state_dict(hand.state_dict())
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    labels = torch.tensor([0, 2])
    for variant in ("selective", "dual"):
        torch.manual_seed(seed)
        a = fisnet.ISNet(hand, variant)(x, labels).heatmaps
        torch.manual_seed(seed)
        b = fisnet.ISNet(sdpa, variant)(x, labels).heatmaps
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class Misused(nn.Module):
    """q kᵀ used other than as attention scores: each `how` must be refused."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(4, 8)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        t = torch.relu(self.lin(x.flatten(1)).reshape(x.shape[0], 2, 4))
        s = t @ t.transpose(-2, -1)  # (B, 2, 2)
        if self.how == "returned":
            return s.flatten(1)[:, :3]
        if self.how == "relu":
            return self.fc(torch.relu(s).sum(1).repeat(1, 2))
        if self.how == "residual":
            return self.fc((s.sum(-1, keepdim=True) + t).sum(1))
        if self.how == "relu_then_softmax":  # a non-linear op between the product and the softmax
            return self.fc((torch.softmax(torch.relu(s), dim=-1) @ t).sum(1))
        if self.how == "activation_added_then_softmax":  # scores plus another activation
            return self.fc((torch.softmax(s + t[..., :2], dim=-1) @ t).sum(1))
        raise ValueError(self.how)


@pytest.mark.parametrize("how", ["returned", "relu", "residual", "relu_then_softmax", "activation_added_then_softmax"])
def test_scores_used_otherwise_are_refused(how):
    net = Misused(how).to(DT)
    x = torch.rand(2, 1, 2, 2, dtype=DT)
    net(x)  # a valid network
    with pytest.raises(fisnet.UnsupportedActivationError, match="attention scores"):
        fisnet.explain(net, x, 0)
