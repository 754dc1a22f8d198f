"""Summarise a bench/gpu_suite.sh output folder into <folder>/report.md.

Reads kernels.csv (bench/kernels.py) and every scaling-*.csv (bench/scaling.py): for the kernels,
the largest size of each backend, op and dtype with its GB/s and its fraction of the copy
bandwidth measured in the same run (target: >= 80 %); for the training steps, time, ratio to
plain, peak memory and its ratio, per file.

    python bench/gpu_report.py OUTDIR
"""
from __future__ import annotations

import csv
import glob
import os
import sys

TARGET = 0.80


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def kernels_section(path):
    rows = _read(path)
    if not rows:
        return ["(kernels.csv is empty)"]
    largest = {}
    for r in rows:
        key = (r["backend"], r["op"], r["dtype"])
        if key not in largest or int(r["numel"]) > int(largest[key]["numel"]):
            largest[key] = r
    lines = [f"device: {rows[0]['device']}, torch {rows[0]['torch_version']}", "",
             "| backend | op | dtype | elements | ms | GB/s | of copy bandwidth | vs reference |",
             "|---|---|---|---|---|---|---|---|"]
    below = []
    for (b, op, dt), r in sorted(largest.items()):
        frac = float(r["frac_of_copy_bw"])
        mark = "" if b in ("torch", "reference") or frac >= TARGET else " (below 80 %)"
        if mark:
            below.append(f"{b}/{op}/{dt}")
        lines.append(f"| {b} | {op} | {dt} | {int(r['numel']):,} | {float(r['ms_median']):.4f} | "
                     f"{float(r['gbps']):.1f} | {100 * frac:.0f} %{mark} | {r['speedup_vs_reference'] or '-'} |")
    lines += ["", f"kernels below {100 * TARGET:.0f} % of the copy bandwidth at their largest size: "
              + (", ".join(below) if below else "none")]
    return lines


def scaling_section(path):
    rows = _read(path)
    if not rows:
        return [f"({os.path.basename(path)} is empty)"]
    r0 = rows[0]
    lines = [f"**{os.path.basename(path)}**: {r0['model']}, {r0['image']}, batch {r0['batch']}, "
             f"autocast {r0.get('autocast', 'none')}, {r0['device']}, torch {r0['torch']}", "",
             "| variant | K | ms (median) | × plain | peak MB | × plain | note |", "|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return format(float(v), fmt) if v not in (None, "") else "-"
    for r in rows:
        note = r.get("error") or ("skipped" if not r["ms_median"] else "")
        lines.append(f"| {r['variant']} | {r['classes']} | {f(r['ms_median'], '.1f')} "
                     f"| {f(r['ratio_to_plain'], '.2f')} | {f(r.get('peak_mb'), '.1f')} "
                     f"| {f(r.get('peak_ratio_to_plain'), '.2f')} | {note} |")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python bench/gpu_report.py OUTDIR (a bench/gpu_suite.sh output folder)", file=sys.stderr)
        return 2
    out = argv[0]
    lines = ["# fisnet GPU suite report", ""]
    summary = os.path.join(out, "summary.txt")
    if os.path.exists(summary):
        lines += ["```", open(summary).read().rstrip(), "```", ""]
    kpath = os.path.join(out, "kernels.csv")
    lines += ["## Kernels (largest size of each)", ""]
    lines += kernels_section(kpath) if os.path.exists(kpath) else ["(no kernels.csv)"]
    lines += ["", "## Training steps", ""]
    paths = sorted(glob.glob(os.path.join(out, "scaling-*.csv")))
    for p in paths:
        lines += scaling_section(p) + [""]
    if not paths:
        lines.append("(no scaling-*.csv)")
    for p in sorted(glob.glob(os.path.join(out, "vit-step-*.csv"))):
        rows = _read(p)
        lines += ["", f"## ViT step ({os.path.basename(p)})", "",
                  "| model | step | ms | ratio | peak MB | ratio |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['step']} | {r['ms_median']} | {r['ratio_to_plain']}x | {r['peak_mb']} | "
                  f"{r['peak_ratio_to_plain']}x |" for r in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
