"""Smoke tests of the benchmarks at tiny sizes: bench/scaling.py (fisnet.bench_scaling), its
CPU peak-memory measurement, and bench/gpu_report.py."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from fisnet import bench_scaling as bs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MB = 1_000_000


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- peak memory (CPU)

def test_cpu_peak_counts_live_blocks_of_the_step():
    def step():
        a = torch.empty(1_000_000)   # 4 MB
        b = torch.empty(2_000_000)   # 8 MB: 12 MB live
        del a
        c = torch.empty(500_000)     # 2 MB: 10 MB live
        del b, c
        d = torch.empty(250_000)     # 1 MB
        return d
    for _ in range(2):  # the second session must not see the first one's leftovers
        peak = bs.peak_step_bytes(step, "cpu")
        assert 12 * MB <= peak < 12 * MB + 64_000, peak


def test_cpu_peak_ignores_frees_of_older_blocks():
    older = [torch.empty(2_000_000)]  # 8 MB allocated before the step

    def step():
        older.pop()                   # freed during the step: not part of its peak
        x = torch.empty(1_000_000)    # 4 MB
        y = x + 1                     # 4 MB more
        return y
    peak = bs.peak_step_bytes(step, "cpu")
    assert 8 * MB <= peak < 8 * MB + 64_000, peak


def test_trace_parser_pairs_frees_with_their_allocations(tmp_path):
    def ev(i, nbytes, addr, dev=0):
        return {"name": "[memory]", "ts": i, "args": {"Bytes": nbytes, "Addr": addr, "Device Type": dev, "Ev Idx": i}}
    events = [ev(0, -500, 9), ev(1, 100, 1), ev(2, 300, 2), ev(3, 7000, 5, dev=1), ev(4, -100, 1), ev(5, 50, 3),
              ev(6, -300, 2), ev(7, 10, 4)]
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": events}))
    # live: 100, 400, 300, 350, 50, 60: peak 400 (the free of block 9 and the CUDA block do not count)
    assert bs._cpu_peak_from_trace(str(p)) == 400


# ----------------------------------------------------------------------------- the scaling benchmark

TINY = ["--batch", "2", "--size", "12", "--width", "4", "--repeats", "1"]


def test_scaling_tiny_run_writes_time_and_memory(tmp_path, capsys):
    rc = bs.main(["--classes", "3", "--variants", "bare,selective,dual", *TINY, "--out", str(tmp_path)])
    assert rc == 0
    files = sorted(os.listdir(tmp_path))
    assert [f for f in files if f.endswith(".csv")] == [f"scaling-{bs._slug(bs.device_name('cpu'))}.csv"]
    rows = _rows(tmp_path / [f for f in files if f.endswith(".csv")][0])
    assert list(rows[0])[:6] == ["variant", "classes", "ms_median", "ratio_to_plain", "peak_mb", "peak_ratio_to_plain"]
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"plain", "bare", "selective", "dual"}
    for r in rows:
        assert float(r["ms_median"]) > 0 and float(r["peak_mb"]) > 0 and r["error"] == ""
        assert r["threads"] == "1"
    assert float(by["plain"]["ratio_to_plain"]) == 1.0 and float(by["plain"]["peak_ratio_to_plain"]) == 1.0
    # the heatmap graph (create_graph=True) holds more than the plain step; Dual's two maps more still
    assert float(by["selective"]["peak_mb"]) > float(by["plain"]["peak_mb"])
    assert float(by["dual"]["peak_mb"]) > float(by["selective"]["peak_mb"])
    assert "peak" not in capsys.readouterr().err


def test_scaling_default_out_is_a_fresh_folder_and_no_silent_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert bs.main(["--classes", "2", "--variants", "plain", "--no-memory", *TINY]) == 0
    out = capsys.readouterr().out
    wrote = [line for line in out.splitlines() if line.startswith("wrote ")][0].split()[1]
    assert wrote.startswith(str(tmp_path)) and os.path.exists(wrote)
    assert not wrote.startswith(os.path.join(ROOT, "bench"))
    folder = os.path.dirname(wrote)
    before = open(wrote).read()
    assert bs.main(["--classes", "2", "--variants", "plain", "--no-memory", *TINY, "--out", folder]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert open(wrote).read() == before
    assert bs.main(["--classes", "2", "--variants", "plain", "--no-memory", *TINY, "--out", folder,
                    "--overwrite"]) == 0


def test_scaling_settings_and_bad_input(tmp_path, capsys):
    rc = bs.main(["--setting", "a,b", "--batch", "2", "--size", "32", "--repeats", "1", "--no-memory",
                  "--variants", "bare,selective", "--out", str(tmp_path)])
    assert rc == 0
    csvs = sorted(f for f in os.listdir(tmp_path) if f.endswith(".csv"))
    assert len(csvs) == 2 and "setting-a" in csvs[0] and "setting-b-resnet18" in csvs[1]
    a, b = _rows(tmp_path / csvs[0]), _rows(tmp_path / csvs[1])
    assert {r["classes"] for r in a + b} == {"10"}
    assert a[0]["model"].startswith("small_cnn(width=16") and b[0]["model"] == "resnet18"
    for argv, word in ((["--setting", "c"], "--setting"), (["--variants", "nope"], "unknown variants"),
                       (["--model", "alexnet"], "--model"), (["--threads", "0"], "--threads"),
                       (["--classes", "2,x"], "--classes")):
        with pytest.raises(SystemExit) as e:
            bs.main(argv + ["--out", str(tmp_path / "bad")])
        assert e.value.code == 2
        assert word in capsys.readouterr().err


def test_failing_configuration_is_reported_and_the_rest_runs(tmp_path, monkeypatch, capsys):
    real = bs._make_step

    def broken(variant, *a, **k):
        if variant == "selective":
            raise RuntimeError("simulated out of memory")
        return real(variant, *a, **k)
    monkeypatch.setattr(bs, "_make_step", broken)
    rc = bs.main(["--classes", "2", "--variants", "selective,bare", "--no-memory", *TINY, "--out", str(tmp_path)])
    assert rc == 1
    rows = {r["variant"]: r for r in _rows(tmp_path / os.listdir(tmp_path)[0])}
    assert "simulated out of memory" in rows["selective"]["error"] and rows["selective"]["ms_median"] == ""
    assert float(rows["bare"]["ms_median"]) > 0
    assert "failed" in capsys.readouterr().out


def test_bare_penalty_step_trains_through_the_input_gradient():
    """The bare row is a real gradient×input penalty: its step moves the weights differently from
    the plain step (the penalty's gradient flows through the double backward)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 12)
    m = torch.zeros(2, 1, 12, 12)
    m[..., 3:9, 3:9] = 1
    y = torch.tensor([0, 1])
    plain = bs._make_step("plain", 2, x, m, y, 4, "cpu")
    bare = bs._make_step("bare", 2, x, m, y, 4, "cpu")
    w0 = [p.detach().clone() for p in plain.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(w0, bare.model.parameters()))  # same start
    plain()
    bare()
    first = next(plain.model.parameters())
    assert not torch.allclose(first, next(bare.model.parameters()))
    assert not torch.equal(first, w0[0])


# ----------------------------------------------------------------------------- the GPU suite's report

def test_gpu_report_summarises_the_csvs(tmp_path):
    bs.main(["--classes", "2", "--variants", "selective", *TINY, "--out", str(tmp_path)])
    with open(tmp_path / "kernels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "backend", "op", "dtype", "numel", "ms_median", "gbps", "frac_of_copy_bw",
                    "speedup_vs_reference", "torch_version"])
        w.writerow(["X", "cuda", "bwd", "fp32", 1024, "0.1", "50", "0.5", "3.0", "2.11"])
        w.writerow(["X", "cuda", "bwd", "fp32", 4096, "0.1", "90", "0.9", "3.0", "2.11"])
        w.writerow(["X", "triton", "fwd", "bf16", 4096, "0.1", "40", "0.7", "2.0", "2.11"])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_report.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "report.md").read_text()
    assert "| cuda | bwd | fp32 | 4,096 |" in text and "| cuda | bwd | fp32 | 1,024 |" not in text
    assert "below 80 % of the copy bandwidth at their largest size: triton/fwd/bf16" in text
    assert "| selective | 2 |" in text
