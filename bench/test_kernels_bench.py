"""Per-op kernel benchmarks as pytest-benchmark tests.

    python -m pytest bench --benchmark-only                          # table: calibrated rounds, statistics
    python -m pytest bench --benchmark-only --benchmark-autosave     # + JSON in bench/results/pytest-benchmark/
    python -m pytest bench --benchmark-only --benchmark-compare      # against the last saved run
    python -m pytest bench --benchmark-only -k "bwd_bwd and cpp"     # a subset
    FISNET_BENCH_SIZES=65536,1048576 FISNET_BENCH_THREADS=1 python -m pytest bench --benchmark-only

One benchmark per (op, backend, size), fp32 (fp32/bf16 on CUDA). Backends: "cpp" (the compiled
CPU kernels, torch.ops.fisnet.*), "cuda" (the same ops on CUDA tensors when built with
FISNET_CUDA=1), "triton" (GPU only), "reference" (fisnet_ext.reference, eager PyTorch), and a
"copy" baseline (clone) for the device's bandwidth. `extra_info` holds the GB/s of the median
time, counting the bytes each op must move at least (inputs read once, outputs written once):
lrp_relu fwd 2 tensors, bwd 3, bwd_bwd 5; zplus_ratio 4, zplus_ratio_bwd 7; bn_train_bwd 3,
bn_train_bwd_bwd 5; copy 2. bench/kernels.py (the older script, CSV output) measures the same
ops with interleaved repeats.
"""
import os

import pytest
import torch

EPS = 1e-2
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
_DEFAULT_SIZES = [2**16, 2**20, 2**22] + ([2**26] if CUDA else [])
SIZES = [int(s) for s in os.environ.get("FISNET_BENCH_SIZES", "").split(",") if s.strip()] or _DEFAULT_SIZES
DTYPES = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if CUDA else {})}
# CPU threads for the whole run (default: torch's); 1 is the steadiest on a shared machine, where
# waiting for a descheduled worker thread shows up as ~50 ms outliers in multi-threaded ops
THREADS = int(os.environ.get("FISNET_BENCH_THREADS", "0") or 0)
if THREADS > 0:
    torch.set_num_threads(THREADS)

TENSORS_MOVED = {"copy": 2, "lrp_relu_fwd": 2, "lrp_relu_bwd": 3, "lrp_relu_bwd_bwd": 5, "zplus_ratio": 4,
                 "zplus_ratio_bwd": 7, "bn_train_bwd": 3, "bn_train_bwd_bwd": 5}
BN_C, BN_HW = 16, 32 * 32  # BatchNorm inputs (N, 16, 32, 32), N = numel / 16384


def _inputs(numel, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(numel)

    def rnd():
        return torch.randn(numel, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)

    x, g, gg = rnd(), rnd(), rnd()
    zp = (rnd().float().abs() + 0.1).to(dtype)
    n = max(1, numel // (BN_C * BN_HW))
    shape = (n, BN_C, 32, 32)
    bx, bg, bh = (t.reshape(-1)[: n * BN_C * BN_HW].reshape(shape) if t.numel() >= n * BN_C * BN_HW
                  else torch.randn(shape, device=DEVICE, dtype=dtype) for t in (x, g, gg))
    w = torch.rand(BN_C, device=DEVICE, dtype=torch.float32).to(dtype) + 0.5
    return dict(x=x, g=g, gg=gg, zp=zp, bx=bx, bg=bg, bh=bh, w=w)


def _ops(backend):
    """{op: fn(inputs)} for `backend`, or a reason string when it is not usable here."""
    if backend == "reference":
        from fisnet_ext import reference as r
        f = r
    elif backend in ("cpp", "cuda"):
        if (backend == "cuda") != CUDA:
            return "cuda kernels need a GPU" if backend == "cuda" else "cpp is the CPU backend"
        import fisnet_ext.ops as ops
        if not ops.HAVE_C or (backend == "cuda" and not ops.WITH_CUDA):
            return "fisnet_ext._C not built" + (" with FISNET_CUDA=1" if backend == "cuda" else "")
        f = torch.ops.fisnet
    elif backend == "triton":
        if not CUDA:
            return "Triton kernels are benchmarked on GPUs only"
        try:
            from fisnet_ext.triton import bn as tb, lrp_relu as tl, zplus as tz
        except ImportError as e:
            return f"triton not importable ({e})"
        return {
            "lrp_relu_fwd": lambda t: tl.lrp_relu_fwd(t["x"]),
            "lrp_relu_bwd": lambda t: tl.lrp_relu_bwd(t["g"], t["x"], EPS),
            "lrp_relu_bwd_bwd": lambda t: tl.lrp_relu_bwd_bwd(t["gg"], t["g"], t["x"], EPS),
            "zplus_ratio": lambda t: tz.zplus_ratio(t["g"], t["x"], t["zp"], EPS),
            "zplus_ratio_bwd": lambda t: tz.zplus_ratio_bwd(t["gg"], t["g"], t["x"], t["zp"], EPS),
            "bn_train_bwd": lambda t: tb.bn_train_bwd(t["bg"], t["bx"], t["w"], 1e-5),
            "bn_train_bwd_bwd": lambda t: tb.bn_train_bwd_bwd(t["bh"], t["bg"], t["bx"], t["w"], 1e-5),
        }
    else:
        raise ValueError(backend)
    return {
        "lrp_relu_fwd": lambda t: f.lrp_relu_fwd(t["x"]),
        "lrp_relu_bwd": lambda t: f.lrp_relu_bwd(t["g"], t["x"], EPS),
        "lrp_relu_bwd_bwd": lambda t: f.lrp_relu_bwd_bwd(t["gg"], t["g"], t["x"], EPS),
        "zplus_ratio": lambda t: f.zplus_ratio(t["g"], t["x"], t["zp"], EPS),
        "zplus_ratio_bwd": lambda t: f.zplus_ratio_bwd(t["gg"], t["g"], t["x"], t["zp"], EPS),
        "bn_train_bwd": lambda t: f.bn_train_bwd(t["bg"], t["bx"], t["w"], 1e-5),
        "bn_train_bwd_bwd": lambda t: f.bn_train_bwd_bwd(t["bh"], t["bg"], t["bx"], t["w"], 1e-5),
    }


def _bytes(op, t):
    if op.startswith("bn_"):
        return TENSORS_MOVED[op] * t["bx"].numel() * t["bx"].element_size()
    return TENSORS_MOVED[op] * t["x"].numel() * t["x"].element_size()


def _run(benchmark, fn, t, op):
    if CUDA:
        def call():
            fn(t)
            torch.cuda.synchronize()
    else:
        def call():
            fn(t)
    call()  # warm-up outside the statistics (first-call dispatch, Triton compile)
    benchmark(call)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        med = stats.stats.median
        benchmark.extra_info["gbps"] = round(_bytes(op, t) / med / 1e9, 2) if med > 0 else None
        benchmark.extra_info["bytes"] = _bytes(op, t)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    benchmark.extra_info["threads"] = torch.get_num_threads()


OPS = [op for op in TENSORS_MOVED if op != "copy"]
BACKENDS = ["cpp", "cuda", "triton", "reference"]


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_copy(benchmark, numel, dtype):
    t = _inputs(numel, DTYPES[dtype])
    benchmark.group = f"{dtype} n={numel}"
    _run(benchmark, lambda t: t["x"].clone(), t, "copy")


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_kernel(benchmark, op, backend, dtype, numel):
    ops = _ops(backend)
    if isinstance(ops, str):
        pytest.skip(ops)
    if op not in ops:
        pytest.skip(f"{backend} has no {op}")
    t = _inputs(numel, DTYPES[dtype])
    benchmark.group = f"{op} {dtype} n={numel}"
    _run(benchmark, ops[op], t, op)
