"""Training-step time against the number of classes K (the `fisnet bench` command,
``bench/scaling.py``).

For each K (default 2, 10, 100, 1000; ``--quick``: 2, 10, 100 with a smaller batch) and each
variant — the plain classifier, the Original ISNet (batched: all K maps in one backward), the
Original ISNet as a per-class loop (K relevance passes, the baseline the batched one replaces),
Selective, Stochastic and Dual — one full training step (forward, heatmaps with
create_graph=True, loss, backward, SGD step) of the same small BatchNorm CNN on the same batch
is timed. Timing: the median over interleaved repeats (each repeat runs every configuration,
of every K, once, so drift in clock or load hits all alike), after a warm-up step; CUDA-synchronised on GPU.

Writes ``<out>/scaling-<device>.csv`` (variant, classes, ms_median, ratio_to_plain, then
batch, image, model, device name, torch and python versions), ``<out>/scaling-<device>.png``
and prints a table. Configurations too large for the run (``--max-original``,
``--max-loop``) are skipped and reported as such.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

__all__ = ["main", "run", "VARIANTS"]

VARIANTS = ("plain", "original", "original_loop", "selective", "stochastic", "dual", "dual_slots")
COLUMNS = ["variant", "classes", "ms_median", "ratio_to_plain", "repeats", "batch", "image", "model",
           "device", "torch", "python", "malloc_tuning"]


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


def _make_step(variant: str, K: int, x, masks, y, width: int, device) -> Callable[[], None]:
    from . import ISNet, ISNetLoss, models
    from .lrp import trace
    torch.manual_seed(0)
    model = models.small_cnn(num_classes=K, in_channels=x.shape[1], width=width, batchnorm=True).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    M = 2 if variant.startswith("dual") else 1
    cuts = {"input": [[0.05, 2.0]] * M}
    if variant == "plain":
        def step():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    crit = ISNetLoss(P=0.7, cuts=cuts, check=False)
    if variant == "original_loop":
        def step():
            t = trace(model, x)
            maps = [t.relevance(t.logits[:, k:k + 1], create_graph=True, retain_graph=True)["input"]
                    for k in range(K)]
            out = {"logits": t.logits, "heatmaps": torch.cat(maps, 1)}
            loss = crit(out, y, masks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    if variant.startswith("dual"):  # "dual": the device's default path; "dual_slots": one two-slot pass
        net = ISNet(model, "dual", dual_batched=True if variant == "dual_slots" else None)
    else:
        net = ISNet(model, variant, generator=torch.Generator(device=device).manual_seed(0))

    def step():
        out = net(x, y)
        loss = crit(out, y, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def run(classes: List[int], variants=VARIANTS, *, batch: int = 32, size: int = 32, channels: int = 3,
        width: int = 16, repeats: int = 5, device: str = "cpu", max_original: Optional[int] = None,
        max_loop: Optional[int] = None, progress: bool = True) -> List[Dict]:
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
    steps, times, skipped = {}, {}, {}
    for K in classes:
        y = torch.randint(0, K, (batch,), generator=g).to(device)
        skipped[K] = []
        for v in variants:
            if (v == "original" and max_original is not None and K > max_original) or \
                    (v == "original_loop" and max_loop is not None and K > max_loop):
                skipped[K].append(v)
                continue
            steps[K, v] = _make_step(v, K, x, masks, y, width, device)
            steps[K, v]()  # warm-up
            sync()
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
        plain = statistics.median(times[K, "plain"]) if (K, "plain") in times else float("nan")
        for v in variants:
            if (K, v) in times:
                ms = statistics.median(times[K, v])
                rows.append({"variant": v, "classes": K, "ms_median": ms, "ratio_to_plain": ms / plain,
                             "repeats": repeats})
            else:
                rows.append({"variant": v, "classes": K, "ms_median": None, "ratio_to_plain": None,
                             "repeats": 0})
        if progress:
            print(f"K={K}: " + ", ".join(f"{v} {statistics.median(times[K, v]):.1f} ms" for v in variants
                                         if (K, v) in times)
                  + (f" (skipped {', '.join(skipped[K])})" if skipped[K] else ""), flush=True)
    return rows


def table(rows: List[Dict], classes: List[int], variants=VARIANTS) -> str:
    head = f"{'variant':<15}" + "".join(f"{'K=' + str(k):>20}" for k in classes)
    lines = [head, "-" * len(head)]
    for v in variants:
        cells = []
        for k in classes:
            r = next((r for r in rows if r["variant"] == v and r["classes"] == k), None)
            if r is None or r["ms_median"] is None:
                cells.append(f"{'skipped':>20}")
            else:
                cells.append(f"{r['ms_median']:>10.1f} ms ({r['ratio_to_plain']:4.2f}x)")
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


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="fisnet bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized subset: K = 2, 10, 100, batch 16, "
                                                         "Original up to 100 classes, loop up to 10")
    ap.add_argument("--classes", help="comma-separated K values (default 2,10,100,1000)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--size", type=int, default=32, help="image side (default 32)")
    ap.add_argument("--width", type=int, default=16, help="small_cnn width (default 16)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--max-original", type=int, help="skip the batched Original above this K")
    ap.add_argument("--max-loop", type=int, help="skip the per-class loop above this K")
    ap.add_argument("--out", default=None, help="results folder (default bench/results next to this checkout, "
                                                "else ./bench-results)")
    a = ap.parse_args(argv)
    from .perf import tune_cpu_malloc
    tuned = tune_cpu_malloc()  # as the fisnet commands do; FISNET_MALLOC_TUNING=0 measures without
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.quick:
        classes = [2, 10, 100]
        batch, repeats = a.batch or 16, a.repeats or 3
        max_original, max_loop = a.max_original or 100, a.max_loop or 10
    else:
        classes = [2, 10, 100, 1000]
        batch, repeats = a.batch or (64 if device.startswith("cuda") else 32), a.repeats or 7
        max_original, max_loop = a.max_original, a.max_loop or (1000 if device.startswith("cuda") else 100)
    if a.classes:
        classes = [int(c) for c in a.classes.split(",")]
    variants = tuple(v for v in a.variants.split(",") if v)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    if "plain" not in variants:
        variants = ("plain",) + variants
    out = a.out
    if out is None:
        repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
        out = os.path.join(repo, "results") if os.path.isdir(repo) else "bench-results"
    os.makedirs(out, exist_ok=True)
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}; batch {batch}, "
          f"{3}x{a.size}x{a.size}, small_cnn(width={a.width}, BatchNorm); malloc tuning {'on' if tuned else 'off'}",
          flush=True)
    rows = run(classes, variants, batch=batch, size=a.size, width=a.width, repeats=repeats, device=device,
               max_original=max_original, max_loop=max_loop)
    meta = {"batch": batch, "image": f"3x{a.size}x{a.size}", "model": f"small_cnn(width={a.width}, bn)",
            "device": name, "torch": torch.__version__, "python": platform.python_version(),
            "malloc_tuning": tuned}
    tag = _slug(name) + ("-quick" if a.quick else "")
    csv_path = os.path.join(out, f"scaling-{tag}.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta, "ms_median": None if r["ms_median"] is None else round(r["ms_median"], 3),
                        "ratio_to_plain": None if r["ratio_to_plain"] is None else round(r["ratio_to_plain"], 3)})
    png_path = os.path.join(out, f"scaling-{tag}.png")
    try:
        plot(rows, png_path, f"{name}, batch {batch}, torch {torch.__version__}")
    except ImportError:
        png_path = None
    print(table(rows, classes, variants))
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
