"""fisnet.explain / fisnet.trace and docs/spec.md §7 invariants 1-4, 6 and 9 on small CNNs, a
torchvision-style ResNet, an MLP and a model with functional ReLUs.

Oracles written here, independent of the library: gradient × input on the plain model
(autograd), a hand-written per-layer LRP-ε for nn.Sequential nets, and a dense-matrix Zb rule.
Everything runs in float64 on tiny shapes.
"""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fisnet
from fisnet.rules import LinearLayer, fold_batchnorm, zb_relevance

DT = torch.float64


# Tiny nets gain nothing from intra-op threads (the fixture: tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Models
def cnn(bn=False, bias=True, cin=2, classes=3, pool="max"):
    """conv-(bn)-relu-pool-conv-relu-avgpool-flatten-linear on 8x8 inputs."""
    layers = [nn.Conv2d(cin, 4, 3, padding=1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2),
               nn.Conv2d(4, 5, 3, padding=1, bias=bias), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
               nn.Linear(5 * 2 * 2, classes, bias=bias)]
    return randomise_bn(nn.Sequential(*layers).to(DT))


def mlp(bias=True, din=6, classes=3):
    return nn.Sequential(nn.Linear(din, 8, bias=bias), nn.ReLU(), nn.Linear(8, 7, bias=bias), nn.ReLU(),
                         nn.Linear(7, classes, bias=bias)).to(DT)


def randomise_bn(model, zero_shift=False):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                if zero_shift:
                    m.running_mean.zero_()
                    m.bias.zero_()
                else:
                    m.running_mean.normal_(0, 0.3)
                    m.bias.normal_(0, 0.3)
    return model


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module (inplace) called twice, `out += identity`."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TinyResNet(nn.Module):
    def __init__(self, cin=3, classes=3, fc_bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(4, 4))
        self.layer2 = nn.Sequential(BasicBlock(4, 6, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes, bias=fc_bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(zero_shift=False, fc_bias=True):
    return randomise_bn(TinyResNet(fc_bias=fc_bias).to(DT), zero_shift).eval()


class FunctionalNet(nn.Module):
    """ReLUs as F.relu, torch.relu and Tensor.relu calls (no ReLU modules)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2)
        x = torch.relu(self.conv2(x))
        x = self.fc1(x.flatten(1)).relu()
        return self.fc2(x)

    def as_sequential(self):
        seq = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                            nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
        for i, src in zip((0, 3, 6, 8), (self.conv1, self.conv2, self.fc1, self.fc2)):
            seq[i].load_state_dict(src.state_dict())
        return seq


def images(b=3, c=2, h=8, w=8):
    return torch.rand(b, c, h, w, dtype=DT)


# ---------------------------------------------------------------------------------------------
# Oracles
def grad_x_input(model, x, target):
    """Gradient × input of the plain model, (B, M, ...)."""
    xi = x.detach().clone().requires_grad_()
    logits = model(xi)
    if isinstance(target, str):
        maps = [torch.autograd.grad(logits[:, k].sum(), xi, retain_graph=True)[0] * xi.detach()
                for k in range(logits.shape[1])]
        return torch.stack(maps, 1)
    if target is None:
        target = logits.argmax(1)
    q = logits.gather(1, torch.as_tensor(target).reshape(-1, 1).expand(x.shape[0], 1)).sum()
    return (torch.autograd.grad(q, xi)[0] * xi.detach()).unsqueeze(1)


def hand_lrp(seq, x, target, eps):
    """Textbook LRP for an nn.Sequential: ε-rule at conv/linear layers followed by a ReLU,
    LRP-0 at the other conv/linear layers and at average pooling, winner-take-all at max
    pooling.  Returns {module index: relevance at its output (B, 1, ...)}, index -1 = input."""
    acts = [x]
    for m in seq:
        acts.append(m(acts[-1]))
    logits = acts[-1]
    B = x.shape[0]
    R = torch.zeros_like(logits)
    R[torch.arange(B), target] = logits[torch.arange(B), target]
    rel = {len(seq) - 1: R}
    for i in reversed(range(len(seq))):
        m, a, z = seq[i], acts[i], acts[i + 1]
        relu_next = i + 1 < len(seq) and isinstance(seq[i + 1], nn.ReLU)
        if isinstance(m, nn.ReLU):
            R = R
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            if relu_next:
                s = torch.where(z > 0, R / (z + eps), torch.zeros_like(z))
            else:
                s = torch.where(z != 0, R / torch.where(z != 0, z, torch.ones_like(z)), torch.zeros_like(z))
            if isinstance(m, nn.Linear):
                c = s @ m.weight
            else:
                c = torch.nn.grad.conv2d_input(list(a.shape), m.weight, s, m.stride, m.padding, m.dilation,
                                               m.groups)
            R = a * c
        elif isinstance(m, nn.MaxPool2d):
            ai = a.detach().requires_grad_()
            R = torch.autograd.grad(m(ai), ai, R)[0]
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            s = torch.where(z != 0, R / torch.where(z != 0, z, torch.ones_like(z)), torch.zeros_like(z))
            ai = a.detach().requires_grad_()
            R = a * torch.autograd.grad(m(ai), ai, s)[0]
        elif isinstance(m, nn.Flatten):
            R = R.reshape(a.shape)
        else:
            raise NotImplementedError(type(m))
        rel[i - 1] = R
    return {k: v.detach().unsqueeze(1) for k, v in rel.items()}


def dense(fn, shape1):
    """The matrix of a linear map `fn` on single inputs of shape `shape1` (batch 1)."""
    n_in = 1
    for d in shape1:
        n_in *= d
    basis = torch.eye(n_in, dtype=DT).reshape((n_in,) + tuple(shape1))
    with torch.no_grad():
        return fn(basis).reshape(n_in, -1).T.contiguous()  # column j = fn(e_j)


def zb_dense(fn_nobias, bias_out, x, r_out, low, high, eps):
    """The Zb rule of docs/spec.md §2.1 with the layer as a dense matrix.  fn_nobias: the layer without
    bias on (1, *x.shape[1:]); bias_out: the bias broadcast to one output (or None); low/high:
    bounds broadcastable to x[:1]; the bias bounds are (min low, max high).  -> (B, M, ...)"""
    W = dense(fn_nobias, x.shape[1:])
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    lo = low.expand_as(x[:1]).reshape(-1)
    hi = high.expand_as(x[:1]).reshape(-1)
    lb, hb = float(low.min()), float(high.max())
    b = torch.zeros(W.shape[0], dtype=DT) if bias_out is None else bias_out.reshape(-1)
    out = []
    for i in range(x.shape[0]):
        xv = x[i].reshape(-1)
        z = W @ xv + b - (Wp @ lo + b.clamp(min=0) * lb) - (Wn @ hi + b.clamp(max=0) * hb)
        z = z + eps * torch.where(z >= 0, 1.0, -1.0).to(DT)
        maps = []
        for m in range(r_out.shape[1]):
            s = r_out[i, m].reshape(-1) / z
            maps.append((xv * (W.T @ s) - lo * (Wp.T @ s) - hi * (Wn.T @ s)).reshape(x.shape[1:]))
        out.append(torch.stack(maps))
    return torch.stack(out)


def conv_fn(conv):
    return lambda a: F.conv2d(a, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_bias_out(conv, bias, x):
    """A per-channel bias broadcast to the conv's output of one image."""
    o = conv_fn(conv)(x[:1])
    return bias.reshape(1, -1, 1, 1).expand_as(o)


def close(a, b, rtol=1e-10, atol=1e-12, msg=""):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=(lambda m: f"{msg}: {m}") if msg else None)


# ---------------------------------------------------------------------------------------------
# Invariant 1: eps = 0, Zb off -> gradient × input
def live(factory, x):
    """A freshly drawn model in which every image has a non-zero gradient × input for every
    class (tiny random nets can be entirely dead, which would make some checks vacuous)."""
    for _ in range(200):
        model = factory()
        if bool((grad_x_input(model, x, "all").flatten(2).abs().sum(-1) > 0).all()):
            return model, x
    raise AssertionError("could not draw a live model")


MODELS_INV1 = {
    "cnn": lambda: live(cnn, images()),
    "cnn_bn": lambda: live(lambda: randomise_bn(cnn(bn=True)).eval(), images()),
    "cnn_avg": lambda: live(lambda: cnn(pool="avg"), images()),
    "mlp": lambda: live(mlp, torch.rand(3, 6, dtype=DT)),
    "resnet": lambda: live(resnet, images(c=3)),
    "functional": lambda: live(lambda: FunctionalNet().to(DT), images()),
}


@pytest.mark.parametrize("model_name", list(MODELS_INV1))
@pytest.mark.parametrize("target", ["none", "tensor", "all"])
def test_inv1_gradient_times_input(model_name, target, seed):
    model, x = MODELS_INV1[model_name]()
    tgt = {"none": None, "tensor": torch.tensor([2, 0, 1]), "all": "all"}[target]
    maps = fisnet.explain(model, x, tgt, eps=0.0, zb=False)
    want = grad_x_input(model, x, tgt)
    M = 3 if target == "all" else 1
    assert maps.shape == (x.shape[0], M) + tuple(x.shape[1:])
    assert maps.dtype == DT and not maps.requires_grad
    close(maps, want)
    assert maps.abs().sum() > 0


def test_inv1_predicted_class_is_default(seed):
    model, x = live(cnn, images())
    pred = model(x).argmax(1)
    close(fisnet.explain(model, x, eps=0.1), fisnet.explain(model, x, pred, eps=0.1), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Invariant 2: eps > 0 -> hand-written LRP-ε
SEQ_MODELS = {
    "mlp": lambda: live(mlp, torch.rand(3, 6, dtype=DT)),
    "cnn_max": lambda: live(cnn, images()),
    "cnn_avg": lambda: live(lambda: cnn(pool="avg"), images()),
}


@pytest.mark.parametrize("model_name", list(SEQ_MODELS))
@pytest.mark.parametrize("eps", [1e-2, 0.5, 3.0])
def test_inv2_hand_written_lrp_eps(model_name, eps, seed):
    model, x = SEQ_MODELS[model_name]()
    target = torch.tensor([0, 2, 1])
    want = hand_lrp(model, x, target, eps)[-1]
    got = fisnet.explain(model, x, target, eps=eps, zb=False)
    close(got, want)
    # eps matters: it is not gradient × input
    assert not torch.allclose(got, grad_x_input(model, x, target), rtol=1e-6, atol=1e-9)


def test_inv2_functional_relus_match_modules(seed):
    fnet = FunctionalNet().to(DT)
    seq = fnet.as_sequential()
    x = images()
    t = torch.tensor([1, 1, 2])
    close(fnet(x), seq(x), rtol=0, atol=0)
    for kw in (dict(eps=0.3, zb=False), dict(eps=0.05, zb=True), dict(eps=0.0, zb=True)):
        close(fisnet.explain(fnet, x, t, **kw), fisnet.explain(seq, x, t, **kw), rtol=1e-12, atol=1e-14,
              msg=str(kw))
    close(fisnet.explain(seq, x, t, eps=0.3, zb=False), hand_lrp(seq, x, t, 0.3)[-1])


@pytest.mark.parametrize("model_name", list(SEQ_MODELS))
def test_hidden_layers_match_hand_lrp(model_name, seed):
    model, x = SEQ_MODELS[model_name]()
    target = torch.tensor([1, 0, 2])
    eps = 0.2
    # relevance at ReLU and pooling outputs (at a conv directly followed by a ReLU, LRP-Flex's
    # a ⊙ G is taken before the ReLU's factor, which is not LRP's R there)
    names = [str(i) for i, m in enumerate(model) if isinstance(m, (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d))]
    out = fisnet.explain(model, x, target, eps=eps, zb=False, layers=names)
    assert isinstance(out, dict) and set(out) == {"input", *names}
    want = hand_lrp(model, x, target, eps)
    close(out["input"], want[-1])
    close(out["input"], fisnet.explain(model, x, target, eps=eps, zb=False), rtol=1e-13, atol=1e-15)
    for n in names:
        close(out[n], want[int(n)], msg=f"layer {n}")


def lrp_factor_copy(model, eps):
    """A copy of `model` with every nn.ReLU replaced by fisnet_ext.LRPReLU (no switch: always
    the LRP factor), so plain autograd gives the modified gradient."""
    import copy

    import fisnet_ext

    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(mod, cname, fisnet_ext.LRPReLU(eps=eps))
    return m


def test_hidden_layers_resnet_are_a_times_G(seed):
    model, x = live(resnet, images(c=3))
    eps = 0.1
    target = torch.tensor([2, 1, 0])
    names = ["layer1", "layer2.0", "maxpool", "avgpool"]
    out = fisnet.explain(model, x, target, eps=eps, zb=False, layers=names)
    assert list(out)[0] == "input" and set(out) == {"input", *names}
    # by hand: the LRP-factor model, forward hooks, autograd
    m2 = lrp_factor_copy(model, eps)
    acts = {}
    hs = [dict(m2.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o))
          for n in names]
    xi = x.clone().requires_grad_()
    logits = m2(xi)
    for h in hs:
        h.remove()
    q = logits.gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(q, [xi] + [acts[n] for n in names])
    close(out["input"], (xi * grads[0]).detach().unsqueeze(1))
    for n, g in zip(names, grads[1:]):
        assert out[n].shape == (3, 1) + tuple(acts[n].shape[1:])
        close(out[n], (acts[n] * g).detach().unsqueeze(1), msg=n)


def test_hidden_layers_with_target_all_and_zb(seed):
    model, x = live(lambda: cnn(bn=True).eval(), images())
    out = fisnet.explain(model, x, "all", eps=0.1, zb=True, layers=["3"])
    for k in range(3):
        one = fisnet.explain(model, x, k, eps=0.1, zb=True, layers=["3"])
        close(out["input"][:, k:k + 1], one["input"], rtol=1e-12, atol=1e-14)
        close(out["3"][:, k:k + 1], one["3"], rtol=1e-12, atol=1e-14)


def test_unknown_layer_name_lists_similar(seed):
    model, x = resnet(), images(c=3)
    with pytest.raises(KeyError, match="similar names") as ei:
        fisnet.explain(model, x, layers=["layer1.00"])
    assert "layer1.0" in str(ei.value)
    with pytest.raises(KeyError, match="no module named 'nothing_like_it'"):
        fisnet.explain(model, x, layers=["nothing_like_it"])


# ---------------------------------------------------------------------------------------------
# Invariant 3: conservation in bias-free nets
@pytest.mark.parametrize("model_name", ["mlp", "cnn_max", "cnn_avg", "resnet"])
def test_inv3_conservation_bias_free(model_name, seed):
    if model_name == "mlp":
        model, x = live(lambda: mlp(bias=False), torch.rand(3, 6, dtype=DT))
    elif model_name == "resnet":
        model, x = live(lambda: resnet(zero_shift=True, fc_bias=False), images(c=3))
    else:
        model, x = live(lambda: cnn(bias=False, pool=model_name[4:]), images())
    logits = model(x).detach()
    maps = fisnet.explain(model, x, "all", eps=0.0, zb=False)
    close(maps.flatten(2).sum(-1), logits, rtol=1e-10, atol=1e-12)
    # with eps > 0 relevance is absorbed: not conserved
    maps_eps = fisnet.explain(model, x, "all", eps=1.0, zb=False)
    assert not torch.allclose(maps_eps.flatten(2).sum(-1), logits, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_name", ["mlp_flat", "cnn", "resnet"])
def test_inv3_conservation_with_zb(model_name, seed):
    """Zb with zero bias and no stabiliser (explain's eps is also Zb's) conserves too."""
    if model_name == "mlp_flat":
        model, x = live(lambda: nn.Sequential(nn.Flatten(), mlp(bias=False, din=2 * 4 * 4)), images(c=2, h=4, w=4))
    elif model_name == "resnet":
        model, x = live(lambda: resnet(zero_shift=True, fc_bias=False), images(c=3))
    else:
        model, x = live(lambda: cnn(bias=False), images())
    logits = model(x).detach()
    maps = fisnet.explain(model, x, "all", eps=0.0, zb=True)
    assert maps.shape == (x.shape[0], 3) + tuple(x.shape[1:])
    close(maps.flatten(2).sum(-1), logits, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Invariant 4: batch independence in eval mode; "all" = each class
@pytest.mark.parametrize("model_name", ["cnn_bn", "resnet", "mlp"])
@pytest.mark.parametrize("zb", [False, True], ids=["nozb", "zb"])
def test_inv4_batch_independence_and_all(model_name, zb, seed):
    if model_name == "cnn_bn":
        model, x = live(lambda: cnn(bn=True).eval(), images())
    elif model_name == "resnet":
        model, x = live(resnet, images(c=3))
    else:
        model, x = live(mlp, torch.rand(3, 6, dtype=DT))
    eps = 0.05
    target = torch.tensor([2, 0, 1])
    batch = fisnet.explain(model, x, target, eps=eps, zb=zb)
    for i in range(x.shape[0]):
        alone = fisnet.explain(model, x[i:i + 1], target[i:i + 1], eps=eps, zb=zb)
        close(batch[i:i + 1], alone, rtol=1e-9, atol=1e-12, msg=f"image {i}")
    allmaps = fisnet.explain(model, x, "all", eps=eps, zb=zb)
    K = model(x).shape[1]
    assert allmaps.shape == (x.shape[0], K) + tuple(x.shape[1:])
    for k in range(K):
        close(allmaps[:, k:k + 1], fisnet.explain(model, x, k, eps=eps, zb=zb), rtol=1e-12, atol=1e-14,
              msg=f"class {k}")
    for i in range(x.shape[0]):
        close(allmaps[i, target[i]], batch[i, 0], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Invariant 6: the Zb rule
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("groups", [1, 2])
def test_inv6_zb_relevance_direct(with_bias, groups, seed):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups, bias=with_bias).to(DT)
    layer = LinearLayer("conv2d", conv.weight, conv.bias, (2, 2), (1, 1), (1, 1), groups)
    x = torch.rand(2, 4, 7, 7, dtype=DT)
    low, high = torch.zeros(1, 1, 1, 1, dtype=DT), torch.ones(1, 1, 1, 1, dtype=DT)
    r_out = torch.rand(2, 3, 6, 4, 4, dtype=DT)
    for eps in (0.0, 0.1):
        r_in = zb_relevance(layer, x, r_out, low, high, 0.0, 1.0, eps)
        assert r_in.shape == (2, 3, 4, 7, 7)
        assert bool((r_in >= -1e-12).all()), "Zb: R_in < 0 with R_out >= 0 and x in [l, h]"
        want = zb_dense(conv_fn(conv), None if conv.bias is None else conv_bias_out(conv, conv.bias, x),
                        x, r_out, low, high, eps)
        close(r_in, want, msg=f"eps={eps}")
        if not with_bias and eps == 0.0:
            close(r_in.flatten(2).sum(-1), r_out.flatten(2).sum(-1))
    # pixels at the bounds: still non-negative
    xb = (torch.rand(2, 4, 7, 7, dtype=DT) > 0.5).to(DT)
    r_in = zb_relevance(layer, xb, r_out, low, high, 0.0, 1.0, 0.1)
    assert bool((r_in >= -1e-12).all())


def test_inv6_zb_relevance_linear_and_per_channel(seed):
    lin = nn.Linear(12, 5).to(DT)
    layer = LinearLayer("linear", lin.weight, lin.bias)
    low = torch.tensor([-1.0, -0.5, 0.0] * 4, dtype=DT).reshape(1, 12)
    high = low + torch.rand(1, 12, dtype=DT) + 0.5
    x = low + torch.rand(3, 12, dtype=DT) * (high - low)
    r_out = torch.rand(3, 2, 5, dtype=DT)
    r_in = zb_relevance(layer, x, r_out, low, high, float(low.min()), float(high.max()), 0.01)
    assert bool((r_in >= -1e-12).all())
    close(r_in, zb_dense(lambda a: F.linear(a, lin.weight), lin.bias, x, r_out, low, high, 0.01))


def positive_head_net(first, relu_in=None):
    """first layer(s) -> ReLU -> flatten -> linear with positive weights: R at the first ReLU is >= 0."""
    mods = OrderedDict(first)
    mods["relu0"] = nn.ReLU()
    mods["flat"] = nn.Flatten()
    mods["head"] = nn.LazyLinear(3)
    return nn.Sequential(mods)


def build_positive_head(first, x):
    net = positive_head_net(first).to(DT)
    net(x)  # materialise the lazy head
    with torch.no_grad():
        net.head.weight.abs_()
    return net


def r_at_relu0(net, x, target, eps):
    return fisnet.explain(net, x, target, eps=eps, zb=True, layers=["relu0"])


ZB_CASES = {
    "conv_s2_p1_nobias": lambda: [("conv", nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False))],
    "conv_bias": lambda: [("conv", nn.Conv2d(3, 4, 3, padding=1))],
    "grouped_conv": lambda: [("conv", nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False))],
    "conv_bn": lambda: [("conv", nn.Conv2d(3, 4, 3, stride=2, padding=1)), ("bn", nn.BatchNorm2d(4))],
    "linear_flat": lambda: [("flat_in", nn.Flatten()), ("lin", nn.Linear(3 * 6 * 6, 10))],
}


@pytest.mark.parametrize("case", list(ZB_CASES))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_inv6_zb_through_explain(case, eps, seed):
    cin = 4 if case == "grouped_conv" else 3
    x = torch.rand(2, cin, 6, 6, dtype=DT)
    net = build_positive_head(ZB_CASES[case](), x)
    randomise_bn(net).eval()
    target = torch.tensor([1, 2])
    out = r_at_relu0(net, x, target, eps)
    r_in, r_out = out["input"], out["relu0"]
    assert r_in.shape == (2, 1) + tuple(x.shape[1:])
    assert bool((r_out >= 0).all())
    assert bool((r_in >= -1e-12).all()), "Zb: negative input relevance with R_out >= 0"
    # the dense oracle, with BN folded by hand and the linear layer on flattened pixels
    low, high = torch.zeros(1, 1, 1, 1, dtype=DT), torch.ones(1, 1, 1, 1, dtype=DT)
    if case == "linear_flat":
        lin = net.lin
        want = zb_dense(lambda a: F.linear(a.flatten(1), lin.weight), lin.bias, x, r_out.flatten(2), low, high, eps)
    else:
        conv = net.conv
        w, b = conv.weight, conv.bias
        if case == "conv_bn":
            bn = net.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            w = w * scale.reshape(-1, 1, 1, 1)
            b = (b - bn.running_mean) * scale + bn.bias
        fn = lambda a: F.conv2d(a, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)  # noqa: E731
        b_out = None if b is None else b.reshape(1, -1, 1, 1).expand_as(fn(x[:1]))
        want = zb_dense(fn, b_out, x, r_out, low, high, eps)
    close(r_in, want.reshape(r_in.shape))
    has_shift = case in ("conv_bias", "conv_bn", "linear_flat")
    if not has_shift and eps == 0.0:
        close(r_in.flatten(2).sum(-1), r_out.flatten(2).sum(-1))
    # naming the first layer explicitly changes nothing
    name = {"linear_flat": "lin"}.get(case, "conv")
    named = fisnet.explain(net, x, target, eps=eps, zb=True, zb_layer=name)
    close(named, r_in, rtol=0, atol=0)


def test_inv6_conv_bn_matches_fold_plus_zb_relevance(seed):
    x = images(c=3)
    net = randomise_bn(build_positive_head([("conv", nn.Conv2d(3, 4, 3, padding=1)), ("bn", nn.BatchNorm2d(4))],
                                           x)).eval()
    with torch.no_grad():
        net.head.weight.normal_()  # R_out of both signs now
    out = fisnet.explain(net, x, None, eps=0.05, zb=True, layers=["relu0"])
    conv, bn = net.conv, net.bn
    layer = LinearLayer("conv2d", conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    folded = fold_batchnorm(layer, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    close(folded.weight, conv.weight * scale.reshape(-1, 1, 1, 1), rtol=1e-14, atol=0)
    close(folded.bias, (conv.bias - bn.running_mean) * scale + bn.bias, rtol=1e-14, atol=1e-15)
    close(folded.forward(x, folded.weight, folded.bias), bn(conv(x)), rtol=1e-12, atol=1e-13)
    one = torch.ones(1, 1, 1, 1, dtype=DT)
    want = zb_relevance(folded, x, out["relu0"], 0 * one, one, 0.0, 1.0, 0.05)
    close(out["input"], want)


def test_inv6_per_channel_bounds(seed):
    mean = torch.tensor([0.4, 0.5, 0.6], dtype=DT)
    std = torch.tensor([0.2, 0.25, 0.3], dtype=DT)
    u = torch.rand(2, 3, 6, 6, dtype=DT)
    x = (u - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)
    low, high = (0 - mean) / std, (1 - mean) / std
    net = build_positive_head([("conv", nn.Conv2d(3, 4, 3, padding=1))], x)
    out = fisnet.explain(net, x, torch.tensor([0, 1]), eps=0.01, zb=True, bounds=(low, high), layers=["relu0"])
    assert bool((out["input"] >= -1e-12).all())
    want = zb_dense(conv_fn(net.conv), conv_bias_out(net.conv, net.conv.bias, x), x, out["relu0"],
                    low.reshape(1, 3, 1, 1), high.reshape(1, 3, 1, 1), 0.01)
    close(out["input"], want)
    # list bounds work the same as tensors; scalar bounds give a different map
    close(fisnet.explain(net, x, torch.tensor([0, 1]), eps=0.01, bounds=(low.tolist(), high.tolist())),
          out["input"], rtol=1e-13, atol=1e-15)
    assert not torch.allclose(fisnet.explain(net, x, torch.tensor([0, 1]), eps=0.01), out["input"])


def test_inv6_zb_errors(seed):
    x = images(c=2)
    conv_pool_relu = nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(3 * 3 * 3, 2)).to(DT)
    with pytest.raises(ValueError, match="zb_layer"):
        fisnet.explain(conv_pool_relu, x)
    fisnet.explain(conv_pool_relu, x, zb=False)  # fine without Zb

    class Pre(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = cnn()

        def forward(self, x):
            return self.net(x * 2 - 1)

    pre = Pre()
    with pytest.raises(ValueError, match="model input"):
        fisnet.explain(pre, x)
    with pytest.raises(TypeError, match="Conv or Linear"):
        fisnet.explain(cnn(), x, zb_layer="1")
    with pytest.raises(KeyError):
        fisnet.explain(cnn(), x, zb_layer="conv_that_does_not_exist")
    with pytest.raises(ValueError, match="bounds"):
        fisnet.explain(cnn(), x, bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="per-channel"):
        fisnet.explain(cnn(), x, bounds=([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]))


def test_zb_layer_selects_a_later_layer(seed):
    """zb_layer names which conv gets the Zb rule; a conv not fed by the input is refused."""
    x = images()
    model = cnn()
    with pytest.raises(ValueError, match="model input"):
        fisnet.explain(model, x, zb_layer="3")
    close(fisnet.explain(model, x, 1, zb_layer="0"), fisnet.explain(model, x, 1), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Invariant 9: gradcheck of heatmaps in the weights
def tiny_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3), nn.ReLU(),
                         nn.Linear(3, 2)).to(DT)


@pytest.mark.parametrize("zb", [False, True], ids=["nozb", "zb"])
def test_inv9_gradcheck_heatmap_in_weights(zb, seed):
    model = tiny_net()
    x = torch.rand(2, 1, 4, 4, dtype=DT)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    mask = (torch.rand(2, 1, 1, 4, 4) > 0.5).to(DT)

    class Functional(nn.Module):
        def __init__(self, ps):
            super().__init__()
            self.ps = ps

        def forward(self, inp):
            return torch.func.functional_call(model, dict(zip(names, self.ps)), (inp,))

    def heat(*ps):
        return fisnet.explain(Functional(ps), x, torch.tensor([1, 0]), eps=0.1, zb=zb, create_graph=True)

    def loss(*ps):
        h = heat(*ps)
        return (h * mask).sum() + (h ** 2).sum()

    h = heat(*params)
    assert h.requires_grad
    assert torch.autograd.gradcheck(heat, params)
    assert torch.autograd.gradgradcheck(loss, params, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Training mode, create_graph
def test_training_mode_batchnorm(seed):
    x = images(c=3)
    net = build_positive_head([("conv", nn.Conv2d(3, 4, 3, padding=1)), ("bn", nn.BatchNorm2d(4))], x)
    with torch.no_grad():
        net.head.weight.normal_()
    net.train()
    target = torch.tensor([0, 1, 2])
    rm_before = net.bn.running_mean.clone()
    out = fisnet.explain(net, x, target, eps=0.05, zb=True, layers=["relu0"])
    assert not torch.equal(net.bn.running_mean, rm_before)  # a train-mode forward ran
    # batch statistics, folded by hand
    z = net.conv(x)
    var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    scale = net.bn.weight / torch.sqrt(var + net.bn.eps)
    w = net.conv.weight * scale.reshape(-1, 1, 1, 1)
    b = (net.conv.bias - mean) * scale + net.bn.bias
    fn = lambda a: F.conv2d(a, w, None, 1, 1)  # noqa: E731
    want = zb_dense(fn, b.reshape(1, -1, 1, 1).expand(1, 4, 8, 8), x, out["relu0"].detach(),
                    torch.zeros(1, 1, 1, 1, dtype=DT), torch.ones(1, 1, 1, 1, dtype=DT), 0.05)
    close(out["input"], want)
    # zb off in training mode: LRP-factor gradient x input of the train-mode forward
    m2 = lrp_factor_copy(net, 0.05).train()
    xi = x.clone().requires_grad_()
    g = torch.autograd.grad(m2(xi).gather(1, target[:, None]).sum(), xi)[0]
    close(fisnet.explain(net, x, target, eps=0.05, zb=False), (xi * g).detach().unsqueeze(1))


@pytest.mark.parametrize("zb", [False, True], ids=["nozb", "zb"])
def test_create_graph_backprops_to_weights(zb, seed):
    torch.manual_seed(seed)
    x = images(c=3)
    y = torch.tensor([0, 2, 1])
    grads = {}
    for backend in ("cpp", "reference"):
        torch.manual_seed(seed)
        model = resnet().train()
        maps = fisnet.explain(model, x, y, eps=0.1, zb=zb, create_graph=True, backend=backend)
        assert maps.requires_grad
        loss = (maps[..., :4, :] ** 2).sum() + model(x).logsumexp(1).sum()
        loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), n
        assert model.conv1.weight.grad.abs().sum() > 0 and model.layer1[0].conv2.weight.grad.abs().sum() > 0
    for n in grads["cpp"]:
        close(grads["cpp"][n], grads["reference"][n], rtol=1e-9, atol=1e-12, msg=n)


def test_create_graph_false_detaches(seed):
    model, x = cnn(), images()
    maps = fisnet.explain(model, x, eps=0.1)
    assert not maps.requires_grad and maps.grad_fn is None


# ---------------------------------------------------------------------------------------------
# Unsupported activations (GELU, SiLU, LeakyReLU, … have rules since the rule table: tests/fisnet/test_rules.py;
# sigmoid outside a gate: test_rules.test_sigmoid_outside_a_gate_is_refused)
@pytest.mark.parametrize("act", [nn.Tanh, nn.SELU, nn.PReLU, nn.Softsign])
def test_unsupported_activation_modules(act):
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 3, 3), odd_act=act(), flat=nn.Flatten(),
                                      fc=nn.Linear(3 * 6 * 6, 2))).to(DT)
    with pytest.raises(fisnet.UnsupportedActivationError, match="odd_act") as ei:
        fisnet.explain(model, images())
    assert act.__name__ in str(ei.value)
    assert isinstance(ei.value, TypeError)


def test_unsupported_activation_function():
    class SiluNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.fc = nn.Linear(3 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(F.selu(F.relu(self.conv(x))).flatten(1))

    model = SiluNet().to(DT)
    with pytest.raises(fisnet.UnsupportedActivationError, match="F.selu"):
        fisnet.explain(model, images())
    assert_untouched_after(model, lambda: fisnet.explain(model, images(), layers=["conv"]),
                           fisnet.UnsupportedActivationError)


def test_model_without_relu_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).to(DT)
    with pytest.raises(ValueError, match="no ReLU"):
        fisnet.explain(model, images(), zb=False)


# ---------------------------------------------------------------------------------------------
# The model is left as it was
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
              "_load_state_dict_pre_hooks")


def snapshot(model):
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        training={n: m.training for n, m in model.named_modules()},
        classes={n: type(m) for n, m in model.named_modules()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        grads={n: p.grad for n, p in model.named_parameters()},
        ids={n: id(m) for n, m in model.named_modules()},
    )


def assert_same(model, snap):
    state = model.state_dict()
    assert list(state) == list(snap["state"])
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), f"state {k} changed"
    assert snap["training"] == {n: m.training for n, m in model.named_modules()}
    assert snap["classes"] == {n: type(m) for n, m in model.named_modules()}
    assert snap["ids"] == {n: id(m) for n, m in model.named_modules()}
    assert snap["requires_grad"] == {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        assert p.grad is None, f"{n}.grad was set"
    for n, m in model.named_modules():
        for d in HOOK_DICTS:
            hooks = getattr(m, d, None)
            assert not hooks, f"module {n!r} has {d}: {hooks}"
    from torch.nn.modules import module as mm
    assert not mm._global_forward_hooks and not mm._global_forward_pre_hooks
    assert not mm._global_backward_hooks
    assert not torch._C._is_torch_function_mode_enabled(), "a TorchFunctionMode is still active"


def assert_untouched_after(model, fn, exc=None):
    snap = snapshot(model)
    if exc is None:
        fn()
    else:
        with pytest.raises(exc):
            fn()
    assert_same(model, snap)


@pytest.mark.parametrize("model_name", ["resnet", "cnn_bn", "functional"])
def test_model_untouched(model_name, seed):
    if model_name == "resnet":
        model, x = resnet(), images(c=3)
    elif model_name == "cnn_bn":
        model, x = cnn(bn=True).eval(), images()
    else:
        model, x = FunctionalNet().to(DT).eval(), images()
    model.layer_frozen = None
    first = list(model.parameters())[-1]
    first.requires_grad_(False)  # a frozen parameter (the last bias) stays frozen
    before = model(x).detach()
    assert_untouched_after(model, lambda: fisnet.explain(model, x, eps=0.1))
    assert_untouched_after(model, lambda: fisnet.explain(model, x, "all", eps=0.0, zb=False, create_graph=True))
    names = [n for n, _ in model.named_modules() if n][:2]
    assert_untouched_after(model, lambda: fisnet.explain(model, x, eps=0.1, layers=names))
    # errors midway: a bad LDS name after a good one (a hook was registered), bad target
    assert_untouched_after(model, lambda: fisnet.explain(model, x, layers=[names[0], "no_such_layer"]), KeyError)
    assert_untouched_after(model, lambda: fisnet.explain(model, x, target=99, layers=names), IndexError)
    assert_untouched_after(model, lambda: fisnet.explain(model, x, zb_layer="no_such_conv"), KeyError)
    close(model(x), before, rtol=0, atol=0)
    assert not first.requires_grad


def test_inplace_relu_statement_form(seed):
    """`h.relu_()` / F.relu(h, inplace=True) used as a statement: the traced forward must still
    compute the model's logits."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.fc = nn.Linear(3 * 6 * 6, 2)

        def forward(self, x):
            h = self.conv(x)
            h.relu_()
            return self.fc(h.flatten(1))

    model, x = Net().to(DT), images()
    logits = model(x).detach()
    t = fisnet.trace(model, x, eps=0.0, zb=False)
    close(t.logits, logits, rtol=0, atol=0)
    close(fisnet.explain(model, x, eps=0.0, zb=False), grad_x_input(model, x, None))


# ---------------------------------------------------------------------------------------------
# Targets and inputs
def test_target_errors(seed):
    model, x = cnn(), images()
    with pytest.raises(IndexError, match="3"):
        fisnet.explain(model, x, target=3)
    with pytest.raises(IndexError, match="-1"):
        fisnet.explain(model, x, target=torch.tensor([0, -1, 1]))
    with pytest.raises(TypeError, match="integer"):
        fisnet.explain(model, x, target=1.0)
    with pytest.raises(TypeError, match="integer"):
        fisnet.explain(model, x, target=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        fisnet.explain(model, x, target=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        fisnet.explain(model, x, target=torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="'all'"):
        fisnet.explain(model, x, target="every")
    with pytest.raises(TypeError, match="floating-point"):
        fisnet.explain(model, x.long())
    with pytest.raises(ValueError, match="eps must be >= 0"):
        fisnet.explain(model, x, eps=-0.1)


def test_target_forms_agree(seed):
    model, x = cnn(), images()
    a = fisnet.explain(model, x, 2, eps=0.1)
    close(fisnet.explain(model, x, torch.tensor(2), eps=0.1), a, rtol=0, atol=0)
    close(fisnet.explain(model, x, [2, 2, 2], eps=0.1), a, rtol=0, atol=0)
    close(fisnet.explain(model, x, torch.tensor([2, 2, 2], dtype=torch.int32), eps=0.1), a, rtol=0, atol=0)


def test_backends_agree_on_explain(seed):
    model, x = resnet(), images(c=3)
    ref = fisnet.explain(model, x, "all", eps=0.1, backend="reference")
    close(fisnet.explain(model, x, "all", eps=0.1, backend="cpp"), ref, rtol=1e-12, atol=1e-14)
    close(fisnet.explain(model, x, "all", eps=0.1), ref, rtol=1e-12, atol=1e-14)


def test_float32_model(seed):
    model = cnn().float()
    x = images().float()
    maps = fisnet.explain(model, x, "all", eps=0.0, zb=False)
    assert maps.dtype == torch.float32
    want = grad_x_input(model, x, "all")
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-6)


def test_linear_layer_forward_defaults(seed):
    """LinearLayer.forward(a) with no weight uses self.weight; the bias must default the same way."""
    conv = nn.Conv2d(2, 3, 3, bias=True).to(DT)
    layer = LinearLayer("conv2d", conv.weight, conv.bias, (1, 1), (0, 0), (1, 1), 1)
    x = images()
    close(layer.forward(x, conv.weight, conv.bias), conv(x), rtol=1e-13, atol=1e-14)
    close(layer.transpose(torch.ones_like(conv(x)), conv.weight, x.shape),
          torch.autograd.grad(conv(x.requires_grad_()).sum(), x)[0], rtol=1e-13, atol=1e-14)


def frozen_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(DT)


def test_explain_frozen_model(seed):
    model, x = frozen_net(), torch.rand(2, 1, 6, 6, dtype=DT)
    want = fisnet.explain(model, x, 1, eps=0.1)
    model.requires_grad_(False)
    close(fisnet.explain(model, x, 1, eps=0.1), want, rtol=1e-13, atol=1e-15)


def test_explain_first_layer_frozen(seed):
    model, x = frozen_net(), torch.rand(2, 1, 6, 6, dtype=DT)
    want = fisnet.explain(model, x, 1, eps=0.1, layers=["0"])
    model[0].requires_grad_(False)
    got = fisnet.explain(model, x, 1, eps=0.1, layers=["0"])
    close(got["input"], want["input"], rtol=1e-13, atol=1e-15)


def test_explain_under_no_grad(seed):
    model, x = frozen_net(), torch.rand(2, 1, 6, 6, dtype=DT)
    want = fisnet.explain(model, x, 1, eps=0.1, zb=False)
    with torch.no_grad():
        got = fisnet.explain(model, x, 1, eps=0.1, zb=False)
    close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("zb", [True, False])
def test_inplace_relu_training_gradients_match_out_of_place(zb, seed):
    """nn.ReLU(inplace=True) becomes the in-place lrp_relu_: heatmaps and the weight gradients
    of a heatmap loss (double backward) equal those of the same model with out-of-place ReLUs."""
    def build(inplace):
        torch.manual_seed(123)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=inplace),
                             nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3)).double().train()

    x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    results = []
    for inplace in (True, False):
        m = build(inplace)
        maps = fisnet.explain(m, x, torch.tensor([0, 1, 2]), eps=0.1, zb=zb, create_graph=True)
        loss = (maps ** 2).sum() + maps.abs().sum()
        grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True, materialize_grads=True)
        results.append((maps.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in results[0][1])
