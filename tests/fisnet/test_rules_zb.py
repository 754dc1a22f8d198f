"""`fisnet.rules.zb_relevance` (one stacked transposed convolution, the vanishing terms left out,
`z_full`, the `ZbRatio` autograd function) against `rules._zb_relevance_reference`, the code it
replaced (three transposed convolutions, PyTorch's division backward), in float64 on fresh random
data; gradcheck and gradgradcheck of the new path (docs/spec.md §2.1, issue 11)."""
import pytest
import torch
import torch.nn.functional as F

from fisnet.rules import (LinearLayer, ZbRatio, _zb_relevance_reference, bound_images, fold_batchnorm_as_used,
                          fold_batchnorm_for_zb, zb_relevance)

DT = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)

BOUNDS = {
    "01": (0.0, 1.0),
    "neg": (-1.0, 0.5),  # l != 0; with b < 0 the bias bounds exclude 1: z < 0 occurs
    "chan": ([0.0, -0.5, -2.0, 0.0], [1.0, 0.5, 2.0, 3.0]),  # per-channel
    "hi0": (-1.0, 0.0),  # the h term vanishes
}

# (kind, in channels, out channels, kernel, stride, padding, dilation, groups, LinearLayer.pad)
CONVS = {
    "1d": ("conv1d", 4, 6, (3,), (1,), (1,), (1,), 1, None),
    "1d-s2-d2-g2": ("conv1d", 4, 6, (3,), (2,), (2,), (2,), 2, None),
    "2d": ("conv2d", 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, None),
    "2d-s2": ("conv2d", 4, 8, (3, 2), (2, 1), (1, 0), (1, 1), 1, None),
    "2d-g2-d2": ("conv2d", 4, 6, (3, 3), (1, 2), (2, 1), (2, 1), 2, None),
    "2d-dw": ("conv2d", 4, 8, (3, 3), (1, 1), (1, 1), (1, 1), 4, None),  # depthwise, multiplier 2
    "2d-pad": ("conv2d", 4, 6, (2, 2), (1, 1), (0, 0), (1, 1), 1, (0, 1, 1, 0)),  # asymmetric "same"
    "2d-pad-g2-s2": ("conv2d", 4, 6, (4, 3), (2, 2), (1, 0), (1, 1), 2, (1, 2, 0, 1)),
    "3d": ("conv3d", 4, 4, (2, 3, 2), (1, 2, 1), (1, 1, 0), (1, 1, 1), 1, None),
    "3d-g2": ("conv3d", 4, 6, (3, 3, 3), (1, 1, 1), (1, 0, 1), (1, 1, 1), 2, None),
}
SPATIAL = {"conv1d": (8,), "conv2d": (6, 5), "conv3d": (4, 3, 4)}


def _bounds(name, x):
    low, high, lb, hb = bound_images(BOUNDS[name], x)
    return low, high, lb, hb


def _inputs(low, high, shape, outside: bool):
    """Pixels in [l, h], some at the bounds exactly, some (outside=True) beyond them."""
    u = torch.rand(shape, dtype=DT)
    x = low + u * (high - low)
    at = torch.rand(shape, dtype=DT)
    x = torch.where(at < 0.1, low.expand(shape), torch.where(at > 0.9, high.expand(shape), x))
    if outside:
        off = torch.rand(shape, dtype=DT)
        x = torch.where(off < 0.08, low - 0.7, torch.where(off > 0.92, high + 0.6, x))
    return x


def _conv_layer(spec, with_bias, bias_sign):
    kind, cin, cout, k, st, pd, dl, g, pad = spec
    w = torch.randn((cout, cin // g) + k, dtype=DT)
    b = None
    if with_bias:
        b = torch.randn(cout, dtype=DT)
        if bias_sign == "neg":
            b = -b.abs() - 0.3
    return LinearLayer(kind, w, b, st, pd, dl, g, pad)


def _feat_shape(spec):
    return (spec[1],) + SPATIAL[spec[0]]


def _check(layer, a, r_out, low, high, lb, hb, eps, msg):
    """Equal to the reference.  Without a stabiliser (ε = 0) z is exactly 0 where every pixel of a
    receptive field sits at the bound its weight's sign picks (pixels are drawn at the bounds on
    purpose; ~1 % of runs for a depthwise 3x3 corner): both give NaN (0/0) there, at the same
    positions (equal_nan), and agree everywhere else."""
    tol = dict(TOL, equal_nan=eps == 0.0)
    want = _zb_relevance_reference(layer, a, r_out, low, high, lb, hb, eps)
    got = zb_relevance(layer, a, r_out, low, high, lb, hb, eps)
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{msg}: {m}")
    got_z = zb_relevance(layer, a, r_out, low, high, lb, hb, eps, z_full=layer.forward(a))
    torch.testing.assert_close(got_z, want, **tol, msg=lambda m: f"{msg} (z_full): {m}")
    return want


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("bounds", list(BOUNDS))
def test_conv_equals_reference(conv, bounds, seed):
    spec = CONVS[conv]
    B = 3
    shape = (B,) + _feat_shape(spec)
    x0 = torch.zeros(shape, dtype=DT)
    low, high, lb, hb = _bounds(bounds, x0)
    for with_bias, bias_sign in ((False, None), (True, "any"), (True, "neg")):
        layer = _conv_layer(spec, with_bias, bias_sign)
        for outside, M in ((False, 1), (True, 3)):
            a = _inputs(low, high, shape, outside)
            z = layer.forward(a)
            r_out = torch.rand((B, M) + tuple(z.shape[1:]), dtype=DT)
            for eps in (0.0, 0.05):
                if eps == 0.0 and (outside or bias_sign == "neg" or bounds in ("neg", "hi0")):
                    continue  # z may be 0 without a stabiliser
                _check(layer, a, r_out, low, high, lb, hb, eps,
                       f"{conv} bounds={bounds} bias={with_bias}/{bias_sign} outside={outside} M={M} eps={eps}")


def test_expanded_bound_images_and_linear_padded_input(seed):
    """The bound images as lrp.py passes them: expanded (1, C, H, W), or F.pad-ed for a layer that
    reads F.pad(x) (then l is not 0 everywhere, even for bounds (0, 1) with a pad value)."""
    spec = CONVS["2d-s2"]
    B, shape = 2, (2,) + _feat_shape(spec)
    low, high, lb, hb = _bounds("chan", torch.zeros(shape, dtype=DT))
    lo_img, hi_img = low.expand((1,) + shape[1:]), high.expand((1,) + shape[1:])
    layer = _conv_layer(spec, True, "any")
    a = _inputs(low, high, shape, True)
    r_out = torch.rand((B, 2) + tuple(layer.forward(a).shape[1:]), dtype=DT)
    _check(layer, a, r_out, lo_img, hi_img, lb, hb, 0.01, "expanded")
    lo_p, hi_p = F.pad(lo_img, (1, 1, 1, 1), value=0.3), F.pad(hi_img, (1, 1, 1, 1), value=0.3)
    ap = F.pad(a, (1, 1, 1, 1), value=0.3)
    r_out = torch.rand((B, 2) + tuple(layer.forward(ap).shape[1:]), dtype=DT)
    _check(layer, ap, r_out, lo_p, hi_p, lb, hb, 0.01, "F.pad-ed bounds")


@pytest.mark.parametrize("bounds", ["01", "neg", "chan"])
def test_linear_equals_reference(bounds, seed):
    B, C, O = 4, 8, 5
    bnd = BOUNDS[bounds]
    if bounds == "chan":  # per-feature bounds of a flattened input
        bnd = (torch.tensor(bnd[0] * 2, dtype=DT), torch.tensor(bnd[1] * 2, dtype=DT))
        low, high = bnd[0].reshape(1, C), bnd[1].reshape(1, C)
        lb, hb = float(low.min()), float(high.max())
    else:
        low, high, lb, hb = bound_images(bnd, torch.zeros(B, C, dtype=DT))
    for with_bias, bias_sign in ((False, None), (True, "any"), (True, "neg")):
        w = torch.randn(O, C, dtype=DT)
        b = None if not with_bias else (torch.randn(O, dtype=DT) if bias_sign == "any"
                                        else -torch.rand(O, dtype=DT) - 0.3)
        layer = LinearLayer("linear", w, b)
        for outside in (False, True):
            a = _inputs(low, high, (B, C), outside)
            for M in (1, 3):
                r_out = torch.rand(B, M, O, dtype=DT)
                _check(layer, a, r_out, low, high, lb, hb, 0.02, f"linear {bounds} {with_bias} {outside} M={M}")
    # token inputs (B, T, C): a linear layer applied to the last axis
    a = torch.rand(B, 3, C, dtype=DT)
    low, high, lb, hb = bound_images((0.0, 1.0), a)
    layer = LinearLayer("linear", torch.randn(O, C, dtype=DT), torch.randn(O, dtype=DT))
    _check(layer, a, torch.rand(B, 2, 3, O, dtype=DT), low, high, lb, hb, 0.02, "linear tokens")


def test_z_zero_and_negative_occur(seed):
    """Bounds (-1, 0.5), a negative bias and pixels outside the bounds: z < 0 and z == 0 exactly
    both occur, and the maps still equal the reference's (sign(0) := +1)."""
    w = torch.tensor([[[[1.0]], [[1.0]]], [[[0.5]], [[-2.0]]]], dtype=DT)  # 1x1 conv, 2 -> 2
    layer = LinearLayer("conv2d", w, torch.tensor([0.0, -1.0], dtype=DT), (1, 1), (0, 0), (1, 1), 1)
    a = torch.rand(2, 2, 4, 4, dtype=DT)
    a[0, 0, 0, 0], a[0, 1, 0, 0] = -1.5, -0.5  # unit 0: z = (-1.5+1) + (-0.5+1) = 0 exactly
    a[1, 0] = -3.0  # unit 0 below l: z < 0
    low, high, lb, hb = bound_images((-1.0, 0.5), a)
    z = layer.forward(a) - layer.forward(low.expand(1, 2, 4, 4), w.clamp(min=0), layer.bias.clamp(min=0) * lb) \
        - layer.forward(high.expand(1, 2, 4, 4), w.clamp(max=0), layer.bias.clamp(max=0) * hb)
    assert bool((z == 0).any()) and bool((z < 0).any())
    r_out = torch.rand(2, 2, 2, 4, 4, dtype=DT)
    _check(layer, a, r_out, low, high, lb, hb, 0.25, "z = 0 and z < 0")


def test_fold_batchnorm_for_zb(seed):
    """z_full from fold_batchnorm_for_zb (the BN output recomputed from the conv output) gives the
    reference's map and gradients, in training mode (batch statistics) and eval mode."""
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=True).to(DT)
    x = torch.rand(4, 3, 8, 8, dtype=DT)
    gamma = (torch.rand(6, dtype=DT) + 0.5).requires_grad_()
    beta = torch.randn(6, dtype=DT).requires_grad_()
    low, high, lb, hb = bound_images((0.0, 1.0), x)
    G = torch.rand(4, 1, 6, 8, 8, dtype=DT, requires_grad=True)
    for training in (True, False):
        maps, grads = [], []
        for path in ("ref", "new"):
            conv.zero_grad()
            conv_out = conv(x)
            bn = dict(running_mean=torch.randn(6, dtype=DT), running_var=torch.rand(6, dtype=DT) + 0.5,
                      weight=gamma, bias=beta, training=training, eps=1e-5)
            torch.manual_seed(0)
            layer = LinearLayer("conv2d", conv.weight, conv.bias, (1, 1), (1, 1), (1, 1), 1)
            y = F.batch_norm(conv_out, bn["running_mean"].clone(), bn["running_var"].clone(), gamma, beta,
                             training, 0.0, 1e-5)
            r_out = y.relu().unsqueeze(1) * G
            if path == "ref":
                R = _zb_relevance_reference(fold_batchnorm_as_used(layer, bn, conv_out), x, r_out, low, high, lb, hb,
                                            0.01)
            else:
                folded, z_full = fold_batchnorm_for_zb(layer, bn, conv_out)
                torch.testing.assert_close(z_full, y, rtol=1e-12, atol=1e-12)
                R = zb_relevance(folded, x, r_out, low, high, lb, hb, 0.01, z_full=z_full)
            maps.append(R)
            grads.append(torch.autograd.grad((R * torch.linspace(-1, 1, R.numel(), dtype=DT).reshape(R.shape)).sum(),
                                             [conv.weight, conv.bias, gamma, beta, G]))
        torch.testing.assert_close(maps[1], maps[0], **TOL)
        for g1, g0 in zip(grads[1], grads[0]):
            torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-11)


def test_vanishing_terms_are_left_out(monkeypatch, seed):
    """Bounds (0, 1): one transposed convolution with two stacked weights (W, −W⁻), no convolution
    of the l image; bounds (-1, 0.5): three stacked weights and both constant images."""
    calls = []
    import fisnet.rules as rules
    real = rules.conv_input_grad

    def spy(g, weight, *args):
        calls.append(tuple(weight.shape))
        return real(g, weight, *args)

    monkeypatch.setattr(rules, "conv_input_grad", spy)
    layer = _conv_layer(CONVS["2d-g2-d2"], True, "any")  # groups 2: 2 input channels a group
    a = torch.rand(2, 4, 7, 6, dtype=DT)
    r = torch.rand((2, 1) + tuple(layer.forward(a).shape[1:]), dtype=DT)
    for bounds, n in (("01", 2), ("neg", 3)):
        calls.clear()
        low, high, lb, hb = _bounds(bounds, a)
        zb_relevance(layer, a, r, low, high, lb, hb, 0.1)
        assert calls == [(6, 2 * n) + (3, 3)], calls


# ------------------------------------------------------------------- gradcheck / gradgradcheck

def _small_cases():
    yield "conv2d-g2-pad", LinearLayer("conv2d", torch.randn(4, 1, 2, 3, dtype=DT), torch.randn(4, dtype=DT), (2, 1),
                                       (1, 0), (1, 1), 2, (1, 0, 0, 1)), (1, 2, 4, 4), "neg", 2
    yield "conv1d-dw", LinearLayer("conv1d", torch.randn(4, 1, 3, dtype=DT), torch.randn(4, dtype=DT), (1,), (1,),
                                   (1,), 4), (2, 4, 5), "01", 1
    yield "conv3d", LinearLayer("conv3d", torch.randn(2, 2, 2, 2, 1, dtype=DT), None, (1, 1, 1), (1, 0, 0), (1, 1, 1),
                                1), (1, 2, 3, 3, 2), "neg", 2
    yield "linear", LinearLayer("linear", torch.randn(3, 4, dtype=DT), torch.randn(3, dtype=DT)), (2, 4), "neg", 2


@pytest.mark.parametrize("case", [c[0] for c in _small_cases()])
def test_gradcheck_gradgradcheck(case, seed):
    name, layer, shape, bounds, M = next(c for c in _small_cases() if c[0] == case)
    x0 = torch.zeros(shape, dtype=DT)
    low, high, lb, hb = _bounds(bounds, x0)
    a = _inputs(low, high, shape, True)
    # the rule is not differentiable where z' = z − l·W⁺ − h·W⁻ is exactly 0 (the stabiliser's sign
    # steps there), which pixels exactly at the bounds can make happen (about 5 % of draws for the
    # depthwise case): those pixels move inside by 5 % of the range; the exact-bound values are
    # tested against the scalar oracle (test_mutants.py)
    span = high - low
    a = torch.where(a == low, low + 0.05 * span, torch.where(a == high, high - 0.05 * span, a))
    z = layer.forward(a)
    r_out = torch.rand((shape[0], M) + tuple(z.shape[1:]), dtype=DT)
    eps = 0.5  # the stabiliser's sign is a step: keep z_s away from 0
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_() if layer.bias is not None else None
    a = a.detach().clone().requires_grad_()
    r_out = r_out.requires_grad_()

    def fn(r, a_, w_, *bias, use_z=False):
        lay = LinearLayer(layer.kind, w_, bias[0] if bias else None, layer.stride, layer.padding, layer.dilation,
                          layer.groups, layer.pad)
        return zb_relevance(lay, a_, r, low, high, lb, hb, eps, z_full=lay.forward(a_) if use_z else None)

    inputs = (r_out, a, w) + ((b,) if b is not None else ())
    for use_z in (False, True):
        f = lambda *t: fn(*t, use_z=use_z)  # noqa: E731
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5), (name, use_z)
        assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4), (name, use_z)


def test_zb_ratio_gradcheck_gradgradcheck(seed):
    z = torch.randn(3, 4, 5, dtype=DT)
    z = torch.where(z.abs() < 0.05, z + 0.2 * torch.sign(z + 1e-9), z).requires_grad_()
    for M in (1, 3):
        r = torch.rand(3, M, 4, 5, dtype=DT, requires_grad=True)
        for eps in (0.0, 0.1):
            f = lambda r_, z_: ZbRatio.apply(r_, z_, eps)  # noqa: E731
            assert torch.autograd.gradcheck(f, (r, z))
            assert torch.autograd.gradgradcheck(f, (r, z))
            s, zs = f(r, z)
            zs_want = z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
            torch.testing.assert_close(zs, zs_want, rtol=0, atol=0)
            torch.testing.assert_close(s, r / zs_want.unsqueeze(1), rtol=0, atol=0)


def test_zb_ratio_under_vmap(seed):
    """ZbRatio works under torch.func.vmap and torch.func.grad (generate_vmap_rule)."""
    z = torch.rand(4, 2, 3, dtype=DT) + 0.5
    r = torch.rand(4, 2, 1, 3, dtype=DT)
    out = torch.func.vmap(lambda r_, z_: ZbRatio.apply(r_, z_, 0.1)[0])(r, z)
    torch.testing.assert_close(out, r / (z + 0.1).unsqueeze(2), **TOL)
    g = torch.func.grad(lambda z_: ZbRatio.apply(r[0], z_, 0.1)[0].sum())(z[0])
    torch.testing.assert_close(g, -(r[0] / (z[0] + 0.1).unsqueeze(1) ** 2).sum(1), **TOL)


def test_zb_ratio_with_bound_term_gradcheck(seed):
    """ZbRatio(r, z, ε, c) = ZbRatio(r, z − c, ε) in value and in every first and second derivative, for c
    of one image (B = 1) and of a bias shape (O, 1): the bound terms are subtracted inside the op
    (two terms: test_conv_equals_reference with bounds "neg" and "chan")."""
    z = torch.randn(3, 4, 5, dtype=DT)
    for c_shape in ((1, 4, 5), (4, 1)):
        c = (0.3 * torch.randn(c_shape, dtype=DT)).requires_grad_()
        zc = z - c.detach()
        zz = torch.where(zc.abs() < 0.05, z + 0.2, z).requires_grad_()  # keep z − c away from the kink at 0
        for M in (1, 2):
            r = torch.rand(3, M, 4, 5, dtype=DT, requires_grad=True)
            for eps in (0.0, 0.1):
                f = lambda r_, z_, c_: ZbRatio.apply(r_, z_, eps, c_)  # noqa: E731
                assert torch.autograd.gradcheck(f, (r, zz, c))
                assert torch.autograd.gradgradcheck(f, (r, zz, c))
                s, zs = f(r, zz, c)
                s0, zs0 = ZbRatio.apply(r, zz - c, eps)
                torch.testing.assert_close(zs, zs0, rtol=0, atol=0)
                torch.testing.assert_close(s, s0, rtol=0, atol=0)
                g = torch.randn_like(s)
                want = torch.autograd.grad((s0 * g).sum(), (r, zz, c))
                got = torch.autograd.grad((s * g).sum(), (r, zz, c))
                for w_, g_ in zip(want, got):
                    torch.testing.assert_close(g_, w_, **TOL)


def test_batch_stats_keep_only_their_input(seed):
    """The folded BatchNorm's batch statistics computed by the fold (rules._BatchStats, for a BatchNorm
    whose statistics the trace did not record): the mean and biased variance in value, with first and
    second derivatives (gradcheck, gradgradcheck) of both, and a graph that saves the input itself,
    not x − μ."""
    from fisnet.rules import _BatchStats
    for shape, dims in (((5, 3, 4, 2), (0, 2, 3)), ((6, 4), (0,)), ((3, 2, 5), (0, 2))):
        x = torch.randn(shape, dtype=DT, requires_grad=True)
        want = (x.mean(dim=dims), x.var(dim=dims, unbiased=False))
        got = _BatchStats.apply(x, dims)
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, **TOL)
        f = lambda t: _BatchStats.apply(t, dims)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x,)) and torch.autograd.gradgradcheck(f, (x,))
        for k in (0, 1):  # each output alone (the other's gradient None)
            assert torch.autograd.gradcheck(lambda t: _BatchStats.apply(t, dims)[k], (x,))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _BatchStats.apply(x, dims)
        assert len(saved) == 1 and saved[0] is x


@pytest.mark.parametrize("heatmap_switch_on", [False, True])
def test_traced_batch_norm_statistics_outputs(heatmap_switch_on, seed):
    """TracedBatchNorm's statistics outputs (the trace's BatchNorm folding): the batch mean and biased
    variance in value, with first and second derivatives of the output and both statistics together
    and of each alone (gradcheck, gradgradcheck; in the training step their gradient arrives in the
    final backward, added to x's own).  With the heatmap switch on, the output's gradient is the
    heatmap rule's (bn_train_bwd) and the statistics' gradient is still added exactly."""
    import fisnet_ext
    from fisnet.traced import TracedBatchNorm
    sw = fisnet_ext.HeatmapSwitch()
    hb = fisnet_ext.bn_heatmap_backward("cpu", "reference")
    for shape in ((5, 3, 4, 2), (6, 4), (3, 2, 5)):
        dims = (0,) + tuple(range(2, len(shape)))
        x = torch.randn(shape, dtype=DT, requires_grad=True)
        w = torch.rand(shape[1], dtype=DT, requires_grad=True)
        b = torch.randn(shape[1], dtype=DT, requires_grad=True)
        out, mean, var = TracedBatchNorm.apply(x, w, b, None, None, 0.1, 1e-3, (sw,), hb)
        torch.testing.assert_close(mean, x.mean(dim=dims), **TOL)
        torch.testing.assert_close(var, x.var(dim=dims, unbiased=False), **TOL)
        torch.testing.assert_close(out, F.batch_norm(x, None, None, w, b, True, 0.1, 1e-3), **TOL)

        def f(x, w, b, k=None):
            outs = TracedBatchNorm.apply(x, w, b, None, None, 0.1, 1e-3, (sw,), hb)
            return outs if k is None else outs[k]

        if heatmap_switch_on:  # the statistics' gradient against autograd of x.mean / x.var, with the
            # output's gradient the heatmap rule's: compared on a contraction
            gm, gv, go = torch.randn_like(mean), torch.randn_like(var), torch.randn_like(out)
            with sw:
                o, m_, v_ = f(x, w, b)
                got = torch.autograd.grad([o, m_, v_], x, [go, gm, gv])[0]
            want = hb(go, x.detach(), w.detach(), 1e-3) + torch.autograd.grad(
                [x.mean(dim=dims), x.var(dim=dims, unbiased=False)], x, [gm, gv])[0]
            torch.testing.assert_close(got, want, **TOL)
            continue
        assert torch.autograd.gradcheck(f, (x, w, b)) and torch.autograd.gradgradcheck(f, (x, w, b))
        for k in (1, 2):  # a statistic alone: the output's gradient None
            assert torch.autograd.gradcheck(lambda t: f(t, w, b, k), (x,))
            assert torch.autograd.gradgradcheck(lambda t: f(t, w, b, k), (x,))


def test_trace_folds_batchnorm_with_the_forward_statistics(monkeypatch, seed):
    """The trace hands the BatchNorm's own batch statistics to the fold (no recomputation) and the maps
    and heatmap-loss gradients equal those of the fold that recomputes them."""
    import torch.nn as nn
    import fisnet.lrp as lrp
    import fisnet.rules as rules
    from fisnet.lrp import trace
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                      nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(5, 3)).to(DT).train()
    x = torch.rand(4, 3, 6, 6, dtype=DT)
    seen = []
    real = rules._bn_statistics

    def spy(bn, conv_out):
        seen.append("batch_mean" in bn)
        return real(bn, conv_out)

    monkeypatch.setattr(rules, "_bn_statistics", spy)
    results = []
    for keep in (True, False):
        if not keep:  # the fold computing the statistics itself
            monkeypatch.setattr(rules, "_bn_statistics", lambda bn, c: real(
                {k: v for k, v in bn.items() if k not in ("batch_mean", "batch_var")}, c))
        state = {k: v.clone() for k, v in m.state_dict().items()}
        t = trace(m, x, eps=0.05)
        R = t.relevance(t.logits[:, :1], create_graph=True)["input"]
        loss = (R.abs() * torch.linspace(0, 1, 6, dtype=DT)).sum()
        grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
        results.append((R.detach(), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, m.parameters())]))
        m.load_state_dict(state)  # the same running statistics for the second trace
    assert seen and all(seen)
    (r0, g0), (r1, g1) = results
    torch.testing.assert_close(r0, r1, **TOL)
    for a_, b_ in zip(g0, g1):
        torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bn", [True, False])
def test_inplace_relu_output_stands_in_for_z(bn, monkeypatch, seed):
    """A first layer (conv, conv + BatchNorm) followed by an in-place ReLU: the trace takes Zb's z from the
    ReLU output (s = 0 where the ReLU is off, whatever z is) instead of recomputing it; the maps and the
    gradient of a heatmap loss through them (the training step's double backward) equal those of the same
    network with an out-of-place ReLU, whose z the trace keeps (train mode, batch statistics)."""
    import torch.nn as nn
    import fisnet.lrp as lrp
    from fisnet.lrp import trace

    def net(inplace):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=not bn), *([nn.BatchNorm2d(6)] if bn else []),
                             nn.ReLU(inplace=inplace), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).to(DT).train()

    calls = []
    real = lrp.zb_ratio

    def spy(layer, a, r_out, *args, z_full=None, **kw):
        calls.append(z_full)
        return real(layer, a, r_out, *args, z_full=z_full, **kw)

    monkeypatch.setattr(lrp, "zb_ratio", spy)
    monkeypatch.setattr(lrp, "fold_batchnorm_for_zb", lambda *a, **k: pytest.fail("z recomputed"))
    x = torch.rand(4, 3, 6, 6, dtype=DT)
    masks = (torch.rand(4, 1, 6, 6, dtype=DT) > 0.5).to(DT)
    results = []
    for inplace in (False, True):
        m = net(inplace)
        t = trace(m, x, eps=0.05)
        R = t.relevance(t.logits[:, :1] - 0.5 * t.logits[:, 1:2], create_graph=True)["input"]
        loss = (R.abs() * (1 - masks.unsqueeze(1))).sum() + 0.1 * R.sum() ** 2
        grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
        results.append((R.detach(), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, m.parameters())]))
        assert calls[-1] is not None  # z kept (out of place) or the ReLU output (in place): never recomputed
        if inplace:
            assert float(calls[-1].min()) >= 0.0  # it was the ReLU output
        else:
            assert float(calls[-1].min()) < 0.0  # the layer output itself
    (r0, g0), (r1, g1) = results
    torch.testing.assert_close(r1, r0, **TOL)
    for a_, b_ in zip(g1, g0):
        torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-12)
    assert len(calls) == 2 and all(c is not None for c in calls)


@pytest.mark.parametrize("positive", [True, False])
def test_scaled_part_is_the_signed_part_of_the_folded_weight(positive, seed):
    """rules.scaled_part: (W·scale)⁺ / (W·scale)⁻ per output channel, scale of either sign (a BatchNorm's
    γ may be negative), with exact first and second derivatives in W and scale, keeping only W and
    scale (not the folded W·scale) for the backward."""
    from fisnet.rules import scaled_part
    for shape in ((4, 3, 3, 3), (5, 2), (3, 1, 4)):
        w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        scale = torch.randn(shape[0], dtype=torch.float64)
        scale[0] = -abs(float(scale[0]))  # at least one negative channel
        scale.requires_grad_(True)
        ws = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
        want = ws.clamp(min=0) if positive else ws.clamp(max=0)
        torch.testing.assert_close(scaled_part(w, scale, positive), want, rtol=0, atol=0)
        f = lambda w_, s_: scaled_part(w_, s_, positive)  # noqa: E731
        assert torch.autograd.gradcheck(f, (w, scale)) and torch.autograd.gradgradcheck(f, (w, scale))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            scaled_part(w, scale, positive)
        assert len(saved) == 2 and saved[0] is w and saved[1] is scale
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)  # no BatchNorm: W's own parts
    torch.testing.assert_close(scaled_part(w, None, positive), w.clamp(min=0) if positive else w.clamp(max=0))
