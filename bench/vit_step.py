"""One ViT training step, plain against the ISNet (Selective, with and without the demo's LDS
maps), as the demo runs it: batch 64, 1 x 36 x 36 digits, 10 classes, train mode, Adam.  Time is
the median CPU time (`time.process_time`, steadier than wall time on a shared machine) of
interleaved repeats; peak memory is `fisnet.bench_scaling.peak_step_bytes` (the most tensor
storage a step holds above what was live before it: allocator events on CPU, max_memory_allocated
on CUDA).  Ratios are to the plain step of the same run.

    python bench/vit_step.py                       # vit_digits_stem and vit_digits, 7 repeats, 1 thread
    python bench/vit_step.py --models vit_digits_stem --repeats 9 --out bench/results
"""
import argparse
import csv
import os
import sys
import time

import torch
import torch.nn.functional as F

import fisnet
from fisnet import models
from fisnet.bench_scaling import device_name, peak_step_bytes


def make_step(name, kind, x, y, masks, device):
    torch.manual_seed(0)
    m = models.build(name, num_classes=10, in_channels=x.shape[1]).to(device).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    if kind == "plain":
        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return step
    lds = kind == "selective_lds"
    net = fisnet.ISNet(m, "selective", lds_layers="default" if lds else None)
    layers = ["input"] + (list(m.lds_layers) if lds else [])
    crit = fisnet.ISNetLoss(P=0.7, cuts={k: [[0.1, 2.0]] for k in layers}, check=False)

    def step():
        opt.zero_grad(set_to_none=True)
        crit(net(x, y), y, masks).backward()
        opt.step()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_digits_stem,vit_digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="folder for vit-step-<device>.csv")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch, 1, 36, 36, generator=g).to(dev)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(dev)
    masks = torch.zeros(a.batch, 1, 36, 36, device=dev)
    masks[..., 4:-4, 4:-4] = 1
    kinds = ("plain", "selective", "selective_lds")
    rows = []
    for name in a.models.split(","):
        steps = {k: make_step(name, k, x, y, masks, dev) for k in kinds}
        for st in steps.values():
            st()
        times = {k: [] for k in kinds}
        for _ in range(a.repeats):
            for k, st in steps.items():
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.process_time() if dev.type == "cpu" else time.perf_counter()
                st()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append((time.process_time() if dev.type == "cpu" else time.perf_counter()) - t)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        peak = {k: peak_step_bytes(st, str(dev)) for k, st in steps.items()}
        for k in kinds:
            rows.append(dict(model=name, step=k, ms_median=round(med[k] * 1e3, 2),
                             ratio_to_plain=round(med[k] / med["plain"], 3), peak_mb=round(peak[k] / 1e6, 2),
                             peak_ratio_to_plain=round(peak[k] / peak["plain"], 3), batch=a.batch,
                             repeats=a.repeats, threads=a.threads, device=device_name(str(dev)),
                             torch=torch.__version__))
            r = rows[-1]
            print(f"{name:16s} {k:14s} {r['ms_median']:9.1f} ms  {r['ratio_to_plain']:5.2f}x   "
                  f"{r['peak_mb']:8.1f} MB  {r['peak_ratio_to_plain']:5.2f}x", flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"vit-step-{dev.type}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
