"""Tests written to kill the mutants that survived the suite (issue 14).

Each test compares the code with an oracle written here by hand, independently of the code under
test (plain Python loops or closed forms):

* the Zb stabiliser `z + ε·sign(z)` with sign(0) := +1 (a mutant `z + ε`, or sign(0) := −1,
  survived because no test fed Zb a z ≤ 0): pixels outside the bounds, bounds (−1, 0.5) and a
  negative bias make z < 0 and z == 0 exactly;
* the Selective quantity η = log(p + ε_s) − log(1 − p + ε_s) (a mutant without ε_s in the second
  log survived): η = 0 at p = ½, finite at p = 1, an exact value at p = ¾;
* `background_share` (a mutant with the mask inverted survived): exact values.

tools/mutate.py plants these mutants (and others) in a copy of the package and runs this file.
"""
import math

import pytest
import torch
import torch.nn as nn

from fisnet.metrics import background_share
from fisnet.rules import LinearLayer, bound_images, zb_relevance
from fisnet.variants import selective_quantity


# ---------------------------------------------------------------- Zb (docs/spec.md §2.1)

def _sign(v: float) -> float:
    return 1.0 if v >= 0 else -1.0


def zb_oracle_linear(W, b, x, r_out, low, high, low_b, high_b, eps):
    """Hand-written Zb for a linear layer, scalar loops in Python floats.

    W (K, J), b (K,) or None, x (B, J), r_out (B, M, K), low/high per input j (lists).
    z_k = Σ_j (W_kj x_j − W⁺_kj l_j − W⁻_kj h_j) + (b_k − b⁺_k l_b − b⁻_k h_b);  z_k += ε·sign(z_k)
    R_j = Σ_k (x_j W_kj − l_j W⁺_kj − h_j W⁻_kj) · R_k / z_k
    """
    K, J = len(W), len(W[0])
    out = []
    for xb, rb in zip(x, r_out):
        z = []
        for k in range(K):
            zk = 0.0
            for j in range(J):
                w = W[k][j]
                zk += w * xb[j] - max(w, 0.0) * low[j] - min(w, 0.0) * high[j]
            if b is not None:
                zk += b[k] - max(b[k], 0.0) * low_b - min(b[k], 0.0) * high_b
            z.append(zk + eps * _sign(zk))
        maps = []
        for rm in rb:
            rj = []
            for j in range(J):
                acc = 0.0
                for k in range(K):
                    w = W[k][j]
                    acc += (xb[j] * w - low[j] * max(w, 0.0) - high[j] * min(w, 0.0)) * rm[k] / z[k]
                rj.append(acc)
            maps.append(rj)
        out.append(maps)
    return torch.tensor(out, dtype=torch.float64)


def _zb_linear(W, b, x, r_out, bounds, eps):
    W = torch.tensor(W, dtype=torch.float64)
    b = None if b is None else torch.tensor(b, dtype=torch.float64)
    x = torch.tensor(x, dtype=torch.float64)
    r = torch.tensor(r_out, dtype=torch.float64)
    low, high, lb, hb = bound_images(bounds, x)
    return zb_relevance(LinearLayer("linear", W, b), x, r, low, high, lb, hb, eps)


def test_zb_exact_zero_z_uses_plus_sign():
    """z == 0 exactly (a pixel below l cancels one above it): the stabiliser must be +ε."""
    # bounds (0, 1), no bias; unit 0: x0 = −1 (below l), x1 = 1 → z0 = 1·(−1 − 0) + 1·(1 − 0) = 0
    W = [[1.0, 1.0], [0.5, -2.0]]
    x = [[-1.0, 1.0]]
    r = [[[2.0, 0.0]]]  # all relevance on unit 0
    eps = 0.25
    got = _zb_linear(W, None, x, r, (0.0, 1.0), eps)
    exp = zb_oracle_linear(W, None, x, r, [0.0, 0.0], [1.0, 1.0], 0.0, 1.0, eps)
    # by hand: s0 = 2/(+0.25) = 8; R = (x·W − l·W⁺ − h·W⁻)·s = (−1·8, 1·8)
    assert exp.flatten().tolist() == [-8.0, 8.0]
    torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)


def test_zb_negative_z_from_negative_bias_and_bounds():
    """Bounds (−1, 0.5) with a negative bias: the bias part b⁻(1 − h_b) < 0 gives z < 0."""
    W = [[0.5, -0.25]]
    b = [-2.0]
    x = [[0.0, 0.0]]
    r = [[[1.0]]]
    eps = 0.5
    # z = 0.5·(0 − (−1)) + (−0.25)·(0 − 0.5) + (−2 − (−2)·0.5) = 0.5 + 0.125 − 1 = −0.375
    # z − ε = −0.875;  R = (0·0.5 + 1·0.5, 0·(−0.25) − 0.5·(−0.25)) / (−0.875)
    got = _zb_linear(W, b, x, r, (-1.0, 0.5), eps)
    hand = torch.tensor([[[0.5 / -0.875, 0.125 / -0.875]]], dtype=torch.float64)
    exp = zb_oracle_linear(W, b, x, r, [-1.0, -1.0], [0.5, 0.5], -1.0, 0.5, eps)
    torch.testing.assert_close(exp, hand, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (-1.0, 0.5)])
def test_zb_random_pixels_outside_bounds(seed, bounds):
    """Random layers and pixels well outside [l, h], bias of both signs: z takes both signs."""
    g = torch.Generator().manual_seed(seed)
    B, M, J, K = 3, 2, 5, 7
    W = torch.randn(K, J, generator=g, dtype=torch.float64)
    b = torch.randn(K, generator=g, dtype=torch.float64) - 0.5
    x = torch.rand(B, J, generator=g, dtype=torch.float64) * 4.0 - 2.0  # [−2, 2] ⊄ bounds
    r = torch.randn(B, M, K, generator=g, dtype=torch.float64)
    eps = 0.3
    got = _zb_linear(W.tolist(), b.tolist(), x.tolist(), r.tolist(), bounds, eps)
    lo, hi = bounds
    exp = zb_oracle_linear(W.tolist(), b.tolist(), x.tolist(), r.tolist(), [lo] * J, [hi] * J, lo, hi, eps)
    torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


def test_zb_conv_outside_bounds_matches_unrolled_oracle(seed):
    """The same rule on a strided, padded conv, against the oracle on the conv written as a
    matrix (built here from F.unfold's patch positions: one row per output cell)."""
    g = torch.Generator().manual_seed(seed)
    B, M, C, H, Wd, O = 2, 2, 2, 5, 4, 3
    w = torch.randn(O, C, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(O, generator=g, dtype=torch.float64) - 0.5
    x = torch.rand(B, C, H, Wd, generator=g, dtype=torch.float64) * 3.0 - 1.5
    stride, pad = 2, 1
    Ho, Wo = (H + 2 * pad - 3) // stride + 1, (Wd + 2 * pad - 3) // stride + 1
    r = torch.randn(B, M, O, Ho, Wo, generator=g, dtype=torch.float64)
    lo, hi, eps = -1.0, 0.5, 0.2
    layer = LinearLayer("conv2d", w, bias, (stride, stride), (pad, pad), (1, 1), 1)
    low, high, lb, hb = bound_images((lo, hi), x)
    got = zb_relevance(layer, x, r, low, high, lb, hb, eps)

    # the conv as a dense (O·Ho·Wo, C·H·W) matrix: input index of each kernel tap, by hand
    J = C * H * Wd
    rows, bvec = [], []
    for o in range(O):
        for i in range(Ho):
            for j in range(Wo):
                row = [0.0] * J
                for c in range(C):
                    for di in range(3):
                        for dj in range(3):
                            ii, jj = i * stride - pad + di, j * stride - pad + dj
                            if 0 <= ii < H and 0 <= jj < Wd:
                                row[(c * H + ii) * Wd + jj] = float(w[o, c, di, dj])
                rows.append(row)
                bvec.append(float(bias[o]))
    exp = zb_oracle_linear(rows, bvec, x.reshape(B, J).tolist(), r.reshape(B, M, -1).tolist(),
                           [lo] * J, [hi] * J, lo, hi, eps)
    torch.testing.assert_close(got.reshape(B, M, J), exp, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- Selective η (docs/spec.md §3)

def _eta(logits, cls, eps_s):
    lg = torch.tensor([logits], dtype=torch.float64)
    return float(selective_quantity(lg, torch.tensor([cls]), eps_s)[0, 0])


def test_selective_eta_is_zero_at_one_half():
    # two equal logits: p = ½ → log(½ + ε_s) − log(½ + ε_s) = 0 exactly
    assert _eta([0.3, 0.3], 0, 0.01) == 0.0
    assert _eta([-2.0, -2.0], 1, 0.2) == 0.0


def test_selective_eta_is_finite_at_p_one():
    # p = softmax([800, 0])_0 == 1.0 in float64: η = log(1 + ε_s) − log(ε_s)
    eta = _eta([800.0, 0.0], 0, 0.01)
    assert math.isfinite(eta)
    assert eta == pytest.approx(math.log(1.01) - math.log(0.01), rel=1e-12)
    # and p = 0: η = log(ε_s) − log(1 + ε_s)
    assert _eta([800.0, 0.0], 1, 0.01) == pytest.approx(math.log(0.01) - math.log(1.01), rel=1e-12)


def test_selective_eta_exact_value():
    # logits (log 3, 0, −inf-ish): p_0 = 3/4 with two classes
    eps_s = 0.05
    eta = _eta([math.log(3.0), 0.0], 0, eps_s)
    assert eta == pytest.approx(math.log(0.75 + eps_s) - math.log(0.25 + eps_s), rel=1e-12)
    # three classes, p_1 = 2/(1+2+5) = 1/4
    eta = _eta([0.0, math.log(2.0), math.log(5.0)], 1, eps_s)
    assert eta == pytest.approx(math.log(0.25 + eps_s) - math.log(0.75 + eps_s), rel=1e-12)


# ---------------------------------------------------------------- background share (metrics)

def _one_hidden_unit_net(J, g):
    """Flatten → Linear(J, 1) → ReLU → Linear(1, 2).  The bias keeps the unit on for x ∈ [0, 1]."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(J, 1), nn.ReLU(), nn.Linear(1, 2)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(1, J, generator=g, dtype=torch.float64))
        net[1].bias.fill_(float(net[1].weight.abs().sum()) + 1.0)
        net[3].weight.copy_(torch.tensor([[1.5], [-0.5]], dtype=torch.float64))
        net[3].bias.zero_()
    return net


def _share_oracle(net, x, m, eps):
    """R_i = x_i · w1_i · w2_c · y/(y + ε) by hand (one ReLU unit, Zb off); Σ|R|(1 − m) / Σ|R|."""
    w1 = net[1].weight.detach()[0]
    b1 = float(net[1].bias.detach())
    w2 = net[3].weight.detach()[:, 0]
    bg, tot = 0.0, 0.0
    for xb, mb in zip(x, m):
        xf, mf = xb.reshape(-1), mb.reshape(-1)
        y = max(float((w1 * xf).sum()) + b1, 0.0)
        c = 0 if float(w2[0]) * y >= float(w2[1]) * y else 1
        for i in range(xf.numel()):
            a = abs(float(xf[i]) * float(w1[i]) * float(w2[c]) * y / (y + eps))
            tot += a
            bg += a * (1.0 - float(mf[i]))
    return bg / tot


def test_background_share_exact_values(seed):
    g = torch.Generator().manual_seed(seed)
    B, H, W = 3, 4, 5
    net = _one_hidden_unit_net(H * W, g)
    x = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64)
    m = (torch.rand(B, 1, H, W, generator=g) < 0.4).double()
    m[:, :, 0, 0] = 1.0
    m[:, :, 0, 1] = 0.0  # some of both in every image
    labels = torch.zeros(B, dtype=torch.long)
    eps = 0.1
    exp = _share_oracle(net, x, m, eps)
    assert 0.0 < exp < 1.0
    got = background_share(net, [(x, m, labels)], eps=eps, zb=False)
    assert got == pytest.approx(exp, rel=1e-9)
    # all foreground → 0; all background → 1
    assert background_share(net, [(x, torch.ones_like(m), labels)], eps=eps, zb=False) == 0.0
    assert background_share(net, [(x, torch.zeros_like(m), labels)], eps=eps, zb=False) == pytest.approx(1.0)


def test_background_share_half_mask_by_hand():
    """A 1×2 image, x = (1, 1), w1 = (1, 3): |R| ∝ (1, 3); foreground = the left pixel → 3/4."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 2)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 3.0]], dtype=torch.float64))
        net[1].bias.zero_()
        net[3].weight.copy_(torch.tensor([[2.0], [1.0]], dtype=torch.float64))
        net[3].bias.zero_()
    x = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    m = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    got = background_share(net, [(x, m, torch.zeros(1, dtype=torch.long))], eps=0.0, zb=False)
    assert got == pytest.approx(0.75, rel=1e-12)


# ---------------------------------------------------------------- accuracy (metrics)

def test_evaluate_exact_accuracy():
    """An identity 'classifier' on one-hot-like inputs: predictions known by hand."""
    from fisnet.metrics import evaluate
    net = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(3))
    x = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [5.0, 0, 0], [0, 0, 1.0]])
    y = torch.tensor([0, 1, 0, 2, 2])  # predictions 0, 1, 2, 0, 2: right, right, wrong, wrong, right
    m = torch.ones(5, 1, 1, 3)
    assert evaluate(net, [(x, m, y)]) == pytest.approx(3 / 5)
    assert evaluate(net, [(x[:2], m[:2], y[:2]), (x[2:], m[2:], y[2:])]) == pytest.approx(3 / 5)
    onehot = torch.nn.functional.one_hot(y, 3).float()
    assert evaluate(net, [(x, m, onehot)]) == pytest.approx(3 / 5)


# ---------------------------------------------------------------- argument checks (lrp.trace)

@pytest.mark.parametrize("eps", [-0.1, -1.0, float("nan")])
def test_negative_eps_refused_before_the_model_runs(eps):
    """The trace refuses ε < 0 itself, before any forward (the op layer would refuse it later,
    after the model has run)."""
    import fisnet
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    calls = []
    net.register_forward_pre_hook(lambda m, i: calls.append(1))
    with pytest.raises(ValueError, match=r"eps must be >= 0"):
        fisnet.explain(net, torch.rand(2, 1, 2, 2), eps=eps, zb=False)
    assert calls == [], "the model ran before ε was checked"
