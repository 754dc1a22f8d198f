"""The Dual ISNet's z⁺ map on networks whose activations can be negative (GELU, SiLU, LayerNorm,
attention): it keeps its sign and, bias-free as ε → 0, conserves the positive-weight logits.

Oracles written here: the z⁺ seed Σ_k z⁺_k = Σ_k Σ_j (w_kj a_j)⁺ of the classifier computed by hand
from its input (a forward hook), and the sign of every map.  Also: the two-slot pass equals the two
passes on the backbones with squeeze-excitation (it used to crash there), and the Dual's ε map is the
LRP-ε map of Σ_k z_k computed without z⁺ taps.
"""
from __future__ import annotations

import contextlib

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


def test_zplus_pass_remakes_its_folded_weights(monkeypatch, seed):
    """The z⁺ pass's signed folded weights W'± are saved as recipes and remade in the training step's
    backward (zplus._RemadeWeights): the Dual step's maps and weight gradients equal those with the
    weights kept; with remaking no weight-shaped tensor but the parameters themselves is saved by the
    step's graph, without it the W'± are (the check can fail); an optimizer step between the maps and
    the backward is named."""
    import fisnet.zplus as zplus
    torch.manual_seed(seed % 1000)
    model = models.resnet18(num_classes=4).to(DT).train()
    x = torch.rand(2, 3, 32, 32, dtype=DT)
    masks = torch.zeros(2, 1, 32, 32, dtype=DT)
    masks[..., 8:24, 8:24] = 1
    y = torch.tensor([0, 3])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    # the Zb rule's stacked first-layer weights (both maps) are not the z⁺ pass's: left out of the check
    shapes = {tuple(p.shape) for p in params if p.dim() > 1} - {tuple(model.conv1.weight.shape)}
    ptrs = {p.data_ptr() for p in params}
    results = []
    for remake in (True, False):
        if not remake:
            monkeypatch.setattr(zplus, "_remade_weights", contextlib.nullcontext)
        model.load_state_dict(state)
        kept = []

        def pack(t):  # every tensor the graph saves, but those the z⁺ pass's own hooks pack as recipes
            if tuple(t.shape) in shapes and t.data_ptr() not in ptrs:
                kept.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fisnet.ISNet(model, "dual", dual_batched=False)(x, y)
            loss = (out.heatmaps * (1 - masks.unsqueeze(1))).abs().sum() + F.cross_entropy(out.logits, y)
        assert (not kept) if remake else kept, kept[:5]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((out.heatmaps.detach(), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]))
    (h0, g0), (h1, g1) = results
    torch.testing.assert_close(h0, h1, rtol=0, atol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    monkeypatch.undo()
    model.load_state_dict(state)
    out = fisnet.ISNet(model, "dual", dual_batched=False)(x, y)
    with torch.no_grad():
        model.layer4[1].conv2.weight.mul_(1.01)  # a parameter changed in place before the backward
    with pytest.raises(RuntimeError, match="modified in place"):
        (out.heatmaps.abs().sum() + out.logits.sum()).backward()


class _InplaceNet(nn.Module):
    """conv-BN-ReLU, conv-BN-(in-place op)-ReLU, residual sum, pooling, linear: `how` picks what the
    forward does to the tapped BatchNorm outputs, in place or out of place (the same values)."""

    def __init__(self, how: str, inplace: bool):
        super().__init__()
        self.how, self.inplace = how, inplace
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        ip = self.inplace
        a = F.relu(self.b1(self.c1(x)), inplace=ip)
        z = self.b2(self.c2(a))
        extra = 0.0
        if self.how == "scale":  # a linear in-place op before the ReLU: its z⁺ value must be kept
            z = z.mul_(0.5) if ip else z * 0.5
        elif self.how == "read":  # z read before the in-place ReLU: the ReLU's output cannot stand in
            extra = (z * 0.5).mean(dim=(1, 2, 3), keepdim=True)  # (a mean of z itself would keep z)
        elif self.how == "sum":  # z a summand of an out-of-place residual sum, then rectified in place
            s = z + a
            extra = s.mean(dim=(1, 2, 3), keepdim=True)
        z = F.relu(z, inplace=ip)
        u = self.c3(z)
        u = u.mul_(2.0) if ip else u * 2.0  # a linear in-place op on a conv output without BatchNorm
        u = F.relu(u, inplace=ip)
        out = F.adaptive_avg_pool2d(u + z, 1) + extra
        return self.fc(out.flatten(1))


@pytest.mark.parametrize("how", ["relu", "scale", "read", "sum"])
@pytest.mark.parametrize("batched", [False, True])
def test_inplace_ops_on_tapped_outputs_keep_the_zplus_values(how, batched, seed):
    """The z⁺ taps keep no copy of a layer's output but read it back from the tensor the forward went
    on with (copy-on-write before an in-place op; an in-place ReLU's output standing in for the
    numerator where that is exact): the Dual maps and the weight gradients of a training loss equal
    those of the same network written out of place, for in-place ReLUs, an in-place linear op, a read
    before the ReLU and a residual summand rectified in place afterwards."""
    torch.manual_seed(seed % 1000)
    x = torch.rand(4, 3, 8, 8, dtype=DT)
    masks = torch.zeros(4, 1, 8, 8, dtype=DT)
    masks[..., 2:6, 2:6] = 1
    y = torch.tensor([0, 1, 2, 0])
    nets = [_InplaceNet(how, ip).to(DT).train() for ip in (True, False)]
    nets[1].load_state_dict(nets[0].state_dict())
    results = []
    for net in nets:
        out = fisnet.ISNet(net, "dual", dual_batched=batched)(x, y)
        loss = (out.heatmaps * (1 - masks.unsqueeze(1))).abs().sum() + F.cross_entropy(out.logits, y)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        results.append((out.heatmaps.detach(), grads))
    (h0, g0), (h1, g1) = results
    assert h0[:, 1].abs().sum() > 0
    torch.testing.assert_close(h0, h1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)


def test_a_lost_layer_value_is_named(seed):
    """A record whose output was changed in place with no copy kept (an op the trace did not see)
    refuses to hand out a value rather than a wrong one."""
    from fisnet.zplus import LayerRecord
    t = torch.rand(2, 3)
    rec = LayerRecord(layer=None, input=t, tapped=t, tap_version=t._version)
    assert rec.value("conv") is t
    t.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        rec.value("conv")


class _ShiftNet(nn.Module):
    """A ReLU output pooled, and one shifted in place after its ReLU (so signed) before a conv."""

    def __init__(self, shift: bool):
        super().__init__()
        self.shift = shift
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a = F.max_pool2d(F.relu(self.c1(x)), 2)
        b = F.relu(self.c2(a))
        if self.shift:
            b.sub_(0.3)  # after the ReLU (which kept its input, not b): no longer ≥ 0
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c3(b)), 1).flatten(1))


@pytest.mark.parametrize("shift", [False, True])
def test_known_nonnegative_inputs_are_not_read(shift, monkeypatch, seed):
    """A Dual trace knows a conv's input is ≥ 0 when it is a ReLU's output or a pooling of one, unchanged
    since (no pass over it, no host synchronisation on GPUs); an input changed in place after its ReLU
    is read. The maps equal those of a trace that reads every input's sign."""
    import fisnet.lrp as lrp
    from torch.utils._python_dispatch import TorchDispatchMode
    torch.manual_seed(seed % 1000)
    net = _ShiftNet(shift).to(DT)
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    reads = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.lt.Scalar:
                reads.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with Spy():
        t = trace(net, x, zplus=True)
    assert reads == ([(2, 3, 8, 8)] + ([(2, 4, 4, 4)] if shift else []))  # the image (and the shifted input)
    maps = t.relevance_zplus()["input"]
    monkeypatch.setattr(lrp._Interceptor, "_known_nonneg", lambda self, t: False)
    ref = trace(net, x, zplus=True).relevance_zplus()["input"]
    torch.testing.assert_close(maps, ref)


def test_zplus_tap_is_an_inplace_identity(seed):
    """The z⁺ tap makes no copy of a layer's output (an in-place identity: the same storage, a new
    version), but for a view, which it copies; in the ordinary backward it passes the gradient."""
    import fisnet_ext
    from fisnet.zplus import LayerRecord, ZPlusTap
    sw = fisnet_ext.HeatmapSwitch()
    a = torch.rand(2, 3, dtype=DT, requires_grad=True)
    rec = LayerRecord(layer=None, input=a)
    z = a * 2.0
    ptr, v = z.data_ptr(), z._version
    out = ZPlusTap.apply(z, a, rec, "conv", sw, 0.1)
    assert out.data_ptr() == ptr and out._version > v
    (g,) = torch.autograd.grad(out.sum(), a)
    torch.testing.assert_close(g, torch.full_like(a, 2.0))
    base = a * 3.0
    view = base[:, :2]
    out = ZPlusTap.apply(view, a, rec, "conv", sw, 0.1)
    assert out.data_ptr() != view.data_ptr()
    torch.testing.assert_close(out, view)
