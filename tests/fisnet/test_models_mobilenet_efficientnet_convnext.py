"""MobileNet-V2, EfficientNet-B0, ConvNeXt-Tiny and their CPU-sized "_micro" configurations:
torchvision layout and names, shapes, LDS defaults, weights round trip, explain with Zb, every ISNet
variant training on the micro configurations, and the CLI's --backbone."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fisnet
from fisnet import models
from fisnet.cli import build_parser, run_demo
from fisnet.lrp import trace
from fisnet.models._layers import LayerNorm2d, SqueezeExcitation, StochasticDepth, make_divisible

torch.set_num_threads(min(2, torch.get_num_threads()))

FULL = ("mobilenet_v2", "efficientnet_b0", "convnext_tiny")
MICRO = ("mobilenet_v2_micro", "efficientnet_micro", "convnext_micro")

# torchvision's state-dict keys and shapes (num_classes=1000, 3 input channels), spot checks
TORCHVISION_KEYS = {
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3), "features.0.1.running_var": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3), "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.bias": (16,), "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3), "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.num_batches_tracked": (), "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1), "features.18.1.weight": (1280,),
        "classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)},
    "efficientnet_b0": {
        "features.0.0.weight": (32, 3, 3, 3), "features.0.1.running_mean": (32,),
        "features.1.0.block.0.0.weight": (32, 1, 3, 3), "features.1.0.block.1.fc1.weight": (8, 32, 1, 1),
        "features.1.0.block.1.fc2.bias": (32,), "features.1.0.block.2.0.weight": (16, 32, 1, 1),
        "features.2.0.block.0.0.weight": (96, 16, 1, 1), "features.2.0.block.1.0.weight": (96, 1, 3, 3),
        "features.2.0.block.2.fc1.weight": (4, 96, 1, 1), "features.2.0.block.3.1.weight": (24,),
        "features.3.0.block.1.0.weight": (144, 1, 5, 5), "features.6.3.block.3.1.running_mean": (192,),
        "features.7.0.block.3.0.weight": (320, 1152, 1, 1), "features.8.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280)},
    "convnext_tiny": {
        "features.0.0.weight": (96, 3, 4, 4), "features.0.0.bias": (96,), "features.0.1.weight": (96,),
        "features.1.0.layer_scale": (96, 1, 1), "features.1.0.block.0.weight": (96, 1, 7, 7),
        "features.1.0.block.2.weight": (96,), "features.1.0.block.3.weight": (384, 96),
        "features.1.0.block.5.weight": (96, 384), "features.2.0.weight": (96,),
        "features.2.1.weight": (192, 96, 2, 2), "features.5.8.layer_scale": (384, 1, 1),
        "features.7.2.block.5.bias": (768,), "classifier.0.weight": (768,), "classifier.2.weight": (1000, 768)},
}
# torchvision's parameter counts and state-dict sizes at 1000 classes
TORCHVISION_PARAMS = {"mobilenet_v2": (3_504_872, 314), "efficientnet_b0": (5_288_548, 360),
                      "convnext_tiny": (28_589_128, 182)}


def build(name, **kw):
    torch.manual_seed(0)
    return models.build(name, **kw)


_CACHE = {}


def built(name, **kw):
    """A shared build, for tests that only read the model (the full backbones take seconds to build)."""
    key = (name, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = build(name, **kw)
    return _CACHE[key]


def test_registered_and_builders_exported():
    for n in FULL + MICRO:
        assert n in models.names()
        assert callable(getattr(models, n))


@pytest.mark.parametrize("name", FULL)
def test_torchvision_names_shapes_and_sizes(name):
    net = built(name, num_classes=1000, in_channels=3)
    sd = net.state_dict()
    for k, shape in TORCHVISION_KEYS[name].items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape))
    params, entries = TORCHVISION_PARAMS[name]
    assert sum(p.numel() for p in net.parameters()) == params
    assert len(sd) == entries


def test_module_types_as_torchvision():
    mb = build("mobilenet_v2_micro")
    assert isinstance(mb.features[0][2], nn.ReLU6) and isinstance(mb.classifier[0], nn.Dropout)
    assert type(mb.features[2]).__name__ == "InvertedResidual" and hasattr(mb.features[2], "conv")
    ef = build("efficientnet_micro")
    mbconv = ef.features[2][0]
    assert type(mbconv).__name__ == "MBConv"
    se = [m for m in mbconv.block if isinstance(m, SqueezeExcitation)]
    assert len(se) == 1 and isinstance(se[0].scale_activation, nn.Sigmoid) and isinstance(se[0].activation, nn.SiLU)
    assert isinstance(mbconv.stochastic_depth, StochasticDepth)
    assert isinstance(ef.features[0][2], nn.SiLU) and isinstance(ef.avgpool, nn.AdaptiveAvgPool2d)
    cn = built("convnext_tiny", num_classes=1000, in_channels=3)
    blk = cn.features[1][0]
    kinds = [type(m).__name__ for m in blk.block]
    assert kinds == ["Conv2d", "Permute", "LayerNorm", "Linear", "GELU", "Linear", "Permute"]
    assert blk.block[0].groups == 96 and blk.block[0].kernel_size == (7, 7)
    assert cn.features[0][0].kernel_size == (4, 4) and cn.features[0][0].stride == (4, 4)
    assert isinstance(cn.features[0][1], LayerNorm2d) and cn.features[0][1].eps == 1e-6
    assert isinstance(cn.features[2][0], LayerNorm2d) and cn.features[2][1].stride == (2, 2)
    assert [type(m).__name__ for m in cn.classifier] == ["LayerNorm2d", "Flatten", "Linear"]
    # stochastic depth grows linearly to 0.1 over the blocks, as torchvision's convnext_tiny
    assert cn.features[1][0].stochastic_depth.p == 0.0 and math.isclose(cn.features[7][2].stochastic_depth.p, 0.1)


@pytest.mark.parametrize("name,size", [("mobilenet_v2", 32), ("efficientnet_b0", 32), ("convnext_tiny", 32),
                                       ("mobilenet_v2_micro", 36), ("efficientnet_micro", 36),
                                       ("convnext_micro", 36), ("convnext_micro", 28)])
def test_forward_shape_and_lds_layers(name, size):
    net = build(name, num_classes=4, in_channels=1).eval() if name in MICRO else \
        built(name, num_classes=1000, in_channels=3).eval()
    layers = models.default_lds_layers(net)
    assert len(layers) >= 3
    mods = dict(net.named_modules())
    seen = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, tuple(o.shape)))
             for n in layers]
    with torch.no_grad():
        y = net(torch.rand(2, net.features[0][0].in_channels, size, size))
    for h in hooks:
        h.remove()
    assert y.shape == (2, 4 if name in MICRO else 1000) and torch.isfinite(y).all()
    assert set(seen) == set(layers)
    sides = [seen[n][-1] for n in layers]
    assert sides == sorted(sides, reverse=True) and sides[-1] >= 1
    assert sides[0] > sides[-1]  # the LDS layers span several resolutions


def test_lds_defaults_of_the_full_backbones():
    kw = dict(num_classes=1000, in_channels=3)
    assert built("mobilenet_v2", **kw).lds_layers == ("features.1", "features.3", "features.6", "features.13",
                                                      "features.18")
    assert built("efficientnet_b0", **kw).lds_layers == ("features.1", "features.2", "features.3", "features.5",
                                                         "features.8")
    assert built("convnext_tiny", **kw).lds_layers == ("features.1", "features.3", "features.5", "features.7")


def test_width_mult_and_small_input():
    a = build("mobilenet_v2", width_mult=0.5, num_classes=3)
    assert a.features[0][0].out_channels == 16 and a.last_channel == 1280
    assert a.features[1].conv[1].out_channels == 8  # 16 * 0.5
    assert build("mobilenet_v2_micro", width_mult=1.4).last_channel == make_divisible(256 * 1.4)
    for name in ("mobilenet_v2_micro", "efficientnet_micro"):
        s = build(name, small_input=True, in_channels=1)
        assert s.features[0][0].stride == (1, 1) and s.features[0][0].in_channels == 1
    assert built("efficientnet_b0", num_classes=1000, in_channels=3).features[0][0].stride == (2, 2)
    cn = built("convnext_tiny", small_input=True, num_classes=5, in_channels=1).eval()
    assert cn.features[0][0].kernel_size == (2, 2)
    with torch.no_grad():
        assert cn(torch.rand(1, 1, 16, 16)).shape == (1, 5)


def test_bad_arguments():
    for name in FULL + MICRO:
        with pytest.raises(ValueError, match="num_classes"):
            models.build(name, num_classes=0)
    with pytest.raises(ValueError, match="StochasticDepth"):
        StochasticDepth(1.5, "row")


def test_weights_round_trip_and_new_classifier(tmp_path):
    for name in MICRO:
        src = build(name, num_classes=10, in_channels=1).eval()
        with torch.no_grad():  # make the file differ from a fresh build
            for p in src.parameters():
                p.add_(0.01 * torch.randn_like(p))
        path = tmp_path / f"{name}.pth"
        torch.save(src.state_dict(), path)
        dst = models.build(name, num_classes=10, in_channels=1, weights=str(path)).eval()
        x = torch.rand(2, 1, 36, 36)
        with torch.no_grad():
            assert torch.equal(src(x), dst(x)), name
        with pytest.warns(UserWarning, match="classifier"):
            other = models.build(name, num_classes=3, in_channels=1, weights=str(path))
        assert torch.equal(other.features[0][0].weight, src.features[0][0].weight)


def test_stochastic_depth_is_a_constant_mask():
    x = torch.randn(64, 3, 2, 2)
    sd = StochasticDepth(0.25, "row")
    assert torch.equal(sd.eval()(x), x)
    torch.manual_seed(0)
    y = sd.train()(x)
    ratio = (y / x).reshape(64, -1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # one factor per sample
    kept = ratio[:, 0] != 0
    assert 0 < int(kept.sum()) < 64  # some samples dropped, some kept
    assert torch.allclose(ratio[kept, 0], torch.full_like(ratio[kept, 0], 1 / 0.75))
    assert torch.equal(StochasticDepth(0.0, "row").train()(x), x)


def test_layernorm2d_is_channel_layernorm():
    ln = LayerNorm2d(5, eps=1e-6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 3, 4)
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-6) * ln.weight[:, None, None] + ln.bias[:, None, None]
    assert torch.allclose(ln(x), ref, atol=1e-5)


@pytest.mark.parametrize("name", MICRO + ("convnext_tiny",))
def test_explain_with_zb_reads_the_stem(name):
    net = (built(name, small_input=True, num_classes=5, in_channels=1) if name == "convnext_tiny"
           else build(name, num_classes=5, in_channels=1)).eval()
    x = torch.rand(2, 1, 32, 32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r = fisnet.explain(net, x, eps=1e-6)
    assert r.shape == (2, 1, 1, 32, 32)
    assert torch.isfinite(r).all() and r.abs().sum() > 0
    tr = trace(net, x, eps=1e-6)
    assert len(tr.zb_layers) == 1  # the stem conv reads the input directly: Zb applies there
    assert tr.zb_layers[0].layer.weight is net.features[0][0].weight
    # the trace's logits are the model's; the model is unchanged by the calls
    with torch.no_grad():
        assert torch.allclose(net(x), tr.logits.detach(), rtol=1e-4, atol=1e-9)
    assert not net.training
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("name", MICRO)
@pytest.mark.parametrize("variant", fisnet.VARIANTS)
def test_every_variant_trains_on_the_micro_backbones(name, variant):
    K = 4
    kw = {} if name == "mobilenet_v2_micro" else {"stochastic_depth_prob": 0.3}  # exercise StochasticDepth
    m = build(name, num_classes=K, in_channels=1, **kw)
    torch.manual_seed(1)
    x = torch.rand(4, 1, 36, 36)
    labels = torch.tensor([0, 3, 1, 2])
    masks = torch.zeros(4, 1, 36, 36)
    masks[:, :, 8:28, 8:28] = 1
    net = fisnet.ISNet(m, variant).train()
    out = net(x, labels)
    M = {"original": K, "dual": 2}.get(variant, 1)
    assert out.heatmaps.shape == (4, M, 1, 36, 36)
    assert torch.isfinite(out.heatmaps).all()
    crit = fisnet.ISNetLoss(cuts=[(1.0, 10.0)] * (2 if variant == "dual" else 1))
    loss = crit(out, labels, masks)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    stem = m.features[0][0].weight.grad
    assert stem is not None and stem.abs().sum() > 0


@pytest.mark.parametrize("name", MICRO)
def test_lds_default_layers_train(name):
    m = build(name, num_classes=3, in_channels=1)
    net = fisnet.ISNet(m, "selective", lds_layers="default").train()
    x = torch.rand(3, 1, 36, 36)
    out = net(x, torch.tensor([0, 1, 2]))
    assert set(out.heatmaps) == {"input", *m.lds_layers}
    for k, h in out.heatmaps.items():
        assert torch.isfinite(h).all(), k
    sum(h.abs().sum() for h in out.heatmaps.values()).backward()
    assert m.features[0][0].weight.grad is not None


def test_cli_backbone_options():
    ap = build_parser()
    assert ap.parse_args(["demo", "--backbone", "convnext_micro"]).backbone == "convnext_micro"
    assert ap.parse_args(["demo"]).backbone == "small_cnn"
    assert ap.parse_args(["train", "--backbone", "efficientnet_micro"]).model == "efficientnet_micro"
    assert ap.parse_args(["train", "--model", "mobilenet_v2_micro"]).model == "mobilenet_v2_micro"


def test_demo_rejects_unknown_backbone_and_width(tmp_path):
    with pytest.raises(ValueError, match="not a fisnet backbone"):
        run_demo(out=str(tmp_path), quick=True, backbone="convnext_huge", progress=False)
    with pytest.raises(ValueError, match="--width"):
        run_demo(out=str(tmp_path), quick=True, backbone="convnext_micro", width=8, progress=False)
