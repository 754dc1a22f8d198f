"""The run's settings (:class:`TrainConfig`), what may change on resume, and the training errors."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Union

# Config fields that may differ when a run is resumed (they change how it runs, not what it
# computes); every other field must equal the saved one ("epochs" may grow).
RESUME_FREE = frozenset({"epochs", "device", "num_workers", "progress", "verbose", "eval_batch_size",
                         "eval_share", "eval_share_max_images", "deterministic", "run_name", "cli", "log_every",
                         "ddp"})


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
    # overrides of the LRP rule table, {op kind: rule name} (None: fisnet.rules.DEFAULT_RULES), used by
    # the training heatmaps, the C1/C2 tuning and the evaluation's relevance metrics
    rules: Optional[Dict[str, str]] = None
    # the step losses are summed on the device and read (one host synchronisation) every log_every
    # steps and at the end of each epoch; the divergence check and the progress bar act at those reads
    log_every: int = 50
    # under torchrun: DistributedDataParallel (bucketed all-reduce overlapping the backward); False:
    # the gradients are all-reduced by hand after the backward (the same weights, measured)
    ddp: bool = True

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bounds"] = list(self.bounds)
        if isinstance(self.P, Mapping):
            d["P"] = {str(k): v for k, v in self.P.items()}
        # {} and None both mean the default table; rule objects are saved by name
        d["rules"] = {str(k): str(getattr(v, "name", v)) for k, v in dict(self.rules or {}).items()} or None
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
