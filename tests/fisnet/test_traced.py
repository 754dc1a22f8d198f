"""TracedConv: the trace's convolution, whose heatmap backward is a transposed convolution."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fisnet
import fisnet_ext
from fisnet import lrp
from fisnet import traced as convfn
from fisnet.rules import conv_input_grad

CASES = [  # (nd, in, out, kernel, stride, padding, dilation, groups, size)
    (2, 3, 4, 3, 1, 1, 1, 1, 7),
    (2, 4, 6, 3, 2, 1, 1, 2, 8),   # stride 2, even size: output padding needed
    (2, 4, 4, 3, 2, 0, 2, 4, 9),   # dilation, depthwise
    (1, 3, 5, 4, 3, 2, 1, 1, 11),
    (3, 2, 3, 3, 2, 1, 1, 1, 5),
]


def _conv(nd):
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]


@pytest.mark.parametrize("case", CASES)
def test_conv_input_grad_equals_autograd(case, seed):
    nd, cin, cout, k, s, p, d, g, n = case
    x = torch.randn((2, cin) + (n,) * nd, dtype=torch.float64, requires_grad=True)
    w = torch.randn((cout, cin // g) + (k,) * nd, dtype=torch.float64)
    y = _conv(nd)(x, w, None, s, p, d, g)
    go = torch.randn_like(y)
    (ref,) = torch.autograd.grad(y, x, go)
    got = conv_input_grad(go, w, x.shape, (s,) * nd, (p,) * nd, (d,) * nd, g)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("heatmap", [False, True])
def test_traced_conv_gradcheck(case, heatmap, seed):
    nd, cin, cout, k, s, p, d, g, n = case
    x = torch.randn((2, cin) + (n,) * nd, dtype=torch.float64, requires_grad=True)
    w = torch.randn((cout, cin // g) + (k,) * nd, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True)
    sw = fisnet_ext.HeatmapSwitch()
    conf = ((s,) * nd, (p,) * nd, (d,) * nd, g)

    def f(x, w, b):
        return convfn.TracedConv.apply(x, w, b, *conf, (sw, None))

    torch.testing.assert_close(f(x, w, b), _conv(nd)(x, w, b, s, p, d, g))
    if heatmap:  # heatmap mode: only the input-gradient, but that one twice differentiable in w
        with sw:
            y = f(x, w, b)
            go = torch.randn_like(y, requires_grad=True)
            (gx,) = torch.autograd.grad(y, x, go, create_graph=True)
            assert torch.autograd.grad(y, [w, b], go, allow_unused=True) == (None, None)
        y2 = _conv(nd)(x, w, b, s, p, d, g)
        (gx_ref,) = torch.autograd.grad(y2, x, go, create_graph=True)
        torch.testing.assert_close(gx, gx_ref)
        h = torch.randn_like(gx)
        got = torch.autograd.grad((gx * h).sum(), [w, go])
        ref = torch.autograd.grad((gx_ref * h).sum(), [w, go])
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r)
    else:
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


def _model():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6, affine=False),
                         nn.ReLU(), nn.Linear(6, 4)).double()


@pytest.mark.parametrize("variant", ["selective", "dual", "original"])
@pytest.mark.parametrize("dual_batched", [False, True])
@pytest.mark.parametrize("which", ["conv", "bn", "both"])
def test_isnet_step_equals_untraced(variant, dual_batched, which, seed, monkeypatch):
    """Maps and the training gradient of the maps with TracedConv / TracedBatchNorm equal those
    with PyTorch's own convolution and BatchNorm backward (the wrappers switched off)."""
    if variant != "dual" and dual_batched:
        pytest.skip("dual_batched only concerns the dual variant")
    x = torch.rand(4, 3, 10, 10, dtype=torch.float64)
    masks = torch.zeros(4, 1, 10, 10, dtype=torch.float64)
    masks[..., 2:8, 2:8] = 1
    y = torch.tensor([0, 1, 2, 3])
    results = []
    for wrapped in (True, False):
        if not wrapped and which in ("conv", "both"):
            monkeypatch.setattr(lrp, "TRACED_CONV_FUNCS", {})
        if not wrapped and which in ("bn", "both"):
            monkeypatch.setattr(lrp, "TRACED_BATCH_NORM", False)
        torch.manual_seed(1)
        model = _model()
        net = fisnet.ISNet(model, variant, dual_batched=dual_batched)
        out = net(x, y)
        hm = out.heatmaps
        loss = (hm * (1 - masks.unsqueeze(1))).abs().sum() + F.cross_entropy(out.logits, y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((hm.detach(), grads))
    (hm_a, g_a), (hm_b, g_b) = results
    torch.testing.assert_close(hm_a, hm_b)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b)


def test_zplus_pass_runs_no_kernel_on_a_missing_gradient(seed):
    """The z⁺ pass sends nothing through a conv/BatchNorm layer's own backward (its taps route the
    relevance to the layer input), so no convolution or BatchNorm backward may run on an all-zero
    gradient there: a materialised zero used to cost a transposed convolution per layer, and its
    weight gradient again in the training step's double backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten
    zero_inputs = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.convolution.default, aten.convolution_backward.default, aten.native_batch_norm_backward.default):
                if isinstance(args[0], torch.Tensor) and args[0].numel() and not bool(args[0].any()):
                    zero_inputs.append(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = _model()
    x = torch.rand(4, 3, 10, 10, dtype=torch.float64)
    t = lrp.trace(model, x, zplus=True)
    with Spy():
        maps = t.relevance_zplus(create_graph=True)
    assert maps["input"].abs().sum() > 0
    assert zero_inputs == [], zero_inputs
    # and the double backward of the map does no such work either
    with Spy():
        torch.autograd.grad(maps["input"].square().sum(), list(model.parameters()), allow_unused=True)
    assert zero_inputs == [], zero_inputs


def test_wrapper_is_used_and_left_for_string_padding(seed):
    calls = []
    orig = convfn.TracedConv.apply

    def spy(*a):
        calls.append(a[1].shape)
        return orig(*a)

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    x = torch.rand(2, 3, 6, 6)
    try:
        convfn.TracedConv.apply = spy
        maps = fisnet.explain(model, x, zb=False)
    finally:
        convfn.TracedConv.apply = orig
    assert calls == [torch.Size([4, 4, 3, 3])]  # the "same"-padded conv is left to PyTorch
    assert maps.shape == (2, 1, 3, 6, 6) and torch.isfinite(maps).all()


def test_traced_batch_norm_matches_pytorch(seed):
    """Forward output, running statistics and ordinary gradients of TracedBatchNorm equal
    F.batch_norm's; the heatmap-mode input-gradient equals PyTorch's, twice differentiable."""
    sw = fisnet_ext.HeatmapSwitch()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm1, rv1 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = convfn.traced_batch_norm((x, rm1, rv1, w, b, True, 0.1, 1e-5), {}, (sw,))
    y2 = F.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5)
    assert y1.grad_fn is not None and "TracedBatchNorm" in type(y1.grad_fn).__name__
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close((rm1, rv1), (rm2, rv2))
    go = torch.randn_like(y1, requires_grad=True)
    torch.testing.assert_close(torch.autograd.grad(y1, [x, w, b], go, retain_graph=True),
                               torch.autograd.grad(y2, [x, w, b], go, retain_graph=True))
    with sw:
        (gx1,) = torch.autograd.grad(y1, x, go, create_graph=True)
        assert torch.autograd.grad(y1, [w, b], go, allow_unused=True, retain_graph=True) == (None, None)
    (gx2,) = torch.autograd.grad(y2, x, go, create_graph=True)
    torch.testing.assert_close(gx1, gx2)
    h = torch.randn_like(gx1)
    torch.testing.assert_close(torch.autograd.grad((gx1 * h).sum(), [x, w, go]),
                               torch.autograd.grad((gx2 * h).sum(), [x, w, go]))
    # eval mode (running statistics) is left to PyTorch
    y3 = convfn.traced_batch_norm((x, rm1, rv1, w, b, False, 0.1, 1e-5), {}, (sw,))
    assert "TracedBatchNorm" not in type(y3.grad_fn).__name__


def test_chunked_seeds_equal_one_batched_pass(seed, monkeypatch):
    """On CPU the Original's seeds run in chunks (lrp.CPU_SEED_CHUNK_BYTES); maps and training
    gradients equal one batched pass over all seeds."""
    x = torch.rand(3, 3, 10, 10, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    res = []
    for budget in (1 << 40, 1):  # one pass; one seed per chunk
        monkeypatch.setattr(lrp, "CPU_SEED_CHUNK_BYTES", budget)
        torch.manual_seed(2)
        model = _model()
        net = fisnet.ISNet(model, "original", lds_layers=["3"])
        out = net(x, y)
        t = out.heatmaps
        loss = sum((v ** 2).sum() for v in t.values()) + F.cross_entropy(out.logits, y)
        res.append(({k: v.detach() for k, v in t.items()}, torch.autograd.grad(loss, list(model.parameters()))))
    (m1, g1), (m2, g2) = res
    assert m1["input"].shape == (3, 4, 3, 10, 10)
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    trace_ = lrp.trace(_model(), x)
    assert trace_.seed_chunk(4) == 1 and trace_.act_bytes > 0  # budget 1 still patched: one seed per chunk
