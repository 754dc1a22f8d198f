"""Training loop for ISNets and plain classifiers (docs/spec.md §5): :class:`Trainer`, :func:`train`.

Defaults (docs/spec.md §5): SGD with momentum 0.9, lr 1e-2, batch 128, gradient clipping at norm 1,
P 0.7 (a float or a schedule ``{epoch: P}``), d 0.9, E 1, ε 1e-2, Zb on with [0, 1] bounds,
foreground loss "hybrid", C1/C2 from the §4.3 heuristic (``fisnet.tune_cuts``) unless given.
P = 0 for every epoch trains a plain classifier (no heatmaps are computed).

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

Multi-process (``torchrun --nproc_per_node N ...``; ``WORLD_SIZE > 1``): the trainer calls
``init_process_group`` (NCCL on CUDA, gloo on CPU), gives each rank 1/N of every global batch
(``batch_size`` is the GLOBAL batch), broadcasts the initial weights from rank 0 and, after each
backward, all-reduces the gradients and divides them by N (then clips). The model is not wrapped
in ``DistributedDataParallel``: the heatmap loss back-propagates through a double backward
(``autograd.grad(create_graph=True)`` inside the forward), which DDP's reducer hooks do not
support cleanly; averaging gradients by hand is exact and simple. With no BatchNorm, N processes
give the weights of one process on the same global batch (up to float summation order).
``sync_bn=True`` converts BatchNorm layers to ``SyncBatchNorm`` (statistics over the global
batch); note that the LRP trace then sees SyncBatchNorm's custom autograd function, whose double
backward PyTorch does not provide — use it for plain training, or keep per-rank BatchNorm.
Only rank 0 writes logs and checkpoints.

Mixed precision: ``amp=True`` on CUDA runs the forward (and the heatmaps) under
``torch.autocast`` (bfloat16 where supported, else float16 with a GradScaler); the heatmap loss
itself is computed in fp32. Ignored on CPU.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from .cuts import RelevanceStats, tune_cuts
from .loss import ISNetLoss
from .metrics import evaluate, relevance_metrics
from .variants import ISNet, ISNetOutput

__all__ = ["TrainConfig", "Trainer", "train", "load_checkpoint", "model_from_checkpoint", "atomic_save",
           "CheckpointError", "TrainingDivergedError", "RunExistsError", "resolve_device"]

CHECKPOINT = "checkpoint.pt"

# Config fields that may differ when a run is resumed (they change how it runs, not what it
# computes); every other field must equal the saved one ("epochs" may grow).
RESUME_FREE = frozenset({"epochs", "device", "num_workers", "progress", "verbose", "eval_batch_size",
                         "eval_share", "eval_share_max_images", "deterministic", "run_name", "cli"})


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded (missing, empty, truncated, or holding objects
    other than tensors and plain Python types)."""


class TrainingDivergedError(RuntimeError):
    """The loss, the gradients or the weights became NaN/inf; the last finite checkpoint is kept."""


class RunExistsError(FileExistsError):
    """The run folder already holds a run and ``resume`` was not asked for."""


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of a run (docs/spec.md §5 defaults). ``batch_size`` is the global batch."""
    epochs: int = 10
    variant: str = "selective"
    optimizer: str = "sgd"  # "sgd" | "adam"
    lr: float = 1e-2
    lr_schedule: str = "constant"  # "constant" | "cosine" (per epoch, from lr down to lr/100)
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    clip: Optional[float] = 1.0
    P: Union[float, Dict[int, float]] = 0.7
    d: float = 0.9
    E: float = 1.0
    eps: float = 1e-2
    zb: bool = True
    bounds: tuple = (0.0, 1.0)
    foreground: str = "hybrid"
    selective_class: str = "argmin"
    lds: bool = False  # LRP deep supervision on the model's default lds_layers
    tune_epochs: int = 5  # C1/C2 heuristic when no cuts are given
    seed: int = 0
    deterministic: bool = False
    amp: bool = False
    device: Optional[str] = None
    num_workers: int = 0
    sync_bn: bool = False
    eval_batch_size: int = 256
    eval_share: bool = True  # background share at every evaluation
    eval_share_max_images: Optional[int] = None
    progress: bool = True
    model_spec: Optional[Dict[str, Any]] = None  # {"name", "num_classes", "in_channels", ...} for rebuilding
    verbose: bool = True  # print one line per epoch (loss, accuracy); progress only controls the bars
    classes: Optional[List[str]] = None  # class names, label i = classes[i] (saved with the run)
    cli: Optional[Dict[str, Any]] = None  # the `fisnet train` options of the run (--resume reuses them)
    run_name: str = ""  # shown in the progress bars
    method: str = "isnet"  # "isnet" (P = 0: plain) | "rrr" (fisnet.baselines; P and the cuts are then unused)
    rrr_lambda: float = 1.0  # RRR: weight of the background input-gradient penalty

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bounds"] = list(self.bounds)
        if isinstance(self.P, Mapping):
            d["P"] = {str(k): v for k, v in self.P.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("P"), Mapping):
            kw["P"] = {int(k): float(v) for k, v in kw["P"].items()}
        if "bounds" in kw:
            kw["bounds"] = tuple(kw["bounds"])
        return cls(**kw)


# ----------------------------------------------------------------------------- helpers

def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then os.replace (atomic on POSIX)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load a fisnet checkpoint (a file or its run folder) with ``torch.load(weights_only=True)``:
    only tensors and plain Python types are unpickled, so loading can never run code. Anything else
    (a pickled object, an empty or truncated file) raises :class:`CheckpointError` naming the path."""
    path = str(path)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    import pickle
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol")  # foreign pickles: refused below
            ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain Python types, "
                              f"which could run code when unpickled ({why[:160]}). fisnet saves checkpoints that "
                              f"load without such objects; use only checkpoints written by fisnet") from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, RuntimeError) and "cuda" in msg.lower():
            raise CheckpointError(f"cannot load checkpoint {path} here: {msg}") from None
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {msg})") from None
    if not isinstance(ck, Mapping) or "model" not in ck:
        raise CheckpointError(f"{path} is not a fisnet checkpoint (no 'model' entry)")
    return ck


def model_from_checkpoint(ckpt: Union[str, Mapping], map_location="cpu") -> nn.Module:
    """Rebuild a fisnet.models backbone from a checkpoint whose config has a ``model_spec``."""
    if not isinstance(ckpt, Mapping):
        ckpt = load_checkpoint(ckpt, map_location)
    spec = dict((ckpt.get("config") or {}).get("model_spec") or {})
    if not spec:
        raise ValueError("the checkpoint has no model_spec in its config: rebuild the model yourself and "
                         "load ckpt['model']")
    from . import models
    name = spec.pop("name")
    model = models.build(name, **spec)
    model.load_state_dict(ckpt["model"])
    return model


def resolve_device(name: Optional[str]) -> torch.device:
    """``torch.device(name)``, with a clear error when CUDA is asked for but not available."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise ValueError(f"device {name!r}: this PyTorch build ({torch.__version__}) has no CUDA support; "
                             f"use --device cpu or install a CUDA build of PyTorch")
        raise ValueError(f"device {name!r}: PyTorch {torch.__version__} was built with CUDA but sees no GPU "
                         f"(driver, CUDA_VISIBLE_DEVICES?); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def _json_same(a, b) -> bool:
    return json.loads(json.dumps(a, sort_keys=True)) == json.loads(json.dumps(b, sort_keys=True))


def _dist():
    import torch.distributed as dist
    return dist


def _world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


_WATCHDOG = []


def _exit_with_launcher(poll_s: float = 1.0) -> None:
    """Under torchrun: end this worker when the launcher dies (kill -9 of torchrun otherwise leaves
    the workers running, blocked in a collective). A daemon thread polls the parent pid."""
    if _WATCHDOG or not os.environ.get("TORCHELASTIC_RUN_ID") or os.name != "posix":
        return
    import signal
    import threading
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"fisnet: rank {os.environ.get('RANK', '?')}: the torchrun launcher (pid {parent}) is gone; "
                      f"exiting", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                os._exit(143)
    t = threading.Thread(target=watch, name="fisnet-launcher-watchdog", daemon=True)
    t.start()
    _WATCHDOG.append(t)


def _flat(prefix: str, d: Mapping, out: Dict[str, Any]) -> Dict[str, Any]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _flat(key + "/", v, out)
        else:
            out[key] = v
    return out


class _Unpack:
    @staticmethod
    def batch(b):
        if isinstance(b, (list, tuple)) and len(b) >= 3:
            return b[0], b[1], b[2]
        raise ValueError("training batches must be (images, masks, labels)")


# ----------------------------------------------------------------------------- trainer

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
        cfg = copy.deepcopy(config) if config is not None else TrainConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown training option {k!r}")
            setattr(cfg, k, v)
        self.cfg = cfg
        self.out = out
        self.train_set = train_set
        self.test_sets = dict(test_sets or {})
        self.history: List[Dict[str, Any]] = []
        self.epoch = 0  # finished epochs
        self.cuts = cuts

        # distributed setup
        self.world = _world()
        self.rank = 0
        if self.world > 1:
            _exit_with_launcher()
            dist = _dist()
            if not dist.is_initialized():
                backend = "nccl" if (torch.cuda.is_available() and cfg.device != "cpu") else "gloo"
                dist.init_process_group(backend)
            self.rank = dist.get_rank()
            self.world = dist.get_world_size()
        if cfg.device is not None:
            dev = resolve_device(cfg.device)
        elif torch.cuda.is_available():
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            dev = torch.device("cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if self.world > 1 else 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        self.device = dev
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} (global) must be divisible by the number of "
                             f"processes {self.world}")

        if out is not None and not resume and not overwrite and self._run_exists(out):
            raise RunExistsError(f"run folder {out} already holds a run ({self._run_exists(out)}); continue it with "
                                 f"--resume (resume=True) or choose a new --out")

        self._seed_all(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

        if cfg.sync_bn and self.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(dev)
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(cfg.seed + 7919 * self.rank)
        lds = "default" if cfg.lds else None
        self.net = ISNet(self.model, cfg.variant, eps=cfg.eps, zb=cfg.zb, bounds=tuple(cfg.bounds),
                         selective_class=cfg.selective_class, lds_layers=lds, generator=self.generator)
        self.opt = self._make_optimizer()
        self.amp_dtype = None
        self.scaler = None
        if cfg.amp and dev.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if self.amp_dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")
        self.sampler = DistributedSampler(train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=False)
        self.loader = DataLoader(train_set, batch_size=cfg.batch_size // self.world, sampler=self.sampler,
                                 num_workers=cfg.num_workers, pin_memory=dev.type == "cuda",
                                 persistent_workers=cfg.num_workers > 0)
        if self.world > 1:  # same initial weights everywhere
            dist = _dist()
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(t.data, src=0)

        self.loss_fn = None  # a baseline's loss (fisnet.baselines) replaces the ISNet loss
        if cfg.method != "isnet":
            from .baselines import make_loss
            self.loss_fn = make_loss(cfg)
        self._needs_heatmaps = self._uses_heatmaps() and self.loss_fn is None
        resumed = False
        if resume and out is not None and os.path.isfile(os.path.join(out, CHECKPOINT)):
            self._load(os.path.join(out, CHECKPOINT))
            resumed = True
        if not resumed and self._needs_heatmaps and self.cuts is None:
            self.cuts = self._tune_cuts()
        self.crit = ISNetLoss(P=cfg.P, d=cfg.d, E=cfg.E, cuts=self.cuts, foreground=cfg.foreground)
        if out is not None and self.rank == 0:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump({"config": cfg.to_dict(), "cuts": self.cuts, "world_size": self.world}, f, indent=2)

    # -- setup ---------------------------------------------------------------------------
    @staticmethod
    def _run_exists(out: str) -> str:
        """What marks ``out`` as holding a finished epoch of a run ("" if nothing)."""
        for f in (CHECKPOINT, "log.json"):
            if os.path.isfile(os.path.join(out, f)):
                return os.path.join(out, f)
        return ""

    @staticmethod
    def _seed_all(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        torch.manual_seed(seed)

    def _make_optimizer(self):
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adam")

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
            tnet = ISNet(twin, cfg.variant, eps=cfg.eps, zb=cfg.zb, bounds=tuple(cfg.bounds),
                         selective_class=cfg.selective_class, lds_layers=self.net.lds_layers,
                         generator=torch.Generator(device=self.device).manual_seed(cfg.seed + 1))
            g = torch.Generator().manual_seed(cfg.seed + 2)
            loader = DataLoader(self.train_set, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                num_workers=cfg.num_workers)
            cuts = tune_cuts(tnet, loader, epochs=cfg.tune_epochs, lr=cfg.lr if cfg.optimizer == "sgd" else 1e-2,
                             momentum=cfg.momentum, clip=cfg.clip, device=self.device,
                             progress=cfg.progress and _tty())
            del twin, tnet
        if self.world > 1:
            box = [cuts]
            _dist().broadcast_object_list(box, src=0)
            cuts = box[0]
        if self.out is not None and self.rank == 0:
            from .cuts import save_cuts
            save_cuts(cuts, os.path.join(self.out, "cuts.json"))
        return cuts

    # -- state ---------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        """The checkpoint: tensors and plain Python types only (loads with ``weights_only=True``)."""
        name, key, pos, has_gauss, gauss = np.random.get_state()
        py_version, py_state, py_gauss = random.getstate()
        rng = {"torch": torch.get_rng_state(),
               "numpy": {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                         "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
               "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                          "gauss_next": None if py_gauss is None else float(py_gauss)},
               "isnet": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "rng": rng, "cuts": self.cuts, "config": self.cfg.to_dict(),
                "history": self.history, "world_size": self.world, "fisnet_version": _version()}

    def save(self, path: Optional[str] = None) -> Optional[str]:
        if self.rank != 0:
            return None
        path = path or os.path.join(self.out, CHECKPOINT)
        atomic_save(self.state(), path)
        return path

    def _check_resume_config(self, saved: Mapping, path: str) -> None:
        """A resumed run keeps its settings: every field outside RESUME_FREE must match."""
        cur = self.cfg.to_dict()
        for k, v in cur.items():
            if k in RESUME_FREE or k not in saved:
                continue
            if not _json_same(v, saved[k]):
                raise ValueError(f"resuming {path}: {k} = {v!r} differs from the run's saved {k} = {saved[k]!r}; "
                                 f"a resumed run keeps its settings (start a new run folder to change them)")
        done = int(self.epoch)
        if self.cfg.epochs < done:
            raise ValueError(f"resuming {path}: the run already finished {done} epochs; epochs = {self.cfg.epochs} "
                             f"cannot shorten it (give epochs >= {done})")

    def _load(self, path: str) -> None:
        ck = load_checkpoint(path, map_location=self.device)
        self.epoch = int(ck.get("epoch", 0))
        self._check_resume_config(ck.get("config") or {}, path)
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise ValueError(f"resuming {path}: its weights do not fit this model ({str(e).splitlines()[0]} ...); "
                             f"resume with the run's own model settings") from None
        self.opt.load_state_dict(ck["optimizer"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.history = list(ck.get("history") or [])
        if self.cuts is None:
            self.cuts = ck.get("cuts")
        rng = ck.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        if "numpy" in rng:
            n = rng["numpy"]
            np.random.set_state((n["name"], n["key"].cpu().numpy().astype(np.uint32), int(n["pos"]),
                                 int(n["has_gauss"]), float(n["cached_gaussian"])))
        if "python" in rng:
            p = rng["python"]
            random.setstate((int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
        if "isnet" in rng and self.world == ck.get("world_size", 1):
            self.generator.set_state(rng["isnet"].cpu() if self.device.type == "cpu" else rng["isnet"])
        if "cuda" in rng and torch.cuda.is_available():
            try:
                torch.cuda.set_rng_state_all(rng["cuda"])
            except Exception:  # a different number of GPUs
                pass

    # -- training ------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            import contextlib
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _allreduce_grads(self):
        dist = _dist()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        off = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[off:off + n].view_as(g))
            off += n

    def lr_at(self, epoch: int) -> float:
        """The learning rate of `epoch` (a pure function of the epoch, so resuming is exact)."""
        cfg = self.cfg
        if cfg.lr_schedule == "constant":
            return cfg.lr
        if cfg.lr_schedule == "cosine":
            floor = cfg.lr / 100.0
            return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose 'constant' or 'cosine'")

    def train_epoch(self) -> Dict[str, Any]:
        cfg = self.cfg
        e = self.epoch
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(e)
        P = self.crit.p_at(e) if self.loss_fn is None else 0.0
        self.sampler.set_epoch(e)
        self.model.train()
        sums = {"loss": 0.0, "ce": 0.0, "background": 0.0, "foreground": 0.0}
        n_seen, n_steps = 0, 0
        it = self.loader
        bar = None
        if cfg.progress and self.rank == 0 and _tty():  # no bars in logs (output not a terminal)
            try:
                from tqdm.auto import tqdm
                it = bar = tqdm(self.loader, desc=f"{cfg.run_name + ' ' if cfg.run_name else ''}epoch {e + 1}/{cfg.epochs}",
                                leave=False, dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                pass
        t0 = time.perf_counter()
        for batch in it:
            x, m, y = _Unpack.batch(batch)
            x = x.to(self.device, non_blocking=True)
            m = m.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self._autocast():
                if self.loss_fn is not None:  # a baseline's loss (fisnet.baselines)
                    out, loss = None, self.loss_fn(self.model, x, y, m)
                elif P > 0:
                    out = self.net(x, y)
                else:
                    out = ISNetOutput(self.model(x), variant="plain")
            if out is not None:
                loss = self.crit(out, y, m, epoch=e)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.opt)
            else:
                loss.backward()
            if self.world > 1:
                self._allreduce_grads()
            gnorm = self._grad_norm(cfg.clip)  # clips when cfg.clip
            if self.scaler is None and not math.isfinite(gnorm):
                self._diverged(f"step {n_steps + 1}: gradient norm {gnorm}, loss {float(loss.detach()):g}", bar)
            if self.world == 1 and not math.isfinite(float(loss.detach())):
                self._diverged(f"step {n_steps + 1}: loss {float(loss.detach())}", bar)
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            last = (self.loss_fn or self.crit).last
            if "rrr" in last:
                sums["rrr"] = sums.get("rrr", 0.0) + float(last["rrr"])
            sums["loss"] += float(last["loss"])
            sums["ce"] += float(last["ce"])
            if last.get("background") is not None:
                sums["background"] += float(last["background"])
                sums["foreground"] += float(last["foreground"])
            n_seen += x.shape[0]
            n_steps += 1
            if bar is not None:
                dt = time.perf_counter() - t0
                bar.set_postfix(ce=f"{float(last['ce']):.3f}",
                                bg=f"{float(last['background']):.3f}" if last.get("background") is not None else "-",
                                fg=f"{float(last['foreground']):.3f}" if last.get("foreground") is not None else "-",
                                img_s=f"{n_seen * self.world / max(dt, 1e-9):.0f}")
        if bar is not None:
            bar.close()
        if self.world > 1:  # log the means over every rank's batches, not rank 0's share
            keys = sorted(sums)
            buf = torch.tensor([sums[k] for k in keys] + [float(n_steps)], dtype=torch.float64, device=self.device)
            _dist().all_reduce(buf)
            sums = dict(zip(keys, buf[:-1].tolist()))
            n_steps = int(buf[-1].item())
        dt = time.perf_counter() - t0
        row = {"epoch": e + 1, "P": P, "time_s": dt, "images_per_s": n_seen * self.world / max(dt, 1e-9)}
        for k, v in sums.items():
            row[f"train_{k}"] = v / max(n_steps, 1)
        if P == 0:
            row["train_background"] = row["train_foreground"] = None
        return row

    def _grad_norm(self, clip: Optional[float]) -> float:
        """Total gradient norm (before clipping); clips to ``clip`` when given."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if clip:
            return float(torch.nn.utils.clip_grad_norm_(params, clip))
        if hasattr(torch.nn.utils, "get_total_norm"):
            return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values()
                   if torch.is_tensor(t) and t.is_floating_point())

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
                                           max_images=cfg.eval_share_max_images))
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
                _dist().barrier()
        return self.history

    @staticmethod
    def _summary(row) -> str:
        s = f"epoch {row['epoch']}: loss {row['train_loss']:.4f} ce {row['train_ce']:.4f}"
        if row.get("train_background") is not None:
            s += f" bg {row['train_background']:.4f} fg {row['train_foreground']:.4f}"
        s += f" | {row['images_per_s']:.0f} img/s"
        for name, r in (row.get("test") or {}).items():
            s += f" | {name} acc {100 * r['accuracy']:.1f}%"
            if "background_share" in r:
                s += f" bg {r['background_share']:.3f}"
        return s

    def _write_logs(self) -> None:
        _atomic_write_text(os.path.join(self.out, "log.json"), json.dumps(self.history, indent=2))
        rows = [_flat("", r, {}) for r in self.history]
        cols: List[str] = []
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)
        _atomic_write_text(os.path.join(self.out, "log.csv"), buf.getvalue())


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # pragma: no cover - closed or replaced stderr
        return False


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
