"""Built-in backbones: shapes, LDS layer names, ReLU structure, registry."""
import pytest
import torch
import torch.nn as nn

from fisnet import models

torch.set_num_threads(min(2, torch.get_num_threads()))

ALL = ("densenet121", "resnet18", "resnet34", "resnet50", "small_cnn", "vgg11", "vgg11_bn",
       "vgg16", "vgg16_bn")
# backbones beyond ReLU CNNs: tested in test_models_mobilenet_efficientnet_convnext.py and test_models_vit.py
NEW = ("convnext_micro", "convnext_tiny", "efficientnet_b0", "efficientnet_micro", "mobilenet_v2",
       "mobilenet_v2_micro", "vit_digits", "vit_digits_stem", "vit_small", "vit_tiny")
ALLOWED_LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear, nn.MaxPool2d, nn.AvgPool2d,
                  nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)


def test_names_and_unknown():
    assert set(models.names()) == set(ALL) | set(NEW)
    with pytest.raises(ValueError) as e:
        models.build("resnet99")
    for n in ALL:
        assert n in str(e.value)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("num_classes,in_channels", [(2, 1), (10, 3)])
def test_forward_shape_and_lds(name, num_classes, in_channels):
    torch.manual_seed(0)
    net = models.build(name, num_classes=num_classes, in_channels=in_channels).eval()
    batch = 1 if name in ("densenet121", "resnet50", "resnet34") else 2  # keep CPU time low
    x = torch.rand(batch, in_channels, 32, 32)
    layers = models.default_lds_layers(net)
    assert len(layers) >= 3
    mods = dict(net.named_modules())
    seen = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape))
             for n in layers]
    with torch.no_grad():
        y = net(x)
    for h in hooks:
        h.remove()
    assert y.shape == (batch, num_classes)
    assert torch.isfinite(y).all()
    assert set(seen) == set(layers)
    for n, s in seen.items():
        assert len(s) == 4 and s[0] == batch, (n, s)
    # resolution never increases along the LDS list
    sizes = [seen[n][-1] for n in layers]
    assert sizes == sorted(sizes, reverse=True)
    # ReLU-only: every leaf module is from the allowed list (no GELU, SiLU, ...)
    for mname, m in net.named_modules():
        if len(list(m.children())) == 0:
            assert isinstance(m, ALLOWED_LEAVES), (mname, type(m))


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "vgg11", "small_cnn"])
def test_28x28_and_odd_sizes(name):
    net = models.build(name, num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        for s in ((28,) if name == "densenet121" else (28, 36)):
            assert net(torch.rand(1, 1, s, s)).shape == (1, 3)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_small_input_stem(name):
    net = models.build(name, num_classes=4, in_channels=1, small_input=True).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 20, 20)).shape == (1, 4)
    conv = net.conv1 if name == "resnet18" else net.features.conv0
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)


@pytest.mark.parametrize("name,block,calls", [("resnet18", models.BasicBlock, 2),
                                              ("resnet50", models.Bottleneck, 3)])
def test_resnet_reuses_one_inplace_relu(name, block, calls):
    net = models.build(name, num_classes=2, in_channels=3).eval()
    blocks = [m for m in net.modules() if isinstance(m, block)]
    assert blocks
    counts = {}
    for b in blocks:
        relus = [m for m in b.modules() if isinstance(m, nn.ReLU)]
        assert len(relus) == 1 and relus[0] is b.relu and b.relu.inplace
        b.relu.register_forward_hook(lambda m, i, o: counts.__setitem__(id(m), counts.get(id(m), 0) + 1))
    with torch.no_grad():
        net(torch.rand(1, 3, 32, 32))
    assert sorted(set(counts.values())) == [calls]
    assert len(counts) == len(blocks)


def test_resnet_inplace_residual_sum_is_in_forward_source():
    import inspect
    src = inspect.getsource(models.BasicBlock.forward) + inspect.getsource(models.Bottleneck.forward)
    assert src.count("out += identity") == 2


def test_densenet_structure_and_functional_relu():
    import inspect
    net = models.build("densenet121", num_classes=2, in_channels=3)
    names = dict(net.named_modules())
    for n in ("features.transition1", "features.transition2", "features.transition3",
              "features.norm5", "features.denseblock4.denselayer16.conv2"):
        assert n in names
    per_block = [len([n for n in names if n.startswith(f"features.denseblock{b}.denselayer")
                      and n.count(".") == 2]) for b in (1, 2, 3, 4)]
    assert per_block == [6, 12, 24, 16]
    assert net.classifier.in_features == 1024
    assert "F.relu(" in inspect.getsource(type(net).forward)
    assert net.lds_layers[-1] == "features.norm5"


def test_vgg_lds_are_pools_and_head_small():
    for name in ("vgg11", "vgg16_bn"):
        net = models.build(name, num_classes=10, in_channels=3)
        mods = dict(net.named_modules())
        assert len(net.lds_layers) == 5
        assert all(isinstance(mods[n], nn.MaxPool2d) for n in net.lds_layers)
        assert sum(p.numel() for p in net.parameters()) < 20_000_000
    assert sum(isinstance(m, nn.BatchNorm2d) for m in models.vgg11_bn().modules()) == 8
    assert sum(isinstance(m, nn.BatchNorm2d) for m in models.vgg16().modules()) == 0
    assert sum(isinstance(m, nn.Conv2d) for m in models.vgg16().modules()) == 13


def test_small_cnn_options_and_training_step():
    torch.manual_seed(0)
    net = models.small_cnn(num_classes=10, in_channels=1, batchnorm=False, width=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert all(m.bias is not None for m in net.modules() if isinstance(m, nn.Conv2d))
    bn = models.small_cnn(num_classes=10, in_channels=1)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 6
    x, y = torch.rand(4, 1, 36, 36), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_kaiming_init_like_torchvision():
    torch.manual_seed(0)
    net = models.resnet18(num_classes=10)
    w = net.layer3[0].conv2.weight  # 256 out, 3x3: fan_out = 256*9
    std = (2.0 / (256 * 9)) ** 0.5
    assert abs(w.std().item() / std - 1) < 0.05
    assert torch.all(net.bn1.weight == 1) and torch.all(net.bn1.bias == 0)


def test_default_lds_layers_errors():
    with pytest.raises(ValueError, match="lds_layers"):
        models.default_lds_layers(nn.Sequential(nn.Linear(2, 2)))
    net = models.small_cnn()
    net.lds_layers = ("block1", "nope")
    with pytest.raises(KeyError, match="nope"):
        models.default_lds_layers(net)


def test_bad_sizes_rejected():
    for name in ("resnet18", "vgg11", "small_cnn", "densenet121"):
        with pytest.raises(ValueError):
            models.build(name, num_classes=0)
