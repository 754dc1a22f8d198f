"""``fisnet compare``: plain, RRR, segment_then_classify and the four ISNet variants side by side on the biased data.

:func:`run_compare` trains, with one seed and one budget per method (``COMPARE_DEFAULTS``):

* ``plain`` — the classifier alone (P = 0); it also gives the C1/C2 cuts (docs/spec.md §4.3, from its
  eval-mode relevance over the training images, as in ``fisnet demo``) of every ISNet variant;
* ``rrr`` — Right for the Right Reasons (``fisnet.baselines``), λ chosen by the documented rule
  on biased validation data held out of the training set (never the test sets);
* ``segment_then_classify`` — a small segmenter trained on the training masks (``fisnet.baselines``;
  ``segmenter_epochs`` in its budget), then the classifier (P = 0) on the training images with the
  predicted background zeroed. It is evaluated as the pipeline: on the test sets with the predicted
  background zeroed (true masks kept), i.e. the classifier's LRP-ε map of its masked input scored
  against the true masks; its figure column is that map. ``config["segment_then_classify"]``
  records the segmenter's training time and its mean IoU (and the share of marker pixels it keeps)
  on each test set, and the pipeline's relevance scores without the first layer's Zb rule (which
  gives relevance to the zeroed, black pixels); ``models/segment_then_classify.pt`` holds the
  pipeline (``segmenter.*`` and ``classifier.*`` keys);
* ``original``, ``selective``, ``stochastic``, ``dual`` — the ISNet variants (``fisnet.ISNet``).

Every method starts from the same initial weights (the same seed) and trains with the same
Trainer, optimiser and schedule (Adam, cosine decay; the demo's recipe), for its own number of
epochs. After training each model is evaluated on the three test sets (biased / unbiased /
deceiving): accuracy, the background share of |R| and the localisation scores (relevance mass
accuracy and the pointing game, ``fisnet.metrics``), all on the LRP-ε map of the predicted class.

Writes ``OUT/report.json``::

    {"accuracy": {method: {"biased": %, "unbiased": %, "deceiving": %}},
     "background_share": {method: x},                       # on the biased test set
     "localisation": {method: {"relevance_mass": x, "pointing_game": x}},   # biased test set
     "seconds_per_epoch": {method: s},
     "per_test_set": {method: {test set: {accuracy, background_share, relevance_mass, pointing_game}}},
     "history": {method: [per-epoch training log rows]}, "config": {...}, "machine": {...}}

(accuracies in percent, the rest in [0, 1]), ``OUT/heatmaps.png`` (one heatmap column per
method; biased then deceiving test images), ``OUT/models/METHOD.pt`` (state dicts) and a
printed table. The report and the figure are rewritten after every method
(``config["complete"]`` is false until the last one is done), so an interrupted run keeps what
it finished. ``seconds_per_epoch`` is the mean training time of one full pass
over the training set (evaluation excluded). A method trained on part of the training set
(``train_images`` in its budget: the 100-class Original) has its time extrapolated to the full
set, and ``config["budgets"]`` says so. ``time_steps=N`` only times each method on N training
steps (extrapolated to an epoch) and trains nothing to the end.

``classes=100`` uses the two-digit numbers of ``fisnet.data.digits.make_biased_numbers``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Subset

__all__ = ["run_compare", "format_compare_table", "COMPARE_METHODS", "COMPARE_DEFAULTS", "QUICK_COMPARE"]

COMPARE_METHODS = ("plain", "rrr", "segment_then_classify", "original", "selective", "stochastic", "dual")
ISNET_VARIANTS = ("original", "selective", "stochastic", "dual")
TEST_SETS = ("biased", "unbiased", "deceiving")

# Budgets: epochs per method, and (optionally) the number of training images a method trains on
# (None = all). The 10-class budget is the demo's Selective recipe (40 epochs, Adam 3e-3, cosine,
# P 0.7) for every ISNet variant and RRR; the plain model gets the demo's 3 epochs. segment_then_classify's
# classifier gets RRR's epochs, its segmenter ``segmenter_epochs``.
COMPARE_DEFAULTS: Dict[int, Dict[str, Any]] = {
    10: dict(n_train=4000, n_test=1000, width=8, batchnorm=True, batch_size=64, optimizer="adam", lr=3e-3,
             lr_schedule="cosine", P=0.7, cuts_images=None, rrr_lambdas=(10.0, 100.0, 1000.0),
             rrr_choose_epochs=2, figure_images=3,
             budgets={"plain": {"epochs": 3}, "rrr": {"epochs": 40}, "original": {"epochs": 40},
                      "selective": {"epochs": 40}, "stochastic": {"epochs": 40}, "dual": {"epochs": 40},
                      "segment_then_classify": {"epochs": 40, "segmenter_epochs": 3}}),
    100: dict(n_train=10000, n_test=1000, width=8, batchnorm=True, batch_size=64, optimizer="adam", lr=3e-3,
              lr_schedule="cosine", P=0.7, cuts_images=1000, rrr_lambdas=(10.0, 100.0, 1000.0),
              rrr_choose_epochs=1, figure_images=3,
              budgets={"plain": {"epochs": 6}, "rrr": {"epochs": 30}, "original": {"epochs": 1, "train_images": 1000},
                       "selective": {"epochs": 30, "cuts_plain_epochs": 2}, "stochastic": {"epochs": 30},
                       "dual": {"epochs": 30}, "segment_then_classify": {"epochs": 30, "segmenter_epochs": 3}}),
}
# quick: one epoch per method; the segmenter gets 10 (after 1 or 2 steps its BatchNorm running
# statistics are still the initial ones and it predicts no foreground at all: nothing to classify)
QUICK_COMPARE: Dict[str, Any] = dict(n_train=64, n_test=16, width=4, batch_size=32, cuts_images=64,
                                     rrr_lambdas=(10.0, 100.0), rrr_choose_epochs=1, figure_images=1,
                                     budgets={m: {"epochs": 1, "segmenter_epochs": 10} if m == "segment_then_classify"
                                              else {"epochs": 1} for m in COMPARE_METHODS})


def _machine() -> Dict[str, str]:
    import platform
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": str(torch.get_num_threads()),
            "cpus": str(os.cpu_count())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _data(classes: int, seed: int, n_train: int, n_test: int):
    from .data.digits import make_biased_digits, make_biased_numbers
    if classes == 10:
        return make_biased_digits(seed, n_train=n_train, n_test=n_test)
    if classes == 100:
        return make_biased_numbers(seed, n_train=n_train, n_test=n_test)
    raise ValueError(f"--classes must be 10 (biased digits) or 100 (biased two-digit numbers), got {classes}")


def run_compare(classes: int = 10, out: str = "./fisnet-compare", *, seed: int = 0,
                methods: Optional[Sequence[str]] = None, quick: bool = False, time_steps: Optional[int] = None,
                device: Optional[str] = None, progress: bool = True,
                epochs: Optional[Union[int, Dict[str, int]]] = None,
                **overrides) -> Dict[str, Any]:
    """Train and compare the methods (module docstring); returns the report dict.

    ``methods``: a subset of ``COMPARE_METHODS`` (``plain`` is always trained: it gives the
    cuts); ``epochs``: ``{method: epochs}`` overrides of the budgets, or one number for every
    method but ``plain``; ``overrides``: any key of
    ``COMPARE_DEFAULTS[classes]``; ``quick``: tiny settings for tests (numbers mean nothing);
    ``time_steps``: only time each method on that many steps."""
    from . import ISNet, models
    from .baselines import PredictedBackgroundZeroed, SegmentThenClassify, choose_rrr_lambda, mask_iou, train_segmenter
    from .cuts import estimate_cuts
    from .lrp import explain
    from .metrics import evaluate_all, relevance_metrics
    from .plot import heatmap_grid
    from .train import Trainer, TrainConfig

    if classes not in COMPARE_DEFAULTS:
        raise ValueError(f"--classes must be 10 or 100, got {classes}")
    p = copy.deepcopy(COMPARE_DEFAULTS[classes])
    if quick:
        p.update(copy.deepcopy(QUICK_COMPARE))
    for k, v in overrides.items():
        if k not in p:
            raise TypeError(f"unknown compare option {k!r}; choose from {', '.join(sorted(p))}")
        if v is not None:
            p[k] = v
    if isinstance(epochs, int):
        epochs = {m: epochs for m in COMPARE_METHODS if m != "plain"}
    for m, e in (epochs or {}).items():
        if m not in COMPARE_METHODS:
            raise ValueError(f"unknown method {m!r} in epochs; choose from {', '.join(COMPARE_METHODS)}")
        p["budgets"][m] = dict(p["budgets"][m], epochs=int(e))
    wanted = list(COMPARE_METHODS) if not methods else list(methods)
    bad = [m for m in wanted if m not in COMPARE_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(COMPARE_METHODS)}")
    if "plain" not in wanted:
        wanted.insert(0, "plain")
    wanted = [m for m in COMPARE_METHODS if m in wanted]  # fixed order
    if time_steps is not None and time_steps < 1:
        raise ValueError(f"time_steps must be >= 1, got {time_steps}")

    os.makedirs(out, exist_ok=True)
    t_all = time.perf_counter()
    say = (lambda s: print(f"[fisnet compare] {s}", flush=True)) if progress else (lambda s: None)

    ds = _data(classes, seed, p["n_train"], p["n_test"])
    train_set = ds["train"]
    tests = {k: ds[k] for k in TEST_SETS}
    in_ch = int(train_set.images.shape[1])
    spec = {"name": "small_cnn", "num_classes": classes, "in_channels": in_ch, "width": p["width"],
            "batchnorm": bool(p["batchnorm"])}

    def fresh_model():
        torch.manual_seed(seed)
        s = dict(spec)
        return models.build(s.pop("name"), **s)

    base = TrainConfig(optimizer=p["optimizer"], lr=p["lr"], lr_schedule=p["lr_schedule"],
                       batch_size=p["batch_size"], seed=seed, device=device, progress=progress,
                       model_spec=spec, P=p["P"])
    n_batches = math.ceil(len(train_set) / p["batch_size"])

    def budget_set(method):
        b = p["budgets"][method]
        if time_steps is not None:
            n = min(len(train_set), (time_steps + 1) * p["batch_size"])
            return Subset(train_set, range(n)), 1
        n = b.get("train_images")
        if n is not None and n < len(train_set):
            return Subset(train_set, range(int(n))), int(b["epochs"])
        return train_set, int(b["epochs"])

    def sec_per_epoch(trainer, subset):
        rows = trainer.history
        steps = math.ceil(len(subset) / p["batch_size"])
        per_step = sum(r["time_s"] for r in rows) / max(sum(steps for _ in rows), 1)
        return per_step * n_batches

    models_out: Dict[str, torch.nn.Module] = {}
    spe: Dict[str, float] = {}
    budgets_used: Dict[str, Dict[str, Any]] = {}
    extra: Dict[str, Any] = {}
    dev = None

    k = min(p["figure_images"], len(ds["biased"]))
    x = fig_x = torch.cat([ds["biased"].images[:k], ds["deceiving"].images[:k]])
    mk = torch.cat([ds["biased"].masks[:k], ds["deceiving"].masks[:k]])
    y = torch.cat([ds["biased"].labels[:k], ds["deceiving"].labels[:k]])
    maps: Dict[str, torch.Tensor] = {}
    preds: Dict[str, torch.Tensor] = {}

    def run(method, cfg, cuts=None, segmenter=None, masked_tests=None):
        """Train and evaluate one method. ``segmenter``: segment_then_classify — the classifier
        trains on the images with the predicted background zeroed and is evaluated on
        ``masked_tests`` (the test sets so masked, true masks kept)."""
        nonlocal dev
        subset, ep = budget_set(method)
        cfg.epochs, cfg.run_name = ep, method
        say(f"training {method} ({len(spe) + 1}/{len(wanted)}): {ep} epoch(s) on {len(subset)} images")
        t = time.perf_counter()
        data = subset if segmenter is None else PredictedBackgroundZeroed(subset, segmenter)
        tr = Trainer(fresh_model(), data, None, None, cfg, cuts=cuts)
        tr.fit()
        dev = tr.device
        models_out[method] = tr.model
        os.makedirs(os.path.join(out, "models"), exist_ok=True)
        saved = tr.model if segmenter is None else SegmentThenClassify(segmenter, tr.model)
        torch.save(saved.state_dict(), os.path.join(out, "models", f"{method}.pt"))
        report["history"][method] = tr.history
        spe[method] = sec_per_epoch(tr, subset)
        budgets_used[method] = {"epochs": ep, "train_images": len(subset),
                                "wall_s": time.perf_counter() - t}
        if len(subset) < len(train_set):
            budgets_used[method]["note"] = (f"trained on {len(subset)} of {len(train_set)} training images; "
                                            f"seconds_per_epoch extrapolated to the full set")
        if time_steps is None:
            model = tr.model.eval()
            fx = fig_x.to(dev) if segmenter is None else SegmentThenClassify(segmenter, model).mask_input(fig_x.to(dev))
            with torch.no_grad():
                preds[method] = model(fx).argmax(1).cpu()
            maps[method] = explain(model, fx, eps=base.eps, zb=base.zb).cpu()
            say(f"evaluating {method}")
            res = evaluate_all(tr.model, tests if segmenter is None else masked_tests, eps=base.eps, zb=base.zb,
                               bounds=tuple(base.bounds))
            report["per_test_set"][method] = res
            report["accuracy"][method] = {k: 100.0 * res[k]["accuracy"] for k in TEST_SETS}
            report["background_share"][method] = res["biased"]["background_share"]
            report["localisation"][method] = {"relevance_mass": res["biased"]["relevance_mass"],
                                              "pointing_game": res["biased"]["pointing_game"]}
        write(final=False)
        return tr

    report: Dict[str, Any] = {"accuracy": {}, "background_share": {}, "localisation": {},
                              "seconds_per_epoch": spe, "per_test_set": {}, "history": {}}

    def write(final: bool):
        """report.json (and the figure) with what is done so far; rewritten after every method."""
        if time_steps is None and maps:
            titles = [f"{'biased' if i < k else 'deceiving'} y={int(y[i])}\n"
                      + " ".join(f"{n[:4]}:{int(preds[n][i])}" for n in maps) for i in range(len(y))]
            report["files"] = {"heatmaps": os.path.basename(
                heatmap_grid(x, maps, os.path.join(out, "heatmaps.png"), titles=titles, masks=mk))}
        report["config"] = {"classes": classes, "seed": seed, "quick": quick, "methods": wanted, "model": spec,
                            "complete": final, "time_steps": time_steps, "budgets": budgets_used,
                            "train_images": len(train_set), "test_images": len(ds["biased"]),
                            "headline_test_set": "biased (background_share, localisation); all sets in per_test_set",
                            "seconds_per_epoch": "mean training time of one pass over the training set, evaluation "
                                                 "excluded" + ("; measured on time_steps steps (+1) and extrapolated"
                                                               if time_steps is not None else ""),
                            **{k: v for k, v in p.items() if k != "budgets"},
                            "planned_budgets": p["budgets"], "train_config": base.to_dict(), **extra}
        report["config"]["rrr_lambdas"] = list(p["rrr_lambdas"])
        report["machine"] = _machine()
        report["total_s"] = time.perf_counter() - t_all
        tmp = os.path.join(out, ".report.json.tmp")
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, default=_jsonable)
        os.replace(tmp, os.path.join(out, "report.json"))

    # 1. plain (P = 0); also the source of every variant's cuts
    run("plain", dataclasses_replace(base, P=0.0))
    plain = models_out["plain"]
    n_cut = p["cuts_images"] or len(train_set)
    if time_steps is not None:  # the cuts do not change the cost of a step: estimate them on one batch
        n_cut = min(n_cut, p["batch_size"])
    cut_loader = DataLoader(Subset(train_set, range(min(n_cut, len(train_set)))), batch_size=128, shuffle=False)
    cuts: Dict[str, Any] = {}
    cuts_source: Dict[str, str] = {}
    early_plain: Dict[int, torch.nn.Module] = {}
    for v in ISNET_VARIANTS:
        if v in wanted:
            n_early = p["budgets"][v].get("cuts_plain_epochs")
            source = plain
            if n_early is not None and time_steps is None:
                # cuts from a shorter plain run (same start, data and recipe): a confident plain model
                # makes the Selective's maps vanish (p_argmin << its ε), and its cuts with them
                if n_early not in early_plain:
                    say(f"plain model of {n_early} epoch(s) for the cuts of {v}")
                    cfg_early = dataclasses_replace(base, P=0.0, epochs=int(n_early), run_name=f"plain_{n_early}ep")
                    tr_early = Trainer(fresh_model(), train_set, None, None, cfg_early)
                    tr_early.fit()
                    early_plain[n_early] = tr_early.model
                source = early_plain[n_early]
            cuts[v] = estimate_cuts(ISNet(source, v), cut_loader, device=dev)
            cuts_source[v] = (f"a plain model of {n_early} epoch(s) (cuts_plain_epochs)" if source is not plain
                              else f"the plain model ({p['budgets']['plain']['epochs']} epochs)")
    extra["cuts"] = cuts
    extra["cuts_source"] = cuts_source

    # 2. RRR, lambda by the documented rule on biased validation data
    if "rrr" in wanted:
        if time_steps is None:
            say(f"rrr: choosing lambda among {list(p['rrr_lambdas'])} on biased validation data")
            rule = choose_rrr_lambda(fresh_model, train_set, dataclasses_replace(base, P=0.0),
                                     lambdas=p["rrr_lambdas"], epochs=p["rrr_choose_epochs"], progress=progress)
        else:
            rule = {"lambda": float(p["rrr_lambdas"][-1]), "rule": "timing only: largest lambda of the grid"}
        extra["rrr"] = rule
        say(f"rrr: lambda = {rule['lambda']:g}")
        run("rrr", dataclasses_replace(base, P=0.0, method="rrr", rrr_lambda=rule["lambda"]))

    # 3. segment_then_classify: the segmenter (under its own seeded random state, so the other
    # methods' runs are unchanged), then the plain classifier on the predicted foreground
    if "segment_then_classify" in wanted:
        stc = p["budgets"]["segment_then_classify"]
        seg_set, _ = budget_set("segment_then_classify")
        seg_epochs = 1 if time_steps is not None else int(stc.get("segmenter_epochs", 3))
        say(f"segment_then_classify: training the segmenter, {seg_epochs} epoch(s) on {len(seg_set)} images")
        t = time.perf_counter()
        seg = train_segmenter(seg_set, epochs=seg_epochs, batch_size=p["batch_size"], seed=seed,
                              device=dev, progress=progress, name="segment_then_classify segmenter")
        seg_s = time.perf_counter() - t
        info: Dict[str, Any] = {"segmenter": {"epochs": seg_epochs, "train_images": len(seg_set),
                                              "width": seg.width, "dilations": list(seg.dilations),
                                              "threshold": 0.5, "train_s": seg_s,
                                              "seconds_per_epoch": seg_s / seg_epochs * len(train_set) / len(seg_set),
                                              "history": seg.history}}
        masked: Dict[str, Any] = {}
        if time_steps is None:
            info["mask_iou"], info["marker_pixels_kept"] = {}, {}
            for name, ts in tests.items():
                masked[name] = PredictedBackgroundZeroed(ts, seg)
                pm = masked[name].pred_masks
                info["mask_iou"][name] = mask_iou(pm, ts.masks)
                mm = ts.marker_masks() > 0.5 if getattr(ts, "config", None) is not None else None
                if mm is not None and bool(mm.any()):
                    info["marker_pixels_kept"][name] = float((pm & mm).sum()) / float(mm.sum())
            say("segment_then_classify: segmenter IoU "
                + ", ".join(f"{k} {v:.3f}" for k, v in info["mask_iou"].items()))
        extra["segment_then_classify"] = info
        run("segment_then_classify", dataclasses_replace(base, P=0.0), segmenter=seg, masked_tests=masked)
        if time_steps is None:  # the first layer's Zb rule gives relevance to the zeroed (black) pixels
            info["relevance_without_zb"] = {
                name: relevance_metrics(models_out["segment_then_classify"], ms, base.eps, False,
                                        bounds=tuple(base.bounds)) for name, ms in masked.items()}

    # 4. the ISNet variants, from the same initial weights (the costliest, the Original, last)
    for v in ("selective", "stochastic", "dual", "original"):
        if v in wanted:
            run(v, dataclasses_replace(base, variant=v, P=p["P"]), cuts=cuts[v])

    write(final=True)
    print(format_compare_table(report))
    print(f"wrote {os.path.join(out, 'report.json')}"
          + (f", {os.path.join(out, report['files']['heatmaps'])}" if "files" in report else "")
          + f" in {report['total_s']:.0f} s")
    return report


def dataclasses_replace(cfg, **kw):
    c = copy.deepcopy(cfg)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def format_compare_table(report: Dict[str, Any]) -> str:
    """The printed table: one row per method."""
    acc, share, loc, spe = (report.get("accuracy", {}), report.get("background_share", {}),
                            report.get("localisation", {}), report.get("seconds_per_epoch", {}))
    methods = [m for m in COMPARE_METHODS if m in spe or m in acc]
    w = max([11] + [len(m) + 1 for m in methods])
    head = (f"{'method':<{w}}{'biased':>9}{'unbiased':>10}{'deceiving':>11}{'bg share':>10}{'rel.mass':>10}"
            f"{'pointing':>10}{'s/epoch':>10}")
    lines = [head, "-" * len(head)]
    for m in methods:
        a = acc.get(m)
        cells = "".join(f"{a[k]:>{w}.1f}%" for k, w in zip(TEST_SETS, (8, 9, 10))) if a else \
            f"{'-':>9}{'-':>10}{'-':>11}"
        l = loc.get(m)
        cells += f"{share[m]:>10.3f}" if m in share else f"{'-':>10}"
        cells += f"{l['relevance_mass']:>10.3f}{l['pointing_game']:>10.3f}" if l else f"{'-':>10}{'-':>10}"
        cells += f"{spe[m]:>10.1f}" if m in spe else f"{'-':>10}"
        lines.append(f"{m:<{w}}" + cells)
    return "\n".join(lines)
