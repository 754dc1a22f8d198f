"""fisnet's heatmaps against an independent LRP implementation: Zennit 0.5.1, in float64.

Zennit computes relevance with module hooks (its modified gradient *is* the relevance); fisnet
computes a modified gradient G and takes R = a ⊙ G.  The two are configured to the same
conventions (docs/method.md):

| fisnet convention                                  | Zennit rule used here                             |
|----------------------------------------------------|---------------------------------------------------|
| LRP-ε at a conv/linear followed by a ReLU          | `Epsilon(eps)` on that layer                      |
| LRP-0 elsewhere (e.g. the classifier)              | `Epsilon(1e-300)` (no stabiliser in effect)        |
| ReLU: relevance passes (identity rule)             | `Pass()` on nn.ReLU                               |
| max-pooling: winner-take-all                       | no rule (its gradient routes relevance)           |
| average pooling, a residual sum: LRP-0 (linear)    | `Norm()` (proportional split), `zennit.layer.Sum` |
| BatchNorm (eval): folded into the conv before it   | `SequentialMergeBatchNorm` canonizer (BN eps = 0: |
|                                                    | Zennit resets a merged BN to var 1, eps would stay)|
| Zb at every conv/linear reading the input, the     | `ZbBias` below: Zennit's ZBox with the bias split  |
| bias bounded like a pixel (b⁺·l, b⁻·h)             | and scaled by the bounds (ZBox subtracts b⁺, b⁻)  |
| z⁺ (Dual ISNet): W⁺ᵀ(R/(z⁺+ε)), z⁺ = W⁺a + b⁺      | `ZPlusB` below (Zennit's ZPlus also adds b⁻)       |
| explained quantity: the logit z_k                  | grad_outputs = z_k at class k                     |

Zennit's import wants torchvision's ResNet block classes; without torchvision a stand-in module
provides two empty classes (their canonizer is not used here).
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

import fisnet

if "torchvision" not in sys.modules:
    try:
        import torchvision  # noqa: F401
    except ImportError:  # stand-in for the two classes zennit.torchvision imports
        _tv, _models, _resnet = (types.ModuleType(n) for n in
                                 ("torchvision", "torchvision.models", "torchvision.models.resnet"))
        _resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})
        _resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
        _tv.models, _models.resnet = _models, _resnet
        sys.modules.update({"torchvision": _tv, "torchvision.models": _models, "torchvision.models.resnet": _resnet})

from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.core import BasicHook, Composite, ParamMod, Stabilizer, expand  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.rules import Epsilon, Norm, Pass  # noqa: E402

DT = torch.float64
EPS = 0.05
LOW, HIGH = 0.0, 1.0


class ZbBias(BasicHook):
    """Zb with the bias treated as an input fixed at 1, bounded by (low, high)."""

    def __init__(self, low, high, eps):
        stab = Stabilizer.ensure(eps)

        def bounded(clamp, bound):
            return ParamMod(lambda p, name: clamp(p) * (bound if name == "bias" else 1.0), require_params=False)

        super().__init__(
            input_modifiers=[lambda i: i, lambda i: expand(low, i.shape, cut_batch_dim=True).to(i),
                             lambda i: expand(high, i.shape, cut_batch_dim=True).to(i)],
            param_modifiers=[ParamMod(lambda p, name: p, require_params=False),
                             bounded(lambda p: p.clamp(min=0), low), bounded(lambda p: p.clamp(max=0), high)],
            output_modifiers=[lambda o: o] * 3,
            gradient_mapper=lambda g, outs: (g / stab(outs[0] - outs[1] - outs[2]),) * 3,
            reducer=lambda ins, gs: ins[0] * gs[0] - ins[1] * gs[1] - ins[2] * gs[2])


class ZPlusB(BasicHook):
    """z⁺ for non-negative inputs: R_in = a ⊙ W⁺ᵀ(R / (W⁺a + b⁺ + ε))."""

    def __init__(self, eps):
        super().__init__(
            input_modifiers=[lambda i: i],
            param_modifiers=[ParamMod(lambda p, name: p.clamp(min=0), require_params=False)],
            output_modifiers=[lambda o: o],
            gradient_mapper=lambda g, outs: g / (outs[0] + eps),
            reducer=lambda ins, gs: ins[0] * gs[0])


LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def zennit_map(model, x, target, *, zb_names, eps_names, eps=EPS, zplus=False, capture=(), canon=False):
    """Zennit's relevance at the input (and at the outputs of the modules in `capture`)."""
    model = model.eval()

    def rule(ctx, name, module):
        if isinstance(module, nn.ReLU):
            return Pass()
        if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, Sum)):
            return Norm(stabilizer=1e-300)
        if isinstance(module, LINEAR):
            if name in zb_names:
                return ZbBias(LOW, HIGH, eps)
            if zplus:
                return ZPlusB(eps)
            return Epsilon(eps if name in eps_names else 1e-300)
        return None

    comp = Composite(module_map=rule, canonizers=[SequentialMergeBatchNorm()] if canon else None)
    got = {}
    mods = dict(model.named_modules())

    def keep(name):
        def hook(_m, _i, o):
            if o.requires_grad:
                o.register_hook(lambda g: got.__setitem__(name, g))
        return hook

    handles = [mods[n].register_forward_hook(keep(n)) for n in capture]
    xg = x.clone().requires_grad_(True)
    with comp.context(model) as m:
        out = m(xg)
        if zplus:  # the positive-weight logits of every class
            with torch.no_grad():
                fc = m.fc
                seed = nn.functional.linear(m.features(x), fc.weight.clamp(min=0), fc.bias.clamp(min=0))
        else:
            seed = torch.zeros_like(out)
            seed[torch.arange(len(x)), target] = out[torch.arange(len(x)), target]
        (rx,) = torch.autograd.grad(out, xg, seed)
    for h in handles:
        h.remove()
    return rx.detach(), {k: v.detach() for k, v in got.items()}


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------
# models (float64, eval mode, every ReLU an nn.ReLU module so Zennit can hook it)

class Head(nn.Module):
    def __init__(self, cin, k=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(cin, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.fc = nn.Linear(6, k)

    def forward(self, h):
        return self.fc(self.features(h))


def vgg():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 6, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.ReLU(),
                         nn.Linear(8, 4))


def convbn():
    bn1, bn2 = nn.BatchNorm2d(6, eps=0.0), nn.BatchNorm2d(6, eps=0.0)
    for bn in (bn1, bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn1, nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), bn2,
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


class TwoStems(nn.Module):
    """Two stems read the input; their outputs are concatenated (an Inception-like stem)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, padding=2)
        self.ra, self.rb = nn.ReLU(), nn.ReLU()
        self.head = Head(8)

    def forward(self, x):
        return self.head(torch.cat([self.ra(self.a(x)), self.rb(self.b(x))], 1))


class PixelSkipCat(nn.Module):
    """The input is concatenated to a later layer's features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = Head(8)

    def forward(self, x):
        return self.head(torch.cat([self.relu(self.conv1(x)), x], 1))


class PixelSkipAdd(nn.Module):
    """The input is added to a later layer's features (a residual from the pixels)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.sum = Sum()
        self.head = Head(3)

    def forward(self, x):
        return self.head(self.sum(torch.stack([self.relu(self.conv1(x)), x], dim=-1)))


class PaddedStem(nn.Module):
    def __init__(self, **conv):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, **conv)
        self.relu = nn.ReLU()
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.relu(self.conv1(x)))


class Net(nn.Module):
    """features → fc, for the z⁺ comparison (Zennit's seed needs the classifier by name)."""

    def __init__(self, features, fc):
        super().__init__()
        self.features, self.fc = features, fc

    def forward(self, x):
        return self.fc(self.features(x))


CASES = {
    # name: (model factory, Zb layers, ε layers (followed by a ReLU), Zennit canonizer)
    "vgg": (vgg, ["0"], ["3", "7"], False),
    "conv_bn": (convbn, ["0"], ["3"], True),
    "two_stems": (TwoStems, ["a", "b"], ["head.features.0"], False),
    "pixel_skip_cat": (PixelSkipCat, ["conv1"], ["head.features.0"], False),
    "pixel_skip_add": (PixelSkipAdd, ["conv1"], ["head.features.0"], False),
    "same_even_kernel": (lambda: PaddedStem(kernel_size=4, padding="same"), ["conv1"], ["head.features.0"], False),
    "same_odd_kernel": (lambda: PaddedStem(kernel_size=3, padding="same", dilation=2), ["conv1"],
                        ["head.features.0"], False),
    "valid": (lambda: PaddedStem(kernel_size=3, padding="valid"), ["conv1"], ["head.features.0"], False),
    "tuple_padding": (lambda: PaddedStem(kernel_size=(3, 5), padding=(1, 2), stride=(1, 2)), ["conv1"],
                      ["head.features.0"], False),
    "reflect": (lambda: PaddedStem(kernel_size=3, padding=1, padding_mode="reflect"), ["conv1"],
                ["head.features.0"], False),
    "circular": (lambda: PaddedStem(kernel_size=3, padding=2, padding_mode="circular"), ["conv1"],
                 ["head.features.0"], False),
    "replicate": (lambda: PaddedStem(kernel_size=3, padding=1, padding_mode="replicate"), ["conv1"],
                  ["head.features.0"], False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_input_map_matches_zennit(case, seed):
    factory, zb_names, eps_names, canon = CASES[case]
    torch.manual_seed(seed)
    model = factory().to(DT).eval()
    x = torch.rand(3, 3, 16, 16, dtype=DT)
    target = torch.tensor([0, 1, 3])
    ours = fisnet.explain(model, x, target, eps=EPS, bounds=(LOW, HIGH))[:, 0]
    theirs, _ = zennit_map(model, x, target, zb_names=zb_names, eps_names=eps_names, canon=canon)
    assert ours.shape == theirs.shape
    assert rel(ours, theirs) < 1e-11, (case, rel(ours, theirs))


def test_second_stem_counts(seed):
    """Tripling the second stem's weights changes the map (its path's relevance is not dropped),
    and as ε → 0 with bias-free layers Σ R tracks the logit."""
    torch.manual_seed(seed)
    model = TwoStems().to(DT).eval()
    for m in model.modules():
        if isinstance(m, LINEAR):
            m.bias = None
    x = torch.rand(2, 3, 16, 16, dtype=DT)
    r = fisnet.explain(model, x, 0, eps=1e-12, bounds=(LOW, HIGH))
    logit = model(x)[:, 0]
    torch.testing.assert_close(r.sum((1, 2, 3, 4)), logit, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        model.b.weight.mul_(3)
    r3 = fisnet.explain(model, x, 0, eps=1e-12, bounds=(LOW, HIGH))
    assert not torch.allclose(r, r3)
    torch.testing.assert_close(r3.sum((1, 2, 3, 4)), model(x)[:, 0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["pixel_skip_cat", "pixel_skip_add"])
def test_pixel_skip_conserves(case, seed):
    torch.manual_seed(seed)
    model = CASES[case][0]().to(DT).eval()
    for m in model.modules():
        if isinstance(m, LINEAR):
            m.bias = None
    x = torch.rand(2, 3, 16, 16, dtype=DT)
    r = fisnet.explain(model, x, 1, eps=1e-12, bounds=(LOW, HIGH))
    torch.testing.assert_close(r.sum((1, 2, 3, 4)), model(x)[:, 1], rtol=1e-8, atol=1e-10)


def test_dual_zplus_map_matches_zennit(seed):
    """The Dual ISNet's z⁺ map at the input and at an LDS conv followed by BatchNorm."""
    torch.manual_seed(seed)
    feats = convbn()
    fc = feats[-1]
    model = Net(feats[:-1], fc).to(DT).eval()
    x = torch.rand(3, 3, 16, 16, dtype=DT)
    for batched in (False, True):
        net = fisnet.ISNet(model, "dual", eps=EPS, bounds=(LOW, HIGH), lds_layers=["features.3", "features.5"],
                           dual_batched=batched)
        out = net(x, heatmaps=True, create_graph=False).heatmaps
        theirs, hidden = zennit_map(model, x, None, zb_names=["features.0"], eps_names=[], zplus=True,
                                    capture=["features.3", "features.5"], canon=True)
        assert rel(out["input"][:, 1], theirs) < 1e-11
        zp_conv = out["features.3"][:, 1]
        assert float(zp_conv.abs().max()) > 0, "the z⁺ map at a conv followed by BatchNorm is all zeros"
        assert bool((zp_conv >= -1e-12).all())
        # Zennit's relevance at the merged conv's output is that of the folded layer's neurons
        assert rel(zp_conv, hidden["features.3"]) < 1e-11
        assert rel(out["features.5"][:, 1], hidden["features.5"]) < 1e-11


if __name__ == "__main__":  # the table of the issue-8 note: python tests/fisnet/test_lrp_zennit.py
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16, dtype=DT)
    target = torch.tensor([0, 1, 3])
    print("| model | fisnet vs Zennit, max relative error |\n|---|---|")
    for case in sorted(CASES):
        factory, zb_names, eps_names, canon = CASES[case]
        torch.manual_seed(1)
        model = factory().to(DT).eval()
        try:
            ours = fisnet.explain(model, x, target, eps=EPS, bounds=(LOW, HIGH))[:, 0]
            theirs, _ = zennit_map(model, x, target, zb_names=zb_names, eps_names=eps_names, canon=canon)
            print(f"| {case} | {rel(ours, theirs):.1e} |")
        except Exception as e:  # noqa: BLE001
            print(f"| {case} | fails: {type(e).__name__}: {str(e)[:80]} |")
    torch.manual_seed(1)
    feats = convbn()
    model = Net(feats[:-1], feats[-1]).to(DT).eval()
    theirs, hidden = zennit_map(model, x, None, zb_names=["features.0"], eps_names=[], zplus=True,
                                capture=["features.3"], canon=True)
    for batched in (False, True):
        try:
            net = fisnet.ISNet(model, "dual", eps=EPS, bounds=(LOW, HIGH), lds_layers=["features.3"],
                               dual_batched=batched)
            out = net(x, heatmaps=True, create_graph=False).heatmaps
            print(f"| dual z⁺ LDS at conv+BN ({'one pass' if batched else 'two passes'}) | "
                  f"{rel(out['features.3'][:, 1], hidden['features.3']):.1e} |")
        except Exception as e:  # noqa: BLE001
            print(f"| dual z⁺ LDS at conv+BN | fails: {type(e).__name__}: {str(e)[:80]} |")


# ---------------------------------------------------------------------------------------------
# An LDS layer whose output a later op modifies in place (issue 8, item 2)

class Block(nn.Module):
    """A torchvision-style BasicBlock: `out += identity` modifies bn2's output in place."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.inplace = inplace

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.relu(out)


class ResNetLike(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.block = Block(inplace)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.block(self.relu(self.stem(x))))


@pytest.mark.parametrize("variant", ["explain", "dual"])
def test_lds_output_modified_in_place(variant, seed):
    """The map at `block.bn2` (then `out += identity`) and at `block.bn1` (then an in-place ReLU)
    is that of the tensor the layer returned: equal to the same network written out of place."""
    torch.manual_seed(seed)
    a = ResNetLike(inplace=True).to(DT)
    b = ResNetLike(inplace=False).to(DT)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        for bn in (m.block.bn1, m.block.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
        m.load_state_dict(a.state_dict())
        m.eval()
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    layers = ["block.bn2", "block.bn1", "block"]
    if variant == "explain":
        ra = fisnet.explain(a, x, "all", layers=layers)
        rb = fisnet.explain(b, x, "all", layers=layers)
    else:
        ra = fisnet.ISNet(a, "dual", lds_layers=layers)(x, heatmaps=True).heatmaps
        rb = fisnet.ISNet(b, "dual", lds_layers=layers)(x, heatmaps=True).heatmaps
    for k in ["input"] + layers:
        torch.testing.assert_close(ra[k], rb[k], rtol=1e-12, atol=1e-14)
    # and not the relevance of the modified tensor (what the in-place op produced)
    assert not torch.allclose(ra["block.bn2"], rb["block"])


def test_lds_in_place_training_gradient(seed):
    """The LDS map of an in-place-modified output stays differentiable in the weights."""
    torch.manual_seed(seed)
    a = ResNetLike(inplace=True).to(DT).eval()
    b = ResNetLike(inplace=False).to(DT).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    grads = []
    for m in (a, b):
        r = fisnet.explain(m, x, layers=["block.bn2"], create_graph=True)["block.bn2"]
        grads.append(torch.autograd.grad(r.square().sum(), m.block.conv2.weight)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-11, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Non-linear ops without a rule are refused, not treated as linear (issue 8, item 3; LayerNorm,
# GroupNorm and InstanceNorm, refused until the rule table gave them a rule, are in test_rules.py)

class Wrap(nn.Module):
    def __init__(self, fn, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.fn = fn
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))

    def forward(self, x):
        return self.head(self.fn(torch.relu(self.conv(x))))


def _hand_attention(h):
    q = h.flatten(2).transpose(1, 2)
    a = (q @ q.transpose(1, 2)).div(2.0)
    return (a @ q).transpose(1, 2).reshape(h.shape)


REFUSED = {
    "F.softmax": lambda h: nn.functional.softmax(h, dim=1),
    "torch.softmax": lambda h: torch.softmax(h, 1),
    "Tensor.softmax": lambda h: h.softmax(1),
    "F.log_softmax": lambda h: nn.functional.log_softmax(h, dim=1),
    "F.normalize": lambda h: nn.functional.normalize(h, dim=1),
    "a product of two activations (hand-written attention)": _hand_attention,
    "a gate": lambda h: h * h.mean((2, 3), keepdim=True),
    "a division by an activation": lambda h: h / (h.sum(1, keepdim=True) + 1),
    "clamp (a ReLU written as clamp)": lambda h: (h - 0.5).clamp(min=0),
    "torch.maximum": lambda h: torch.maximum(h, h.flip(1)),
    "exp": torch.exp,
    "tanh": torch.tanh,
    "a sigmoid not used as a gate": lambda h: torch.sigmoid(h) + h,
    "an unlisted function (torch.cummax)": lambda h: torch.cummax(h, 1).values,
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_nonlinear_without_rule_is_refused(name):
    fn = REFUSED[name]
    model = Wrap(fn if not isinstance(fn, nn.Module) else fn).to(DT)
    x = torch.rand(2, 3, 6, 6, dtype=DT)
    model(x)  # materialise the lazy layer; the model itself runs
    with pytest.raises(fisnet.UnsupportedActivationError) as err:
        fisnet.explain(model, x)
    msg = str(err.value)
    assert "fisnet" in msg and ("rule" in msg or "register_linear" in msg)
    with pytest.raises(fisnet.UnsupportedActivationError):
        fisnet.ISNet(model, "selective").train()(x)


def test_linear_ops_are_accepted_and_register_linear(seed):
    """Functions that are linear in the input-dependent tensor pass (a product with a parameter,
    a division by a constant, interpolation, padding); an unlisted one passes once registered."""
    torch.manual_seed(seed)
    scale = nn.Parameter(torch.rand(1, 4, 1, 1, dtype=DT))

    def linear_mix(h):
        h = nn.functional.interpolate(h * scale / 3.0, scale_factor=2, mode="bilinear")
        return nn.functional.avg_pool2d(nn.functional.pad(h, (1, 1, 1, 1)), 2)[..., :6, :6]

    model = Wrap(linear_mix).to(DT)
    x = torch.rand(2, 3, 6, 6, dtype=DT)
    model(x)
    r = fisnet.explain(model, x, eps=0.0, zb=False)
    # ε = 0, Zb off: gradient × input
    xg = x.clone().requires_grad_(True)
    logit = model(xg).gather(1, model(x).argmax(1, keepdim=True)).sum()
    torch.testing.assert_close(r[:, 0], torch.autograd.grad(logit, xg)[0] * x, rtol=1e-10, atol=1e-12)

    shift = Wrap(lambda h: torch.fft.fftshift(h, dim=(2, 3))).to(DT)  # a permutation: linear, but unlisted
    shift(x)
    with pytest.raises(fisnet.UnsupportedActivationError, match="fftshift.*register_linear"):
        fisnet.explain(shift, x)
    fisnet.register_linear(torch.fft.fftshift)
    try:
        r = fisnet.explain(shift, x, eps=0.0, zb=False)
    finally:
        fisnet.optable.LINEAR.pop(torch.fft.fftshift)
    xg = x.clone().requires_grad_(True)
    logit = shift(xg).gather(1, shift(x).argmax(1, keepdim=True)).sum()
    torch.testing.assert_close(r[:, 0], torch.autograd.grad(logit, xg)[0] * x, rtol=1e-10, atol=1e-12)
