"""Tests of fisnet.loss: GWRP, mask resizing, the heatmap loss (docs/spec.md §4, §7.8, §7.9), ISNetLoss."""
import math

import pytest
import torch
import torch.nn.functional as F

from fisnet.loss import (
    ISNetLoss,
    NonFiniteHeatmapError,
    gwrp,
    gwrp_topk,
    heatmap_loss,
    heatmap_loss_parts,
    resize_masks,
)
from fisnet import loss as loss_mod


def naive_gwrp(x, d):
    """Independent oracle: full descending sort, explicit weights d**i (0**0 = 1)."""
    v = torch.sort(x, dim=-1, descending=True).values
    n = x.shape[-1]
    w = torch.tensor([d ** i for i in range(n)], dtype=torch.float64)
    return (v.double() * w).sum(-1) / w.sum()


def hm(values):
    """A (1, 1, 1, 1, W) heatmap from a list of values."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 1, 1, -1)


class Out:
    def __init__(self, logits, heatmaps):
        self.logits, self.heatmaps = logits, heatmaps


# ---------------------------------------------------------------------------------- GWRP


def test_gwrp_d1_is_mean_and_d0_is_max():
    x = torch.randn(4, 5, 37, dtype=torch.float64)
    torch.testing.assert_close(gwrp(x, 1.0), x.mean(-1))
    torch.testing.assert_close(gwrp(x, 0.0), x.amax(-1))
    torch.testing.assert_close(gwrp(x, 0.0, dim=1), x.amax(1))


def test_gwrp_hand_computed_three_values():
    x = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    # sorted 3, 2, 1 with weights 1, 0.5, 0.25
    expected = (3 * 1 + 2 * 0.5 + 1 * 0.25) / 1.75
    assert gwrp(x, 0.5).item() == pytest.approx(expected, rel=1e-12)
    # d = 0.9 on a reordered input with a negative value
    x = torch.tensor([-1.0, 4.0, 0.5], dtype=torch.float64)
    expected = (4 + 0.9 * 0.5 + 0.81 * -1) / (1 + 0.9 + 0.81)
    assert gwrp(x, 0.9).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("d", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("n", [7, 1000, 100_000])
def test_gwrp_topk_matches_full_sort(d, n):
    torch.manual_seed(n)
    x = torch.randn(3, n, dtype=torch.float64)
    ref = naive_gwrp(x, d)
    bound = d ** gwrp_topk(d, n) * x.abs().max().item()  # documented tail error bound
    fast = gwrp(x, d)
    assert (fast - ref).abs().max().item() <= bound + 1e-12
    torch.testing.assert_close(gwrp(x, d, exact=True), ref, rtol=1e-10, atol=1e-12)
    # float32: the top-k path agrees with the full sort to float tolerance
    x32 = x.float()
    torch.testing.assert_close(gwrp(x32, d), gwrp(x32, d, exact=True), rtol=1e-5, atol=1e-6)
    if n > gwrp_topk(d, n):
        assert gwrp_topk(d, n) < n  # the top-k path is really taken here


def test_gwrp_dim_argument_and_weight_cache():
    x = torch.rand(6, 50, 4, dtype=torch.float64)
    torch.testing.assert_close(gwrp(x, 0.8, dim=1), naive_gwrp(x.movedim(1, -1), 0.8))
    w1 = loss_mod._rank_weights(0.8, 50, torch.float64, x.device)
    w2 = loss_mod._rank_weights(0.8, 50, torch.float64, x.device)
    assert w1 is w2


def test_gwrp_gradcheck_topk_path():
    torch.manual_seed(0)
    x = (torch.randperm(200, dtype=torch.float64) / 50.0).reshape(2, 100).requires_grad_()
    assert gwrp_topk(0.5, 100) < 100
    assert torch.autograd.gradcheck(lambda t: gwrp(t, 0.5), (x,))
    assert torch.autograd.gradgradcheck(lambda t: gwrp(t, 0.5), (x,))


@pytest.mark.parametrize("d", [-0.1, 1.5, "a"])
def test_gwrp_bad_decay(d):
    with pytest.raises(ValueError, match="d must be"):
        gwrp(torch.rand(5), d)


# ---------------------------------------------------------------------------------- masks


def test_resize_one_pixel_4x4_to_2x2():
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 3, 0] = 1
    r = resize_masks(m, 2)
    assert r.shape == (1, 1, 2, 2)
    assert r.sum().item() == 1 and r[0, 0, 1, 0].item() == 1


def test_resize_non_integer_and_upsampling():
    m = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    m[0, 0, 2, 2] = True  # the centre pixel straddles all four 2x2 cells
    r = resize_masks(m, (2, 2))
    assert r.dtype == torch.float32 and r.sum().item() == 4
    m = torch.zeros(1, 1, 5, 5)
    m[0, 0, 0, 0] = 1
    assert resize_masks(m, (2, 2))[0, 0].tolist() == [[1, 0], [0, 0]]
    m = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    up = resize_masks(m, (4, 4))[0, 0]
    expected = torch.zeros(4, 4)
    expected[0:2, 2:4] = 1
    assert torch.equal(up, expected)
    # multi-channel masks resize channel-wise
    m = torch.zeros(2, 3, 4, 4)
    m[1, 2, 0, 3] = 1
    r = resize_masks(m, 2)
    assert r.sum().item() == 1 and r[1, 2, 0, 1].item() == 1


# ---------------------------------------------------------------------------------- loss closed forms


def test_background_term_closed_form():
    # one channel, 4 pixels; pixel 0 is foreground with |R| = 2 -> foreground mean 2
    R = hm([-2.0, 4.0, -1.0, 2.0])
    mask = torch.tensor([1.0, 0, 0, 0]).reshape(1, 1, 1, 4)
    # N * background = [0, 2, 0.5, 1]; sorted 2, 1, 0.5, 0; d = 0.5 weights 1, .5, .25, .125
    g = (2 + 0.5 + 0.125) / 1.875
    assert g == pytest.approx(1.4)
    parts = heatmap_loss_parts(R, mask, cuts=(1.0, 3.0), d=0.5, E=2.0, weights=(2.0, 3.0))
    assert parts["background"].item() == pytest.approx(math.log(1 + 1.4 / 2.0), rel=1e-9)
    assert parts["foreground"].item() == pytest.approx(0.0, abs=1e-12)  # F = 2 in [C1, C2]
    assert parts["total"].item() == pytest.approx(2.0 * math.log(1.7), rel=1e-9)


def test_foreground_mean_counts_channels_with_shared_mask():
    # C = 2 channels share a 1-channel mask [fg, bg]: count = 2, F = 2 + 6 = 8, mean = 4
    R = torch.tensor([[2.0, 1.0], [6.0, 4.0]], dtype=torch.float64).reshape(1, 1, 2, 1, 2)
    mask = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    # channel 0: N·bg = [0, 1/4] -> GWRP_0.5 = 0.25/1.5; channel 1: [0, 1] -> 1/1.5
    expected = 0.5 * (math.log(1 + 0.25 / 1.5) + math.log(1 + 1 / 1.5))
    parts = heatmap_loss_parts(R, mask, cuts=(4.0, 20.0), d=0.5)
    assert parts["background"].item() == pytest.approx(expected, rel=1e-9)
    # a C-channel mask: only channel 1's first pixel is foreground -> mean 6
    mask2 = torch.tensor([[0.0, 0.0], [1.0, 0.0]]).reshape(1, 2, 1, 2)
    g0 = naive_gwrp(torch.tensor([2 / 6, 1 / 6], dtype=torch.float64), 0.5).item()
    g1 = naive_gwrp(torch.tensor([0.0, 4 / 6], dtype=torch.float64), 0.5).item()
    parts = heatmap_loss_parts(R, mask2, cuts=(4.0, 20.0), d=0.5)
    assert parts["background"].item() == pytest.approx(
        0.5 * (math.log1p(g0) + math.log1p(g1)), rel=1e-9)


@pytest.mark.parametrize("F_value, l2, hybrid", [
    (1.0, 0.25, 0.25),      # low side: (1/2 - 1)^2
    (3.0, 0.0, 0.0),        # inside [C1, C2]
    (6.0, 0.25, 0.25),      # ((6 - 5) / 2)^2, below C1 + C2 = 7
    (7.0, 1.0, 1.0),        # the hybrid junction
    (11.0, 9.0, 5.0),       # L2: (6/2)^2; hybrid: (11 - 7) + 1
])
def test_foreground_branches(F_value, l2, hybrid):
    R = hm([-F_value])                    # sign must not matter: A = |R|
    mask = torch.ones(1, 1, 1, 1)         # no background -> background term 0
    for mode, expected in (("L2", l2), ("hybrid", hybrid)):
        parts = heatmap_loss_parts(R, mask, cuts=(2.0, 5.0), foreground=mode)
        assert parts["background"].item() == 0.0
        assert parts["foreground"].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_hybrid_continuity_at_c1_plus_c2():
    mask = torch.ones(1, 1, 1, 1)
    c1, c2 = 2.0, 5.0
    vals = [heatmap_loss(hm([c1 + c2 + s]), mask, cuts=(c1, c2), foreground="hybrid").item()
            for s in (-1e-7, 0.0, 1e-7)]
    assert vals[1] == pytest.approx(1.0)
    assert max(vals) - min(vals) < 1e-6


def test_dual_cuts_list_and_reduction():
    # M = 2 maps, all foreground; F = 1 and 10
    R = torch.tensor([1.0, 10.0], dtype=torch.float64).reshape(1, 2, 1, 1, 1)
    mask = torch.ones(1, 1, 1, 1)
    dual = heatmap_loss(R, mask, cuts=[(2.0, 5.0), (4.0, 20.0)])
    assert dual.item() == pytest.approx((0.25 + 0.0) / 2)
    shared = heatmap_loss(R, mask, cuts=(2.0, 5.0))
    assert shared.item() == pytest.approx((0.25 + (10 - 7 + 1)) / 2)
    R2 = torch.cat([R, 2 * R])  # batch of 2
    none = heatmap_loss(R2, mask.expand(2, 1, 1, 1), cuts=(2.0, 5.0), reduction="none")
    assert none.shape == (2,)
    torch.testing.assert_close(heatmap_loss(R2, mask.expand(2, 1, 1, 1), cuts=(2.0, 5.0)),
                               none.mean())
    torch.testing.assert_close(
        heatmap_loss(R2, mask.expand(2, 1, 1, 1), cuts=(2.0, 5.0), reduction="sum"), none.sum())


def test_masks_are_resized_inside_the_loss():
    torch.manual_seed(1)
    R = torch.randn(2, 1, 3, 4, 4, dtype=torch.float64)
    m = (torch.rand(2, 1, 8, 8) > 0.7).float()
    m[:, :, 0, 0] = 1
    torch.testing.assert_close(heatmap_loss(R, m, cuts=(1.0, 5.0)),
                               heatmap_loss(R, resize_masks(m, 4), cuts=(1.0, 5.0)))


def test_all_background_and_all_foreground_images_are_finite():
    torch.manual_seed(2)
    R = torch.randn(2, 1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    m = torch.zeros(2, 1, 4, 4)
    m[1] = 1  # image 0: no foreground; image 1: no background
    parts = heatmap_loss_parts(R, m, cuts=(1.0, 5.0))
    assert torch.isfinite(parts["total"]).all()
    assert parts["foreground"][0].item() == pytest.approx(1.0)  # F = 0 -> (0 - 1)^2
    assert parts["background"][1].item() == 0.0
    parts["total"].sum().backward()
    assert torch.isfinite(R.grad).all()


def test_fp32_under_autocast():
    torch.manual_seed(3)
    R = torch.randn(2, 1, 2, 4, 4).bfloat16()
    m = (torch.rand(2, 1, 4, 4) > 0.5).float()
    m[:, :, 0, 0] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = heatmap_loss(R, m, cuts=(1.0, 5.0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, heatmap_loss(R.float(), m, cuts=(1.0, 5.0)))


# ---------------------------------------------------------------------------------- gradients


def _grad_case(seed, hw):
    g = torch.Generator().manual_seed(seed)
    B, M, C = 2, 2, 2
    # distinct magnitudes (no ties in the sort), away from 0 (the kink of |.|)
    mags = (torch.randperm(B * M * C * hw * hw, generator=g).double() + 50.0) / 100.0
    signs = torch.where(torch.rand(mags.shape, generator=g) > 0.5, 1.0, -1.0).double()
    R = (mags * signs).reshape(B, M, C, hw, hw)
    R[1] *= 10.0  # image 1 far above the cuts, image 0 below / between
    mask = (torch.rand(B, 1, hw, hw, generator=g) > 0.5).float()
    mask[:, :, 0, 0], mask[:, :, -1, -1] = 1, 0
    return R.requires_grad_(), mask


@pytest.mark.parametrize("foreground", ["hybrid", "L2"])
@pytest.mark.parametrize("d, hw", [(0.9, 3), (0.5, 6)])  # full sort, then the top-k path
def test_heatmap_loss_gradcheck(foreground, d, hw):
    R, mask = _grad_case(hw, hw)
    F_ = (R.detach().abs() * mask[:, None]).sum((2, 3, 4))
    # cuts per map, chosen so no F sits on a kink (C1, C2, C1 + C2)
    cuts = [(float(F_[0, 0]) * 1.5, float(F_[0, 0]) * 4.0),      # map 0, image 0: low side
            (float(F_[0, 1]) * 0.5, float(F_[0, 1]) * 0.8)]      # map 1, image 0: C2 < F < C1+C2
    for c1, c2 in cuts:
        kinks = torch.tensor([c1, c2, c1 + c2], dtype=torch.float64)
        assert (F_.reshape(-1, 1) - kinks).abs().min() > 1e-3
    fn = lambda t: heatmap_loss(t, mask, cuts=cuts, d=d, E=0.7, foreground=foreground,
                                weights=(1.3, 0.6))
    assert torch.autograd.gradcheck(fn, (R,))
    assert torch.autograd.gradgradcheck(fn, (R,))


# ---------------------------------------------------------------------------------- bad inputs


def _ok():
    return torch.rand(2, 1, 3, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()


@pytest.mark.parametrize("make, words", [
    (lambda R, m: (R[:, 0], m), ["5-D", "(B, M, C, H, W)", "(2, 3, 4, 4)"]),
    (lambda R, m: (R, m[:, 0]), ["4-D", "unsqueeze(1)"]),
    (lambda R, m: (R, m[:1]), ["batch size", "(1, 1, 4, 4)", "(2, 1, 3, 4, 4)"]),
    (lambda R, m: (R, m.expand(2, 2, 4, 4)), ["2 channels", "C=3"]),
])
def test_bad_shapes(make, words):
    R, m = make(*_ok())
    with pytest.raises(ValueError) as e:
        heatmap_loss(R, m, cuts=(1.0, 2.0))
    for w in words:
        assert w in str(e.value)


def test_non_binary_mask():
    R, m = _ok()
    m[0, 0, 0, :2] = torch.tensor([0.3, 2.0])
    with pytest.raises(ValueError) as e:
        heatmap_loss(R, m, cuts=(1.0, 2.0))
    msg = str(e.value)
    assert "binary" in msg and "2 of" in msg and "(mask > 0.5).float()" in msg


def test_nan_inf_heatmaps_name_the_images():
    R = torch.rand(8, 1, 1, 4, 4)
    R[3, 0, 0, 1, 1] = float("nan")
    R[7, 0, 0, 0, 0] = float("inf")
    m = torch.ones(8, 1, 4, 4)
    with pytest.raises(FloatingPointError) as e:
        heatmap_loss(R, m, cuts=(1.0, 2.0))
    assert isinstance(e.value, ValueError) and isinstance(e.value, NonFiniteHeatmapError)
    msg = str(e.value)
    assert "[3, 7]" in msg and "NaN/inf" in msg and "learning rate" in msg


@pytest.mark.parametrize("cuts, words", [
    ((2.0, 2.0), ["C1 must be < C2"]),
    ((3.0, 2.0), ["C1 must be < C2"]),
    ((0.0, 2.0), ["C1 must be > 0"]),
    ((-1.0, 2.0), ["C1 must be > 0"]),
    (None, ["missing", "fisnet.tune_cuts"]),
    ([(1.0, 2.0)] * 3, ["3 (C1, C2) pairs", "M=1"]),
    ("ab", ["(C1, C2) pair"]),
])
def test_bad_cuts(cuts, words):
    R, m = _ok()
    with pytest.raises(ValueError) as e:
        heatmap_loss(R, m, cuts=cuts)
    for w in words:
        assert w in str(e.value)


def test_bad_options():
    R, m = _ok()
    with pytest.raises(ValueError, match="unknown foreground mode 'L3'"):
        heatmap_loss(R, m, cuts=(1.0, 2.0), foreground="L3")
    with pytest.raises(ValueError, match="E must be > 0"):
        heatmap_loss(R, m, cuts=(1.0, 2.0), E=0.0)
    with pytest.raises(ValueError, match="reduction"):
        heatmap_loss(R, m, cuts=(1.0, 2.0), reduction="max")


# ---------------------------------------------------------------------------------- ISNetLoss


def test_isnetloss_tensor_heatmaps_and_last():
    torch.manual_seed(4)
    logits = torch.randn(3, 5, requires_grad=True)
    labels = torch.tensor([0, 4, 2])
    R = torch.randn(3, 1, 3, 4, 4, requires_grad=True)
    m = (torch.rand(3, 1, 8, 8) > 0.5).float()
    crit = ISNetLoss(P=0.7, cuts=(1.0, 10.0))
    loss = crit(Out(logits, R), labels, m)
    heat = heatmap_loss(R, m, cuts=(1.0, 10.0))
    expected = 0.3 * F.cross_entropy(logits, labels) + 0.7 * heat
    torch.testing.assert_close(loss, expected)
    assert set(crit.last) >= {"ce", "heatmap", "background", "foreground"}
    for k in ("ce", "heatmap", "background", "foreground"):
        assert isinstance(crit.last[k], torch.Tensor) and not crit.last[k].requires_grad
    torch.testing.assert_close(crit.last["heatmap"], heat.detach())
    loss.backward()
    assert R.grad is not None and logits.grad is not None
    # a mapping works as `out` too
    torch.testing.assert_close(crit({"logits": logits, "heatmaps": R}, labels, m), loss)


def test_isnetloss_lds_dict_of_layers():
    torch.manual_seed(5)
    B = 2
    logits = torch.randn(B, 3)
    labels = torch.tensor([1, 2])
    heatmaps = {
        "input": torch.randn(B, 1, 3, 8, 8, dtype=torch.float64),
        "layer1": 3 * torch.randn(B, 1, 4, 4, 4, dtype=torch.float64),
        "layer2": 0.1 * torch.randn(B, 1, 6, 2, 2, dtype=torch.float64),
    }
    masks = torch.zeros(B, 3, 8, 8)  # a 3-channel mask: reduced to one channel for hidden layers
    masks[:, :, 2:5, 1:6] = 1
    masks[1, 0, 7, 7] = 1
    cuts = {"input": (1.0, 30.0), "layer1": (2.0, 40.0), "layer2": [(0.5, 3.0)]}
    d_lds = 0.8
    crit = ISNetLoss(P=0.5, d_lds=d_lds, cuts=cuts)
    loss = crit(Out(logits, heatmaps), labels, masks)

    one = masks.amax(1, keepdim=True)
    per = torch.stack([
        heatmap_loss(heatmaps["input"], masks, cuts=(1.0, 30.0)),
        heatmap_loss(heatmaps["layer1"], resize_masks(one, 4), cuts=(2.0, 40.0)),
        heatmap_loss(heatmaps["layer2"], resize_masks(one, 2), cuts=(0.5, 3.0)),
    ])
    srt = torch.sort(per, descending=True).values
    w = torch.tensor([1.0, d_lds, d_lds ** 2], dtype=torch.float64)
    combined = (srt * w).sum() / w.sum()
    assert len(set(per.tolist())) == 3  # distinct, so the order matters
    torch.testing.assert_close(combined, gwrp(per, d_lds))
    expected = 0.5 * F.cross_entropy(logits, labels).double() + 0.5 * combined
    torch.testing.assert_close(loss.double(), expected)
    assert set(crit.last["layers"]) == set(heatmaps)
    torch.testing.assert_close(crit.last["layers"]["layer1"], per[1])

    # a plain pair applies to every layer
    crit2 = ISNetLoss(P=0.5, d_lds=d_lds, cuts=(1.0, 30.0))
    assert torch.isfinite(crit2(Out(logits, heatmaps), labels, masks))
    # a missing layer in the cuts dict is named
    crit3 = ISNetLoss(P=0.5, cuts={"input": (1.0, 30.0)})
    with pytest.raises(ValueError, match="layer1"):
        crit3(Out(logits, heatmaps), labels, masks)
    # NaN in a hidden layer names the layer
    bad = dict(heatmaps)
    bad["layer2"] = bad["layer2"].clone()
    bad["layer2"][1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteHeatmapError, match=r"images \[1\].*layer2"):
        crit(Out(logits, bad), labels, masks)


def test_isnetloss_p_schedule():
    crit = ISNetLoss(P={3: 0.5, 0: 0.0, 10: 0.9}, cuts=(1.0, 10.0))
    assert [crit.p_at(e) for e in (None, 0, 2, 3, 9, 10, 50)] == [0.0, 0.0, 0.0, 0.5, 0.5, 0.9, 0.9]
    assert ISNetLoss(P=0.3).p_at(7) == 0.3
    torch.manual_seed(6)
    logits = torch.randn(2, 4, requires_grad=True)
    labels = torch.tensor([1, 3])
    R = torch.randn(2, 1, 1, 4, 4, requires_grad=True)
    m = torch.ones(2, 1, 4, 4)
    m[:, :, 0] = 0
    # P = 0: plain classification loss, the heatmap graph is not back-propagated, but logged
    loss0 = crit(Out(logits, R), labels, m, epoch=1)
    torch.testing.assert_close(loss0, F.cross_entropy(logits, labels))
    loss0.backward()
    assert R.grad is None
    torch.testing.assert_close(crit.last["heatmap"], heatmap_loss(R, m, cuts=(1.0, 10.0)).detach())
    loss5 = crit(Out(logits, R), labels, m, epoch=5)
    torch.testing.assert_close(
        loss5, 0.5 * F.cross_entropy(logits, labels) + 0.5 * heatmap_loss(R, m, cuts=(1.0, 10.0)))
    with pytest.raises(ValueError, match="P must be in"):
        ISNetLoss(P={0: 1.5})


def test_isnetloss_bce_and_soft_ce():
    torch.manual_seed(7)
    logits = torch.randn(3, 4)
    R = torch.randn(3, 1, 1, 4, 4)
    m = torch.ones(3, 1, 4, 4)
    m[:, :, :, 0] = 0
    targets = (torch.rand(3, 4) > 0.5).float()
    heat = heatmap_loss(R, m, cuts=(1.0, 10.0))
    for multilabel in (None, True):
        crit = ISNetLoss(P=0.7, cuts=(1.0, 10.0), multilabel=multilabel)
        loss = crit(Out(logits, R), targets, m)
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        torch.testing.assert_close(loss, 0.3 * bce + 0.7 * heat)
        torch.testing.assert_close(crit.last["ce"], bce)
    probs = torch.softmax(torch.randn(3, 4), 1)
    crit = ISNetLoss(P=0.7, cuts=(1.0, 10.0), multilabel=False)
    torch.testing.assert_close(crit(Out(logits, R), probs, m),
                               0.3 * F.cross_entropy(logits, probs) + 0.7 * heat)


def test_isnetloss_dual_cuts_and_missing_cuts():
    R = torch.tensor([1.0, 10.0]).reshape(1, 2, 1, 1, 1)
    m = torch.ones(1, 1, 1, 1)
    logits, labels = torch.zeros(1, 2), torch.tensor([0])
    crit = ISNetLoss(P=1.0, cuts=[(2.0, 5.0), (4.0, 20.0)])
    assert crit(Out(logits, R), labels, m).item() == pytest.approx(0.125)
    with pytest.raises(ValueError, match="tune_cuts"):
        ISNetLoss(P=0.7)(Out(logits, R), labels, m)
    # P = 0 without cuts: a plain classifier (used while tuning the cuts)
    loss = ISNetLoss(P=0.0)(Out(logits, R), labels, m)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="heatmaps is None"):
        ISNetLoss(P=0.7, cuts=(1.0, 2.0))(Out(logits, None), labels, m)
