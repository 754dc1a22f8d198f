"""Training-step time and peak memory against the number of classes K (the `fisnet bench`
command, ``bench/scaling.py``).

For each K (default 2, 10, 100, 1000; ``--quick``: 2, 10, 100 with a smaller batch) and each
variant, one full training step (forward, heatmaps with create_graph=True, loss, backward, SGD
step) of the same model on the same batch is timed.  Variants:

* ``plain``: the classifier alone (cross-entropy);
* ``bare``: a bare-PyTorch gradient×input penalty, what a user writes by hand without fisnet:
  ``g = autograd.grad(logit of the label, x, create_graph=True)``, penalty = mean of
  ``|g·x|`` outside the mask, loss = 0.3·CE + 0.7·penalty;
* ``original`` (batched: all K maps in one backward) and ``original_loop`` (K relevance passes,
  the baseline the batched one replaces);
* ``selective``, ``stochastic``;
* ``dual`` (two backward passes, the CPU default of ``ISNet(variant="dual")``) and
  ``dual_slots`` (one backward over two rule slots, the CUDA default).

Settings: by default the K sweep on ``small_cnn`` (width 16, BatchNorm, 3×32×32); ``--setting a``
and ``--setting b`` are the two settings of issue 11: (a) small_cnn width 16 with BatchNorm,
3×32×32, batch 32; (b) resnet18, 3×128×128, batch 8; both K = 10 (``--setting a,b`` runs both,
one after the other).  ``--model`` picks any backbone of ``fisnet.models``; ``--autocast bf16``
runs the forward and heatmaps under ``torch.autocast`` (the loss in fp32, as the trainer does).

Timing: the median over interleaved repeats (each repeat runs every configuration, of every K,
once, so drift in clock or load hits all alike), after a warm-up step; CUDA-synchronised on GPU.
``--threads`` (default 1, for steadiness) sets torch's intra-op threads on CPU.

Peak memory (``peak_mb``): the most tensor memory one step holds at once above what was live
before it (weights, optimizer state, the batch; the previous gradients are dropped first), in MB
(10^6 bytes), from one extra untimed step per configuration.  On CUDA it is
``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the step.  On CPU, where
torch keeps no such counter, the step runs once under ``torch.profiler`` with
``profile_memory=True``: every allocation and free of the CPU allocator is recorded with its
address and size, and the peak of the running sum of the blocks allocated during the step is
taken (frees of blocks allocated before the step are ignored).  This counts the same thing as the
CUDA figure — bytes of live tensor storage — and does not depend on malloc's caching, the
resident set of the process or other processes, unlike RSS-based figures.  ``--no-memory`` skips it.

Writes ``<out>/scaling-<device>[-<setting>][-<model>][-<autocast>][-<tag>].csv`` (variant,
classes, ms_median, ratio_to_plain, peak_mb, peak_ratio_to_plain, then the settings and versions)
and a PNG of the K sweep, and prints a table.  ``<out>`` defaults to a new folder under the
system temp directory, so a run never overwrites committed results; ``--out bench/results``
writes there (an existing file is replaced only with ``--overwrite``).  Configurations too large
for the run (``--max-original``, ``--max-loop``) are skipped; a configuration that fails (say, out
of memory) is reported with its error and the others still run (exit status 1).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["main", "run", "VARIANTS", "SETTINGS", "peak_step_bytes"]

VARIANTS = ("plain", "bare", "original", "original_loop", "selective", "stochastic", "dual", "dual_slots")
# the issue-11 settings (batch, image side, model, model kwargs, classes)
SETTINGS = {
    "a": {"model": "small_cnn", "width": 16, "size": 32, "batch": 32, "classes": [10]},
    "b": {"model": "resnet18", "width": None, "size": 128, "batch": 8, "classes": [10]},
}
SETTING_VARIANTS = ("plain", "bare", "selective", "stochastic", "dual", "dual_slots")
COLUMNS = ["variant", "classes", "ms_median", "ratio_to_plain", "peak_mb", "peak_ratio_to_plain", "repeats",
           "batch", "image", "model", "autocast", "threads", "device", "torch", "python", "malloc_tuning", "error"]
P_HEATMAP = 0.7


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40] or "device"


def model_label(model: str, width: Optional[int]) -> str:
    return f"small_cnn(width={width}, bn)" if model == "small_cnn" else model


def _build_model(model: str, K: int, channels: int, width: Optional[int]):
    from . import models
    if model == "small_cnn":
        return models.small_cnn(num_classes=K, in_channels=channels, width=width or 16, batchnorm=True)
    return models.build(model, num_classes=K, in_channels=channels)


class _Step:
    """One configuration: `__call__` runs one training step; `drop_grads` frees the gradients."""

    def __init__(self, fn: Callable[[], None], model: torch.nn.Module):
        self.fn, self.model = fn, model

    def __call__(self):
        self.fn()

    def drop_grads(self):
        for p in self.model.parameters():
            p.grad = None


def _make_step(variant: str, K: int, x, masks, y, width: Optional[int], device, model_name: str = "small_cnn",
               autocast: Optional[torch.dtype] = None) -> _Step:
    from . import ISNet, ISNetLoss
    from .lrp import trace
    torch.manual_seed(0)
    model = _build_model(model_name, K, x.shape[1], width).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dev_type = torch.device(device).type
    amp = (lambda: torch.autocast(device_type=dev_type, dtype=autocast)) if autocast is not None \
        else contextlib.nullcontext

    def update(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if variant == "plain":
        def step():
            with amp():
                logits = model(x)
            update(F.cross_entropy(logits.float(), y))
        return _Step(step, model)
    if variant == "bare":  # gradient×input penalty written by hand
        background = 1.0 - masks

        def step():
            xg = x.detach().requires_grad_(True)
            with amp():
                logits = model(xg)
                q = logits.gather(1, y[:, None]).sum()
                g, = torch.autograd.grad(q, xg, create_graph=True)
            h = (g * xg).float()
            penalty = (h.abs() * background).mean()
            update((1 - P_HEATMAP) * F.cross_entropy(logits.float(), y) + P_HEATMAP * penalty)
        return _Step(step, model)
    M = 2 if variant.startswith("dual") else 1
    crit = ISNetLoss(P=P_HEATMAP, cuts={"input": [[0.05, 2.0]] * M}, check=False)
    if variant == "original_loop":
        def step():
            with amp():
                t = trace(model, x)
                maps = [t.relevance(t.logits[:, k:k + 1], create_graph=True, retain_graph=True)["input"]
                        for k in range(K)]
            out = {"logits": t.logits, "heatmaps": torch.cat(maps, 1)}
            update(crit(out, y, masks))
        return _Step(step, model)
    if variant == "dual":
        net = ISNet(model, "dual", dual_batched=False)
    elif variant == "dual_slots":
        net = ISNet(model, "dual", dual_batched=True)
    else:
        net = ISNet(model, variant, generator=torch.Generator(device=device).manual_seed(0))

    def step():
        with amp():
            out = net(x, y)
        update(crit(out, y, masks))
    return _Step(step, model)


def _cpu_peak_from_trace(path: str) -> int:
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    mem = [e for e in events if e.get("name") == "[memory]" and isinstance(e.get("args"), dict)
           and int(e["args"].get("Device Type", 0)) == 0]
    mem.sort(key=lambda e: (e["args"].get("Ev Idx", 0), e.get("ts", 0)))
    live: Dict[int, int] = {}
    cur = peak = 0
    for e in mem:
        a = e["args"]
        nbytes, addr = int(a.get("Bytes", 0)), int(a.get("Addr", 0))
        if nbytes > 0:
            live[addr] = live.get(addr, 0) + nbytes
            cur += nbytes
            peak = max(peak, cur)
        elif nbytes < 0 and addr in live:  # a block allocated during the step
            cur -= live.pop(addr)
    return peak


def peak_step_bytes(step: Callable[[], None], device: str) -> int:
    """Most bytes of tensor storage live at once during `step()` above what was live before it
    (see the module docstring for how, on CPU and on CUDA)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        return _cpu_peak_from_trace(path)


def run(classes: List[int], variants=VARIANTS, *, batch: int = 32, size: int = 32, channels: int = 3,
        width: Optional[int] = 16, repeats: int = 5, device: str = "cpu", max_original: Optional[int] = None,
        max_loop: Optional[int] = None, progress: bool = True, model: str = "small_cnn",
        autocast: Optional[torch.dtype] = None, memory: bool = True) -> List[Dict]:
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, channels, size, size, generator=g).to(device)
    masks = torch.zeros(batch, 1, size, size)
    masks[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    masks = masks.to(device)
    rows: List[Dict] = []
    # every (K, variant) configuration is built first, then each repeat runs all of them once,
    # so drift in clock or load hits every K and variant alike (the K columns are comparable)
    steps, times, skipped, errors, peaks = {}, {}, {}, {}, {}
    for K in classes:
        y = torch.randint(0, K, (batch,), generator=g).to(device)
        skipped[K] = []
        for v in variants:
            if (v == "original" and max_original is not None and K > max_original) or \
                    (v == "original_loop" and max_loop is not None and K > max_loop):
                skipped[K].append(v)
                continue
            try:
                s = _make_step(v, K, x, masks, y, width, device, model, autocast)
                s()  # warm-up
                sync()
                if memory:
                    s.drop_grads()
                    peaks[K, v] = peak_step_bytes(s, device)
            except Exception as exc:  # noqa: BLE001 - reported in the table and the CSV; the rest still runs
                errors[K, v] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                if progress:
                    print(f"K={K} {v}: failed: {errors[K, v]}", flush=True)
                s = None
                if cuda:
                    torch.cuda.empty_cache()
                continue
            steps[K, v] = s
            times[K, v] = []
    for r in range(repeats):
        for key, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[key].append(1e3 * (time.perf_counter() - t0))
        if progress:
            print(f"repeat {r + 1}/{repeats} done", flush=True)
    for K in classes:
        plain = statistics.median(times[K, "plain"]) if times.get((K, "plain")) else float("nan")
        plain_mem = peaks.get((K, "plain"))
        for v in variants:
            row = {"variant": v, "classes": K, "ms_median": None, "ratio_to_plain": None, "peak_mb": None,
                   "peak_ratio_to_plain": None, "repeats": 0, "error": errors.get((K, v), "")}
            if times.get((K, v)):
                ms = statistics.median(times[K, v])
                row.update(ms_median=ms, ratio_to_plain=ms / plain, repeats=repeats)
            if (K, v) in peaks:
                row["peak_mb"] = peaks[K, v] / 1e6
                if plain_mem:
                    row["peak_ratio_to_plain"] = peaks[K, v] / plain_mem
            rows.append(row)
        if progress:
            print(f"K={K}: " + ", ".join(f"{v} {statistics.median(times[K, v]):.1f} ms" for v in variants
                                         if times.get((K, v)))
                  + (f" (skipped {', '.join(skipped[K])})" if skipped[K] else ""), flush=True)
    return rows


def table(rows: List[Dict], classes: List[int], variants=VARIANTS) -> str:
    memory = any(r.get("peak_mb") is not None for r in rows)
    w = 36 if memory else 22
    head = f"{'variant':<15}" + "".join(f"{'K=' + str(k):>{w}}" for k in classes)
    lines = [head, "-" * len(head)]
    for v in variants:
        cells = []
        for k in classes:
            r = next((r for r in rows if r["variant"] == v and r["classes"] == k), None)
            if r is None or (r["ms_median"] is None and not r.get("error")):
                cells.append(f"{'skipped':>{w}}")
            elif r["ms_median"] is None:
                cells.append(f"{'failed':>{w}}")
            else:
                c = f"{r['ms_median']:.1f} ms ({r['ratio_to_plain']:4.2f}x)"
                if r.get("peak_mb") is not None:
                    pr = r.get("peak_ratio_to_plain")
                    c += f" {r['peak_mb']:.1f} MB" + (f" ({pr:4.2f}x)" if pr else "")
                cells.append(f"{c:>{w}}")
        lines.append(f"{v:<15}" + "".join(cells))
    return "\n".join(lines)


def plot(rows: List[Dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v in VARIANTS:
        pts = [(r["classes"], r["ms_median"]) for r in rows if r["variant"] == v and r["ms_median"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=v)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of classes K")
    ax.set_ylabel("training step (ms, median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_ints(text: str, what: str, ap) -> List[int]:
    try:
        vals = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--{what} takes comma-separated whole numbers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        ap.error(f"--{what} takes positive whole numbers, got {text!r}")
    return vals


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="fisnet bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized subset: K = 2, 10, 100, batch 16, "
                                                         "Original up to 100 classes, loop up to 10")
    ap.add_argument("--setting", help="issue-11 settings, comma-separated: a (small_cnn width 16 + BN, 3x32x32, "
                                      "batch 32), b (resnet18, 3x128x128, batch 8); K = 10 and the variants "
                                      + ", ".join(SETTING_VARIANTS) + " unless given")
    ap.add_argument("--classes", help="comma-separated K values (default 2,10,100,1000)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--model", default=None, help="backbone of fisnet.models (default small_cnn)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--size", type=int, default=None, help="image side (default 32)")
    ap.add_argument("--width", type=int, default=None, help="small_cnn width (default 16)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1, for steadiness)")
    ap.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none",
                    help="run forward and heatmaps under torch.autocast with this dtype")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--max-original", type=int, help="skip the batched Original above this K")
    ap.add_argument("--max-loop", type=int, help="skip the per-class loop above this K")
    ap.add_argument("--out", default=None, help="results folder (default: a new folder under the temp directory; "
                                                "pass bench/results to keep the CSVs with the repository)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    ap.add_argument("--tag", default="", help="extra word in the result file names")
    a = ap.parse_args(argv)
    from .perf import tune_cpu_malloc
    tuned = tune_cpu_malloc()  # as the fisnet commands do; FISNET_MALLOC_TUNING=0 measures without
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here (use --device cpu)")
    if a.threads < 1:
        ap.error(f"--threads must be at least 1, got {a.threads}")
    if not device.startswith("cuda"):
        torch.set_num_threads(a.threads)
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.autocast]
    if a.model is not None:
        from . import models
        if a.model not in models.names():
            ap.error(f"unknown --model {a.model!r}; choose one of {', '.join(models.names())}")

    # the runs: one per setting, or the K sweep
    runs = []
    if a.setting:
        names = [s.strip() for s in a.setting.split(",") if s.strip()]
        bad = [s for s in names if s not in SETTINGS]
        if bad or not names:
            ap.error(f"unknown --setting {a.setting!r}; choose a, b or a,b")
        for s in names:
            cfg = SETTINGS[s]
            runs.append({"tag": "setting-" + s, "model": a.model or cfg["model"],
                         "width": a.width or cfg["width"], "size": a.size or cfg["size"],
                         "batch": a.batch or cfg["batch"], "repeats": a.repeats or 7,
                         "classes": _parse_ints(a.classes, "classes", ap) if a.classes else cfg["classes"],
                         "variants": SETTING_VARIANTS, "max_original": a.max_original,
                         "max_loop": a.max_loop or 100})
    else:
        if a.quick:
            classes, batch, repeats = [2, 10, 100], a.batch or 16, a.repeats or 3
            max_original, max_loop = a.max_original or 100, a.max_loop or 10
        else:
            classes = [2, 10, 100, 1000]
            batch, repeats = a.batch or (64 if device.startswith("cuda") else 32), a.repeats or 7
            max_original, max_loop = a.max_original, a.max_loop or (1000 if device.startswith("cuda") else 100)
        if a.classes:
            classes = _parse_ints(a.classes, "classes", ap)
        runs.append({"tag": "quick" if a.quick else "", "model": a.model or "small_cnn",
                     "width": a.width or 16, "size": a.size or 32, "batch": batch, "repeats": repeats,
                     "classes": classes, "variants": VARIANTS, "max_original": max_original,
                     "max_loop": max_loop})
    if a.variants:
        variants = tuple(v.strip() for v in a.variants.split(",") if v.strip())
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            ap.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
        if "plain" not in variants:
            variants = ("plain",) + variants
        for r in runs:
            r["variants"] = variants
    for r in runs:
        if r["batch"] < 1 or r["size"] < 1 or r["repeats"] < 1:
            ap.error("--batch, --size and --repeats must be positive")

    out = a.out or tempfile.mkdtemp(prefix="fisnet-bench-")
    os.makedirs(out, exist_ok=True)
    name = device_name(device)
    status = 0
    for r in runs:
        words = [_slug(name), r["tag"], "" if r["model"] == "small_cnn" else r["model"],
                 a.autocast if autocast else "", _slug(a.tag) if a.tag else ""]
        tag = "-".join(w for w in words if w)
        csv_path = os.path.join(out, f"scaling-{tag}.csv")
        if os.path.exists(csv_path) and not a.overwrite:
            print(f"error: {csv_path} exists; pass --overwrite to replace it or choose another --out",
                  file=sys.stderr)
            return 2
        threads = "-" if device.startswith("cuda") else str(torch.get_num_threads())
        print(f"device: {name}; torch {torch.__version__}; threads {threads}; batch {r['batch']}, "
              f"3x{r['size']}x{r['size']}, {model_label(r['model'], r['width'])}; autocast {a.autocast}; "
              f"malloc tuning {'on' if tuned else 'off'}", flush=True)
        rows = run(r["classes"], r["variants"], batch=r["batch"], size=r["size"], width=r["width"],
                   repeats=r["repeats"], device=device, max_original=r["max_original"], max_loop=r["max_loop"],
                   model=r["model"], autocast=autocast, memory=not a.no_memory)
        meta = {"batch": r["batch"], "image": f"3x{r['size']}x{r['size']}",
                "model": model_label(r["model"], r["width"]), "autocast": a.autocast, "threads": threads,
                "device": name, "torch": torch.__version__, "python": platform.python_version(),
                "malloc_tuning": tuned}
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for row in rows:
                rec = {**row, **meta}
                for k in ("ms_median", "ratio_to_plain", "peak_mb", "peak_ratio_to_plain"):
                    rec[k] = None if row[k] is None else round(row[k], 3)
                w.writerow(rec)
        png_path = None
        if len(r["classes"]) > 1:
            png_path = os.path.join(out, f"scaling-{tag}.png")
            try:
                plot(rows, png_path, f"{name}, batch {r['batch']}, torch {torch.__version__}")
            except ImportError:
                png_path = None
        print(table(rows, r["classes"], r["variants"]))
        print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""), flush=True)
        if any(row["error"] for row in rows):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
