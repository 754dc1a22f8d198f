"""Training loop for ISNets and plain classifiers (docs/spec.md §5): :class:`Trainer`, :func:`train`.

Defaults (docs/spec.md §5): SGD with momentum 0.9, lr 1e-2, batch 128, gradient clipping at norm 1,
P 0.7 (a float or a schedule ``{epoch: P}``), d 0.9, E 1, ε 1e-2, Zb on with [0, 1] bounds,
foreground loss "hybrid", C1/C2 from the §4.3 heuristic (``fisnet.tune_cuts``) unless given.
P = 0 for every epoch trains a plain classifier (no heatmaps are computed). ``rules`` overrides
entries of the LRP rule table (``{op kind: rule name}``, fisnet.rules) for the training heatmaps,
the C1/C2 tuning and the evaluation's relevance metrics.

Each epoch the trainer evaluates every test set (accuracy and the background relevance share,
``fisnet.metrics``), appends a row to ``log.json`` / ``log.csv`` in the run folder and writes
``checkpoint.pt`` atomically (a temporary file, then ``os.replace``). The checkpoint holds the
model, the optimizer (and AMP scaler), the number of finished epochs, the RNG states (torch,
CUDA, numpy, python, the ISNet generator), the cuts, the config and the log history — tensors and
plain Python types only: every checkpoint is loaded with ``torch.load(weights_only=True)``
(:func:`load_checkpoint`), so a file holding any other pickled object is refused before it can
run code. A folder that already holds a run is refused unless ``resume`` (or ``overwrite``);
a resumed run must keep its config (:data:`RESUME_FREE` lists what may change). A non-finite
loss, gradient norm or weight stops training with :class:`TrainingDivergedError`, leaving the
last finite checkpoint in place.
``resume=True`` continues from it: the data order of epoch e is a function of (seed, e) only
(a ``DistributedSampler`` reshuffled with ``set_epoch``), so a run killed mid-way and resumed
ends with the same weights as an uninterrupted run with the same seed (bit for bit on CPU;
on GPU with ``deterministic=True``).

The step losses are summed on the device; the host reads them (one synchronisation) every
``log_every`` steps and at the end of each epoch. The divergence check acts at those reads and
names the first non-finite step (remembered on the device), so training may run up to
``log_every - 1`` steps past it before stopping; the checkpoint is unaffected (it is written only
after an epoch whose steps and weights are all finite).

Multi-process (``torchrun --nproc_per_node N ...``; ``WORLD_SIZE > 1``): the trainer calls
``init_process_group`` (NCCL on CUDA, gloo on CPU), gives each rank 1/N of every global batch
(``batch_size`` is the GLOBAL batch), broadcasts the initial weights from rank 0 and wraps the
model in ``DistributedDataParallel``: the training forward (the ISNet trace) runs through the
wrapper and its reducer averages the gradients in buckets during the final backward (then the
trainer clips). The heatmap backward inside the forward (``autograd.grad(create_graph=True)``)
differentiates with respect to activations, not parameters, so the reducer's hooks fire once per
step as usual. ``broadcast_buffers=False``: each rank keeps its own BatchNorm running statistics
(rank 0's are saved and evaluated), as before. ``ddp=False`` all-reduces the gradients by hand
after the backward instead (the same weights). With no BatchNorm, N processes give the weights of
one process on the same global batch (up to float summation order; tested to 1e-10 in float64).
``sync_bn=True`` converts BatchNorm layers to ``SyncBatchNorm`` (statistics over the global
batch); note that the LRP trace then sees SyncBatchNorm's custom autograd function, whose double
backward PyTorch does not provide — use it for plain training, or keep per-rank BatchNorm.
Only rank 0 writes logs and checkpoints.

Mixed precision: ``amp=True`` on CUDA runs the forward (and the heatmaps) under
``torch.autocast`` (bfloat16 where supported, else float16 with a GradScaler); the heatmap loss
itself is computed in fp32. Ignored on CPU.

The pieces, one job each, live in :mod:`fisnet.training` (config, device, distributed, data,
checkpoint, sums, logs); this module is the loop that joins them.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .cuts import tune_cuts
from .loss import ISNetLoss
from .metrics import evaluate, relevance_metrics
from .training import distributed as _ddp
from .training.checkpoint import (CHECKPOINT, atomic_save, check_resume_config, load_checkpoint, load_weights,
                                  model_from_checkpoint, restore_rng_states, rng_states, run_exists, seed_all)
from .training.config import RESUME_FREE, CheckpointError, RunExistsError, TrainConfig, TrainingDivergedError
from .training.data import check_global_batch, make_loader, to_device
from .training.device import autocast, choose_device, make_deterministic, mixed_precision, resolve_device
from .training.logs import progress_bar, show_interval, summary_line, tty, write_logs
from .training.sums import StepSums
from .variants import ISNet, ISNetOutput

__all__ = ["TrainConfig", "Trainer", "train", "load_checkpoint", "model_from_checkpoint", "atomic_save",
           "CheckpointError", "TrainingDivergedError", "RunExistsError", "resolve_device"]


class Trainer:
    """Train ``model`` on ``train_set`` (a Dataset of (image, mask, label)).

    Args: model (an ``nn.Module``; modified in place), train_set, test_sets ({name: Dataset or
    loader}), out (run folder; None = no files), config (:class:`TrainConfig`) or keyword
    overrides of it, cuts (C1/C2 dict; None = tuned on a copy of the model before training
    when the heatmap loss is used), resume (continue from ``out/checkpoint.pt`` if present; the
    config must then equal the saved one except for the fields in ``RESUME_FREE``; ``epochs`` may
    grow), overwrite (start afresh in a folder that already holds a run; without it and without
    resume such a folder is refused with :class:`RunExistsError`).

    A step whose loss or gradient norm is not finite, or an epoch that ends with non-finite
    weights, stops training with :class:`TrainingDivergedError`; the checkpoint of the last
    finished epoch (finite) is left in place.

    ``fit()`` runs the remaining epochs and returns the history (one dict per epoch).
    """

    def __init__(self, model: nn.Module, train_set: Dataset, test_sets: Optional[Mapping[str, Any]] = None,
                 out: Optional[str] = None, config: Optional[TrainConfig] = None, *, cuts=None,
                 resume: bool = False, overwrite: bool = False, **overrides):
        self.cfg = cfg = _with_overrides(config, overrides)
        self.out, self.train_set, self.test_sets = out, train_set, dict(test_sets or {})
        self.history: List[Dict[str, Any]] = []
        self.epoch = 0  # finished epochs
        self.cuts = cuts
        self.rank, self.world = _ddp.init_distributed(cfg.device)
        self.device = choose_device(cfg.device, self.world)
        check_global_batch(cfg.batch_size, self.world)
        self._refuse_existing_run(resume, overwrite)
        self._seed()
        self._build_model(model)
        self.opt = self._make_optimizer()
        self.amp_dtype, self.scaler = mixed_precision(cfg.amp, self.device)
        self.sampler, self.loader = make_loader(train_set, batch_size=cfg.batch_size, seed=cfg.seed,
                                                num_workers=cfg.num_workers, rank=self.rank, world=self.world,
                                                device=self.device)
        if self.world > 1:  # same initial weights everywhere
            _ddp.broadcast_initial_state(self.model)
        self.loss_fn = self._baseline_loss()  # a baseline's loss (fisnet.baselines) replaces the ISNet loss
        self._needs_heatmaps = self._uses_heatmaps() and self.loss_fn is None
        resumed = self._resume_if_saved(resume)
        if not resumed and self._needs_heatmaps and self.cuts is None:
            self.cuts = self._tune_cuts()
        self.crit = ISNetLoss(P=cfg.P, d=cfg.d, E=cfg.E, cuts=self.cuts, foreground=cfg.foreground)
        self._distribute(cfg.ddp)
        self._write_config()

    # -- setup ---------------------------------------------------------------------------
    _run_exists = staticmethod(run_exists)
    _seed_all = staticmethod(seed_all)

    def _refuse_existing_run(self, resume: bool, overwrite: bool) -> None:
        out = self.out
        if out is not None and not resume and not overwrite and run_exists(out):
            raise RunExistsError(f"run folder {out} already holds a run ({run_exists(out)}); continue it with "
                                 f"--resume (resume=True) or choose a new --out")

    def _seed(self) -> None:
        seed_all(self.cfg.seed)
        if self.cfg.deterministic:
            make_deterministic()

    def _build_model(self, model: nn.Module) -> None:
        """The model on the device (SyncBatchNorm when asked under torchrun), the ISNet generator
        (seeded per rank) and the ISNet around the model."""
        cfg = self.cfg
        if cfg.sync_bn and self.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed + 7919 * self.rank)
        self.net = self._isnet(self.model, "default" if cfg.lds else None, self.generator)
        self._lds_layers = self.net.lds_layers
        self.forward_model = self.model  # what the training forward calls (DDP: the wrapper)
        self.ddp = None

    def _distribute(self, ddp: bool) -> None:
        """Under torchrun: the model in DistributedDataParallel, the training forward (the ISNet's
        trace, the plain and the baseline forward) through it; the trace then sees the wrapper, so
        the LDS layer names get its ``module.`` prefix. ``ddp=False``: the manual all-reduce."""
        if self.world <= 1 or not ddp:
            return
        self.ddp = self.forward_model = _ddp.wrap_ddp(self.model, self.device)
        lds = ["module." + n for n in self._lds_layers] if self._lds_layers else None
        self.net = self._isnet(self.ddp, lds, self.generator)

    def _isnet(self, model: nn.Module, lds_layers, generator) -> ISNet:
        cfg = self.cfg
        return ISNet(model, cfg.variant, eps=cfg.eps, zb=cfg.zb, bounds=tuple(cfg.bounds),
                     selective_class=cfg.selective_class, lds_layers=lds_layers, generator=generator,
                     rules=cfg.rules)

    def _make_optimizer(self):
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adam")

    def _baseline_loss(self):
        if self.cfg.method == "isnet":
            return None
        from .baselines import make_loss
        return make_loss(self.cfg)

    def _uses_heatmaps(self) -> bool:
        P = self.cfg.P
        vals = list(P.values()) if isinstance(P, Mapping) else [P]
        return any(float(v) > 0 for v in vals)

    def _tune_cuts(self):
        """docs/spec.md §4.3 on a copy of the model (the trained model starts from its initial weights)."""
        cfg = self.cfg
        cuts = None
        if self.rank == 0:
            twin = copy.deepcopy(self.model)
            tnet = self._isnet(twin, self._lds_layers, torch.Generator(device=self.device).manual_seed(cfg.seed + 1))
            g = torch.Generator().manual_seed(cfg.seed + 2)
            loader = DataLoader(self.train_set, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                num_workers=cfg.num_workers)
            cuts = tune_cuts(tnet, loader, epochs=cfg.tune_epochs, lr=cfg.lr if cfg.optimizer == "sgd" else 1e-2,
                             momentum=cfg.momentum, clip=cfg.clip, device=self.device,
                             progress=cfg.progress and tty())
            del twin, tnet
        if self.world > 1:
            box = [cuts]
            _ddp.dist().broadcast_object_list(box, src=0)
            cuts = box[0]
        if self.out is not None and self.rank == 0:
            from .cuts import save_cuts
            save_cuts(cuts, os.path.join(self.out, "cuts.json"))
        return cuts

    def _write_config(self) -> None:
        if self.out is not None and self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.json"), "w") as f:
                json.dump({"config": self.cfg.to_dict(), "cuts": self.cuts, "world_size": self.world}, f, indent=2)

    # -- state ---------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        """The checkpoint: tensors and plain Python types only (loads with ``weights_only=True``)."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "rng": rng_states(self.generator), "cuts": self.cuts,
                "config": self.cfg.to_dict(), "history": self.history, "world_size": self.world,
                "fisnet_version": _version()}

    def save(self, path: Optional[str] = None) -> Optional[str]:
        if self.rank != 0:
            return None
        path = path or os.path.join(self.out, CHECKPOINT)
        atomic_save(self.state(), path)
        return path

    def _resume_if_saved(self, resume: bool) -> bool:
        path = os.path.join(self.out, CHECKPOINT) if self.out is not None else None
        if not (resume and path is not None and os.path.isfile(path)):
            return False
        self._load(path)
        return True

    def _check_resume_config(self, saved: Mapping, path: str) -> None:
        """A resumed run keeps its settings: every field outside RESUME_FREE must match."""
        check_resume_config(self.cfg.to_dict(), saved, int(self.epoch), path)

    def _load(self, path: str) -> None:
        ck = load_checkpoint(path, map_location=self.device)
        self.epoch = int(ck.get("epoch", 0))
        self._check_resume_config(ck.get("config") or {}, path)
        load_weights(self.model, ck["model"], path)
        self.opt.load_state_dict(ck["optimizer"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.history = list(ck.get("history") or [])
        if self.cuts is None:
            self.cuts = ck.get("cuts")
        restore_rng_states(ck.get("rng") or {}, self.generator, self.device,
                           same_world=self.world == ck.get("world_size", 1))

    # -- training ------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.amp_dtype)

    def _allreduce_grads(self):
        _ddp.allreduce_gradients(self.model, self.world)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of `epoch` (a pure function of the epoch, so resuming is exact)."""
        cfg = self.cfg
        if cfg.lr_schedule == "constant":
            return cfg.lr
        if cfg.lr_schedule == "cosine":
            floor = cfg.lr / 100.0
            return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose 'constant' or 'cosine'")

    def _loss(self, x, m, y, P: float, epoch: int) -> torch.Tensor:
        """The forward and the training loss of one batch (the criterion's ``.last`` holds its parts)."""
        with self._autocast():
            if self.loss_fn is not None:  # a baseline's loss (fisnet.baselines)
                return self.loss_fn(self.forward_model, x, y, m)
            if P > 0:
                out = self.net(x, y)
                if self.ddp is not None:  # LDS maps named as the model names its layers (and the cuts)
                    out = _ddp.unwrapped_names(out)
            else:
                out = ISNetOutput(self.forward_model(x), variant="plain")
        return self.crit(out, y, m, epoch=epoch)

    def _step(self, x, m, y, P: float, epoch: int):
        """One optimisation step; returns (the loss, the gradient norm before clipping) as device
        tensors — nothing is read back to the host here."""
        loss = self._loss(x, m, y, P, epoch)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if self.world > 1 and self.ddp is None:  # DDP averaged them during the backward
            self._allreduce_grads()
        gnorm = self._grad_norm(self.cfg.clip)  # clips when cfg.clip
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return loss.detach(), gnorm

    def _read(self, sums: StepSums, bar, t0: float, n_seen: int) -> Dict[str, float]:
        """Read the step sums (one host synchronisation): stop at the first non-finite step, update the bar."""
        totals, bad, means = sums.read()
        if bad is not None:
            self._diverged(bad, bar)
        show_interval(bar, means, n_seen * self.world / max(time.perf_counter() - t0, 1e-9))
        return totals

    def train_epoch(self) -> Dict[str, Any]:
        cfg = self.cfg
        e = self.epoch
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(e)
        P = self.crit.p_at(e) if self.loss_fn is None else 0.0
        self.sampler.set_epoch(e)
        self.forward_model.train()
        # the gradient norm is the same on every rank (all-reduced gradients), the loss is not:
        # checked on one process only, so that all ranks stop together
        sums = StepSums(self.device, check_grad=self.scaler is None, check_loss=self.world == 1)
        every = max(int(cfg.log_every or 0), 1)
        bar = progress_bar(self.loader, f"{cfg.run_name + ' ' if cfg.run_name else ''}epoch {e + 1}/{cfg.epochs}",
                           cfg.progress and self.rank == 0)
        n_seen = 0
        t0 = time.perf_counter()
        for batch in (bar if bar is not None else self.loader):
            x, m, y = to_device(batch, self.device)
            try:
                loss, gnorm = self._step(x, m, y, P, e)
            except Exception:  # e.g. NaN heatmaps after an unread bad step: report that step
                self._read(sums, bar, t0, n_seen)
                raise
            sums.add((self.loss_fn or self.crit).last, loss, gnorm)
            n_seen += x.shape[0]
            if sums.steps % every == 0:
                totals = self._read(sums, bar, t0, n_seen)
        if sums.steps % every or not sums.steps:
            totals = self._read(sums, bar, t0, n_seen)
        if bar is not None:
            bar.close()
        n_steps = sums.steps
        if self.world > 1:  # log the means over every rank's batches, not rank 0's share
            buf = _ddp.allreduce_sum(sums.totals()).tolist()
            totals = dict(sorted(zip(sums.keys, buf[:-1])))
            n_steps = int(buf[-1])
        dt = time.perf_counter() - t0
        row = {"epoch": e + 1, "P": P, "time_s": dt, "images_per_s": n_seen * self.world / max(dt, 1e-9)}
        for k, v in totals.items():
            row[f"train_{k}"] = v / max(n_steps, 1)
        if P == 0:
            row["train_background"] = row["train_foreground"] = None
        return row

    def _grad_norm(self, clip: Optional[float]) -> torch.Tensor:
        """Total gradient norm (before clipping), a device tensor; clips to ``clip`` when given."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        if clip:
            return torch.nn.utils.clip_grad_norm_(params, clip)
        if hasattr(torch.nn.utils, "get_total_norm"):
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))

    def _weights_finite(self) -> bool:
        """One host read for all the floating-point weights and buffers."""
        flags = [torch.isfinite(t).all() for t in self.model.state_dict().values()
                 if torch.is_tensor(t) and t.is_floating_point()]
        return bool(torch.stack(flags).all()) if flags else True

    def _diverged(self, where: str, bar=None) -> None:
        cfg = self.cfg
        if bar is not None:
            bar.close()
        ck = os.path.join(self.out, CHECKPOINT) if self.out is not None else None
        if ck is not None and os.path.isfile(ck):
            kept = f"the last finite checkpoint (epoch {self.epoch}) is kept at {ck}"
        else:
            kept = "no checkpoint was written" if ck is not None else "nothing was saved (no run folder)"
        hint = "lower the learning rate (--lr)" + ("" if cfg.clip else " or turn gradient clipping on (--clip 1)")
        raise TrainingDivergedError(
            f"training diverged in epoch {self.epoch + 1} ({where}; lr {self.lr_at(self.epoch):g}, gradient clipping "
            f"{('at ' + format(cfg.clip, 'g')) if cfg.clip else 'off'}): {kept}; {hint}")

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        cfg = self.cfg
        res = {}
        for name, data in self.test_sets.items():
            r = {"accuracy": evaluate(self.model, data, batch_size=cfg.eval_batch_size, device=self.device)}
            if cfg.eval_share:
                r.update(relevance_metrics(self.model, data, cfg.eps, cfg.zb, bounds=tuple(cfg.bounds),
                                           batch_size=cfg.eval_batch_size, device=self.device,
                                           max_images=cfg.eval_share_max_images, rules=cfg.rules))
            res[name] = r
        return res

    def fit(self) -> List[Dict[str, Any]]:
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            row = self.train_epoch()
            if not self._weights_finite():  # same weights on every rank: all stop together
                self._diverged("the weights are not finite at the end of the epoch")
            if self.rank == 0 and self.test_sets:
                t = time.perf_counter()
                row["test"] = self.evaluate()
                row["eval_time_s"] = time.perf_counter() - t
            self.epoch += 1
            self.history.append(row)
            if self.rank == 0:
                if cfg.verbose:
                    print(self._summary(row), flush=True)
                if self.out is not None:
                    self._write_logs()
                    self.save()
            if self.world > 1:
                _ddp.barrier()
        return self.history

    _summary = staticmethod(summary_line)

    def _write_logs(self) -> None:
        write_logs(self.out, self.history)


def _with_overrides(config: Optional[TrainConfig], overrides: Mapping[str, Any]) -> TrainConfig:
    """A copy of ``config`` (default: TrainConfig()) with keyword overrides of its fields."""
    cfg = copy.deepcopy(config) if config is not None else TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown training option {k!r}")
        setattr(cfg, k, v)
    return cfg


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except Exception:  # pragma: no cover
        return "?"


def train(model: nn.Module, train_set: Dataset, test_sets: Optional[Mapping[str, Any]] = None,
          out: Optional[str] = None, *, cuts=None, resume: bool = False, **config) -> Trainer:
    """Build a :class:`Trainer` with :class:`TrainConfig` keyword options, run it, return it."""
    tr = Trainer(model, train_set, test_sets, out, TrainConfig(**config), cuts=cuts, resume=resume)
    tr.fit()
    return tr
