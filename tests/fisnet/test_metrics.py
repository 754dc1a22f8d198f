"""Localisation metrics (fisnet.metrics): relevance mass accuracy and the pointing game, exact values."""
import pytest
import torch
import torch.nn as nn

from fisnet.metrics import evaluate_all, pointing_game, relevance_mass, relevance_metrics


def _map(rows):
    return torch.tensor(rows, dtype=torch.float64)[None]  # (1, H, W)


def test_relevance_mass_hand_values():
    r = _map([[3.0, -1.0], [1.0, 0.0]])  # positive part: 3 + 1 = 4
    assert relevance_mass(r, _map([[1, 0], [0, 0]])).item() == pytest.approx(3 / 4)
    assert relevance_mass(r, _map([[0, 1], [1, 1]])).item() == pytest.approx(1 / 4)
    assert relevance_mass(r, _map([[1, 1], [1, 1]])).item() == 1.0  # all foreground
    assert relevance_mass(r, _map([[0, 0], [0, 0]])).item() == 0.0  # all background
    # negative relevance never counts: moving the -1 into the mask changes nothing
    assert relevance_mass(r, _map([[1, 1], [0, 0]])).item() == pytest.approx(3 / 4)
    # no positive relevance at all → 0
    assert relevance_mass(_map([[-1.0, 0.0], [0.0, -2.0]]), _map([[1, 1], [1, 1]])).item() == 0.0


def test_pointing_game_hand_values():
    r = _map([[3.0, -1.0], [1.0, 0.0]])
    assert pointing_game(r, _map([[1, 0], [0, 0]])).item() == 1.0
    assert pointing_game(r, _map([[0, 1], [1, 1]])).item() == 0.0
    assert pointing_game(r, _map([[1, 1], [1, 1]])).item() == 1.0
    # a tie between a foreground and a background pixel is a miss
    assert pointing_game(_map([[2.0, 2.0], [0.0, 0.0]]), _map([[1, 0], [0, 0]])).item() == 0.0
    # an all-zero (or all-negative) map points nowhere
    assert pointing_game(_map([[0.0, 0.0], [0.0, 0.0]]), _map([[1, 1], [1, 1]])).item() == 0.0
    assert pointing_game(_map([[-1.0, -3.0], [-2.0, -4.0]]), _map([[1, 0], [0, 0]])).item() == 0.0


def test_maps_are_summed_over_heatmaps_and_channels_and_masks_resized():
    # (B=2, M=2, C=2, H=2, W=2): pixel map = sum over M and C
    R = torch.zeros(2, 2, 2, 2, 2, dtype=torch.float64)
    R[0, 0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    R[0, 1, 1] = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # image 0: [[2, 0], [0, 3]]
    R[1, 0, 1] = torch.tensor([[0.0, 5.0], [-4.0, 0.0]])
    R[1, 1, 0] = torch.tensor([[0.0, -4.0], [0.0, 1.0]])  # image 1: [[0, 1], [-4, 1]]
    masks = torch.zeros(2, 1, 4, 4)  # twice the map's size: a cell is foreground if any pixel is
    masks[:, :, 0, 1] = 1.0  # → cell (0, 0) foreground
    mass = relevance_mass(R, masks)
    hits = pointing_game(R, masks)
    assert mass.tolist() == pytest.approx([2 / 5, 0.0])
    assert hits.tolist() == [0.0, 0.0]  # image 0's max (3) lies outside; image 1's cell (0,0) is 0
    masks[1, :, 0, 3] = 1.0  # image 1: cell (0, 1) foreground too → max 1 ties with cell (1, 1): miss
    assert pointing_game(R, masks).tolist() == [0.0, 0.0]
    assert relevance_mass(R, masks).tolist() == pytest.approx([2 / 5, 1 / 2])


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="heatmaps must be"):
        relevance_mass(torch.zeros(4, 4), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="2 heatmaps but 1 masks"):
        pointing_game(torch.zeros(2, 1, 4, 4), torch.ones(1, 1, 4, 4))


def _net():
    """One ReLU unit: with ε = 0 and Zb off, R_i = x_i · w1_i · w2_c (y > 0), by hand."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 2)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.5]], dtype=torch.float64))
        net[1].bias.fill_(0.0)
        net[3].weight.copy_(torch.tensor([[2.0], [1.0]], dtype=torch.float64))
        net[3].bias.zero_()
    return net


def test_relevance_metrics_on_a_model_by_hand():
    net = _net()
    x = torch.tensor([[[[1.0, 1.0], [1.0, 2.0]]]], dtype=torch.float64)  # y = 1 - 2 + 3 + 1 = 3 > 0
    # predicted class 0 (2·3 > 1·3): R = x ⊙ w1 · 2 = [[2, -4], [6, 2]]; |R| sum 14, R⁺ sum 10
    m = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)
    lab = torch.zeros(1, dtype=torch.long)
    got = relevance_metrics(net, [(x, m, lab)], eps=0.0, zb=False)
    assert got["background_share"] == pytest.approx(8 / 14)
    assert got["relevance_mass"] == pytest.approx(2 / 10)
    assert got["pointing_game"] == 0.0  # the max (6) lies in the background
    m2 = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)
    got2 = relevance_metrics(net, [(x, m2, lab)], eps=0.0, zb=False)
    assert got2["relevance_mass"] == pytest.approx(6 / 10)
    assert got2["pointing_game"] == 1.0
    # evaluate_all carries the localisation scores per test set
    res = evaluate_all(net, {"a": [(x, m, lab)], "b": [(x, m2, lab)]}, eps=0.0, zb=False)
    assert res["a"]["relevance_mass"] == pytest.approx(0.2) and res["b"]["pointing_game"] == 1.0
    assert res["a"]["accuracy"] == 1.0
