"""fisnet.tune_cpu_malloc: the process-level malloc setting of the fisnet commands."""
import subprocess
import sys

import fisnet
from fisnet import perf


def _run(code, env_extra):
    import os
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_applies_on_glibc_and_honours_opt_out():
    code = "import fisnet, torch; r = fisnet.tune_cpu_malloc(); x = torch.ones(10_000_000); print(r, float(x.sum()))"
    on = _run(code, {"FISNET_MALLOC_TUNING": "1"})
    off = _run(code, {"FISNET_MALLOC_TUNING": "0"})
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert off.stdout.split() == ["False", "10000000.0"]
    expected = "True" if sys.platform.startswith("linux") else "False"
    assert on.stdout.split() == [expected, "10000000.0"]


def test_idempotent(monkeypatch):
    monkeypatch.setattr(perf, "_done", True)
    assert fisnet.tune_cpu_malloc() is True


def test_library_use_leaves_malloc_alone():
    """Only the commands (and users who ask) tune malloc: an ISNet step through the library API,
    batched Original included, leaves the process's malloc settings alone."""
    code = ("import torch, fisnet; from fisnet import perf, models; torch.manual_seed(0); "
            "m = models.small_cnn(num_classes=3, in_channels=3, width=4); x = torch.rand(2, 3, 12, 12); "
            "out = fisnet.ISNet(m, 'original').train()(x, torch.tensor([0, 1])); "
            "out.heatmaps.sum().backward(); print(tuple(out.heatmaps.shape), perf._done)")
    r = _run(code, {"FISNET_MALLOC_TUNING": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "False" and "3," in r.stdout  # 3 maps per image, tuning untouched
