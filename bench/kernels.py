"""Per-op benchmark of the LRP-Flex ReLU kernels: forward, heatmap backward (lrp_relu_bwd) and
double backward (lrp_relu_bwd_bwd), and of the z⁺ rule's ratio step (zplus_ratio,
zplus_ratio_bwd; fisnet_ext.zplus_ops), for every backend available on the device, next to a
copy baseline that measures the device's copy bandwidth in the same run.

Backends: "cpp" (torch.ops.fisnet.* on CPU tensors, the compiled extension), "cuda"
(torch.ops.fisnet.* on CUDA tensors, when fisnet_ext was built with FISNET_CUDA=1), "triton"
(fisnet_ext.triton launchers, GPU only), "reference" (fisnet_ext.reference, eager PyTorch).
The "copy" row is `clone()` of one tensor (it allocates its output, like the ops do).

Timing: median over interleaved repeats (each repeat runs every backend once, so drift in clock
or load hits all alike); CUDA events on GPU, time.perf_counter on CPU; small sizes run several
calls per measurement.  GB/s counts the bytes each op must move: fwd 2 tensors, bwd 3,
bwd_bwd 5, zplus_ratio 4, zplus_ratio_bwd 7 (copy 2), times the element size.

    python bench/kernels.py --device cpu --quick
    python bench/kernels.py --device cpu --act all --sizes p20 --out /tmp/k.csv   # + lrp_act kinds

With --act KINDS (comma-separated names of fisnet_ext.ACT_KINDS, or "all") the lrp_act ops join:
one row per kind and op, ``act_fwd[gelu]``, ``act_bwd[gelu]``, ``act_bwd_bwd[gelu]`` (the bwd ops
at eps = 1e-2 with the kind's PyTorch default parameter), and a "torch" row per kind for PyTorch's
own forward (F.*) and ordinary backward (ATen's *_backward) for scale.
    python bench/kernels.py --device cuda                 # 2^16 .. 2^28 elements, fp32/fp16/bf16

Writes bench/results/kernels-<device-name>.csv (see --out) and prints a table.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from fisnet.bench_scaling import device_name  # one definition for both benchmarks

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from fisnet_ext import reference  # noqa: E402

OPS = ("fwd", "bwd", "bwd_bwd", "zplus_ratio", "zplus_ratio_bwd")
TENSORS_MOVED = {"copy": 2, "fwd": 2, "bwd": 3, "bwd_bwd": 5, "zplus_ratio": 4, "zplus_ratio_bwd": 7}
EPS = 1e-2
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
COLUMNS = ["device", "backend", "op", "dtype", "numel", "ms_median", "gbps", "frac_of_copy_bw",
           "speedup_vs_reference", "torch_version"]


ACT_OPS = ("act_fwd", "act_bwd", "act_bwd_bwd")
ACT_MOVED = {"act_fwd": 2, "act_bwd": 3, "act_bwd_bwd": 5}


def moved(op: str) -> int:
    """Tensors an op must move (the lrp_act rows are named like act_bwd[gelu])."""
    return ACT_MOVED[op.split("[")[0]] if op.startswith("act_") else TENSORS_MOVED[op]


def act_backends(kinds, device: str) -> dict:
    """backend -> {op[kind]: fn(x, g, gg, zp)} for the lrp_act ops of `kinds`."""
    from fisnet_ext import act_ops

    out = {}
    fams = {"reference": act_ops.REFERENCE}
    if device == "cpu" and act_ops.NATIVE is not None:
        fams["cpp"] = act_ops.NATIVE
    if device == "cuda":
        if act_ops.ops.WITH_CUDA:
            fams["cuda"] = act_ops.NATIVE
        if act_ops.TRITON is not None:
            fams["triton"] = act_ops.TRITON
    for name, fam in fams.items():
        fns = out.setdefault(name, {})
        for kind in kinds:
            code, p = act_ops.KINDS[kind], act_ops.DEFAULT_PARAM.get(kind, 0.0)
            fns[f"act_fwd[{kind}]"] = lambda x, g, gg, zp, f=fam, c=code, p=p: f.fwd(x, c, p)
            fns[f"act_bwd[{kind}]"] = lambda x, g, gg, zp, f=fam, c=code, p=p: f.bwd(g, x, c, p, EPS)
            fns[f"act_bwd_bwd[{kind}]"] = lambda x, g, gg, zp, f=fam, c=code, p=p: f.bwd_bwd(gg, g, x, c, p, EPS)
    torch_fns = out.setdefault("torch", {})
    for kind in kinds:
        code, p = act_ops.KINDS[kind], act_ops.DEFAULT_PARAM.get(kind, 0.0)
        torch_fns[f"act_fwd[{kind}]"] = lambda x, g, gg, zp, c=code, p=p: act_ops.reference.act_fwd(x, c, p)
        torch_fns[f"act_bwd[{kind}]"] = lambda x, g, gg, zp, c=code, p=p: act_ops.plain_grad(g, x, c, p)
    return out


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def backends(device: str) -> dict:
    """name -> {op: fn(x, g, gg, zp)} for the backends usable on `device` (with why others are not).

    The z⁺ ratio ops take g, num = x, zp (and gs = gg for the backward)."""
    out = {}
    skipped = {}
    try:
        import fisnet_ext.ops as ops  # importing registers torch.ops.fisnet.* when _C is built
        have_c, with_cuda = ops.HAVE_C, ops.WITH_CUDA
        c_error = getattr(ops, "C_ERROR", None)
    except Exception as exc:  # noqa: BLE001 - the op layer is optional for this benchmark
        have_c, with_cuda, c_error = False, False, repr(exc)

    def native():
        f = torch.ops.fisnet
        fns = {
            "fwd": lambda x, g, gg, zp: f.lrp_relu_fwd(x),
            "bwd": lambda x, g, gg, zp: f.lrp_relu_bwd(g, x, EPS),
            "bwd_bwd": lambda x, g, gg, zp: f.lrp_relu_bwd_bwd(gg, g, x, EPS),
        }
        if hasattr(f, "zplus_ratio"):
            fns["zplus_ratio"] = lambda x, g, gg, zp: f.zplus_ratio(g, x, zp, EPS)
            fns["zplus_ratio_bwd"] = lambda x, g, gg, zp: f.zplus_ratio_bwd(gg, g, x, zp, EPS)
        return fns

    if device == "cpu":
        if have_c:
            out["cpp"] = native()
        else:
            skipped["cpp"] = f"fisnet_ext._C not built ({c_error})"
        skipped["cuda"] = skipped["triton"] = "GPU only"
    else:
        if with_cuda:
            out["cuda"] = native()
        else:
            skipped["cuda"] = "fisnet_ext not built with FISNET_CUDA=1" if have_c else f"fisnet_ext._C not built ({c_error})"
        try:
            from fisnet_ext.triton import lrp_relu as tl
            out["triton"] = {
                "fwd": lambda x, g, gg, zp: tl.lrp_relu_fwd(x),
                "bwd": lambda x, g, gg, zp: tl.lrp_relu_bwd(g, x, EPS),
                "bwd_bwd": lambda x, g, gg, zp: tl.lrp_relu_bwd_bwd(gg, g, x, EPS),
            }
            try:
                from fisnet_ext.triton import zplus as tz
                out["triton"]["zplus_ratio"] = lambda x, g, gg, zp: tz.zplus_ratio(g, x, zp, EPS)
                out["triton"]["zplus_ratio_bwd"] = lambda x, g, gg, zp: tz.zplus_ratio_bwd(gg, g, x, zp, EPS)
            except ImportError:
                pass
        except ImportError as exc:
            skipped["triton"] = f"triton not importable ({exc})"
    out["reference"] = {
        "fwd": lambda x, g, gg, zp: reference.lrp_relu_fwd(x),
        "bwd": lambda x, g, gg, zp: reference.lrp_relu_bwd(g, x, EPS),
        "bwd_bwd": lambda x, g, gg, zp: reference.lrp_relu_bwd_bwd(gg, g, x, EPS),
        "zplus_ratio": lambda x, g, gg, zp: reference.zplus_ratio(g, x, zp, EPS),
        "zplus_ratio_bwd": lambda x, g, gg, zp: reference.zplus_ratio_bwd(gg, g, x, zp, EPS),
    }
    return out, skipped


class Timer:
    """Times `calls` back-to-back calls of fn; returns ms per call."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn, calls: int) -> float:
        if self.cuda:
            self.start.record()
            for _ in range(calls):
                fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls


def make_inputs(numel: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(numel)
    x = torch.randn(numel, generator=gen, device=device, dtype=torch.float32)
    x[torch.rand(numel, generator=gen, device=device) < 0.1] = 0.0
    g = torch.randn(numel, generator=gen, device=device, dtype=torch.float32)
    gg = torch.randn(numel, generator=gen, device=device, dtype=torch.float32)
    zp = torch.rand(numel, generator=gen, device=device, dtype=torch.float32)  # z⁺ >= 0
    return x.to(dtype), g.to(dtype), gg.to(dtype), zp.to(dtype)


def bench_one(numel, dtype, device, impls, repeats, warmup, timer):
    """{(backend, op): median ms} for one size and dtype, interleaving all cases per repeat."""
    x, g, gg, zp = make_inputs(numel, dtype, device)
    cases = {("torch", "copy"): lambda: x.clone()}
    for name, fns in impls.items():
        for op in fns:  # a backend may lack an op family (an older build)
            cases[(name, op)] = (lambda fn=fns[op]: fn(x, g, gg, zp))
    # enough calls per measurement that one takes ~1 ms on GPU / ~2 ms on CPU at the copy speed
    bytes_per_call = 2 * numel * x.element_size()
    target = 1e9 if device == "cuda" else 2e7  # bytes per measurement
    calls = int(min(64, max(1, target // bytes_per_call)))
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            times[key].append(timer(fn, calls))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="few sizes and repeats (< 1 min on 2 CPU cores)")
    p.add_argument("--sizes", type=str, default=None,
                   help="comma-separated numels; 2^k may be written as 2**k or as 'pK' (e.g. p20)")
    p.add_argument("--dtypes", type=str, default=None, help="comma-separated, of fp32,fp16,bf16,fp64")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=str, default=None, help="CSV path (default bench/results/kernels-<device>.csv)")
    p.add_argument("--act", type=str, default=None,
                   help="also the lrp_act ops of these kinds (comma-separated names, or 'all')")
    p.add_argument("--only-act", action="store_true", help="with --act: skip the lrp_relu and z+ rows")
    args = p.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")

    if args.sizes:
        def parse(s):
            s = s.strip()
            if s.startswith("p"):
                return 2 ** int(s[1:])
            if "**" in s:
                a, b = s.split("**")
                return int(a) ** int(b)
            return int(float(s))
        sizes = [parse(s) for s in args.sizes.split(",") if s.strip()]
    elif args.quick:
        sizes = [2**16, 2**20, 2**22] if device == "cpu" else [2**16, 2**20, 2**24]
    else:
        sizes = [2**k for k in range(16, 25, 2)] if device == "cpu" else [2**k for k in range(16, 29, 2)]
    if args.dtypes:
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            p.error(f"unknown dtypes {bad}; choose from {list(DTYPES)}")
    else:
        dtypes = ["fp32"] if device == "cpu" or args.quick else ["fp32", "fp16", "bf16"]
    repeats = args.repeats or (5 if args.quick else 15)

    name = device_name(device)
    out = Path(args.out) if args.out else HERE / "results" / f"kernels-{slug(name)}.csv"
    impls, skipped = backends(device)
    if args.act:
        from fisnet_ext import act_ops

        kinds = list(act_ops.KINDS) if args.act == "all" else [k.strip() for k in args.act.split(",") if k.strip()]
        bad = [k for k in kinds if k not in act_ops.KINDS]
        if bad:
            p.error(f"unknown activation kinds {bad}; choose from {list(act_ops.KINDS)} or 'all'")
        if args.only_act:
            impls = {}
        for name, fns in act_backends(kinds, device).items():
            impls.setdefault(name, {}).update(fns)
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    print(f"# {name} ({device}{threads}), torch {torch.__version__}; backends: {', '.join(impls)}")
    for b, why in skipped.items():
        print(f"#   skipped {b}: {why}")

    timer = Timer(device)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for numel in sizes:
            ms = bench_one(numel, dtype, device, impls, repeats, args.warmup, timer)
            esize = torch.tensor([], dtype=dtype).element_size()

            def gbps(op, t):
                return moved(op) * numel * esize / (t * 1e-3) / 1e9

            copy_bw = gbps("copy", ms[("torch", "copy")])
            for (backend, op), t in ms.items():
                ref_t = ms.get(("reference", op))
                rows.append({
                    "device": name, "backend": backend, "op": op, "dtype": dname, "numel": numel,
                    "ms_median": f"{t:.5f}", "gbps": f"{gbps(op, t):.2f}",
                    "frac_of_copy_bw": f"{gbps(op, t) / copy_bw:.3f}",
                    "speedup_vs_reference": f"{ref_t / t:.2f}" if ref_t is not None else "",
                    "torch_version": torch.__version__,
                })
            del ms
            if device == "cuda":
                torch.cuda.empty_cache()

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)

    shown = ["backend", "op", "dtype", "numel", "ms_median", "gbps", "frac_of_copy_bw", "speedup_vs_reference"]
    head = ["backend", "op", "dtype", "numel", "ms", "GB/s", "of_copy", "vs_ref"]
    widths = [max(len(h), *(len(str(r[c])) for r in rows)) for h, c in zip(head, shown)]
    print("  ".join(h.rjust(wd) for h, wd in zip(head, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(wd) for c, wd in zip(shown, widths)))
    print(f"# wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
