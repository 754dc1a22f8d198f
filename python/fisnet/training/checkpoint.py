"""Checkpoints: atomic writes, safe loads (``weights_only=True``), RNG states, the resume check."""
from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .config import RESUME_FREE, CheckpointError

CHECKPOINT = "checkpoint.pt"


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


def atomic_write_text(path: str, text: str) -> None:
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
    from .. import models
    name = spec.pop("name")
    model = models.build(name, **spec)
    model.load_state_dict(ckpt["model"])
    return model


def run_exists(out: str) -> str:
    """What marks ``out`` as holding a finished epoch of a run ("" if nothing)."""
    for f in (CHECKPOINT, "log.json"):
        if os.path.isfile(os.path.join(out, f)):
            return os.path.join(out, f)
    return ""


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- RNG states

def rng_states(generator: torch.Generator) -> Dict[str, Any]:
    """torch, CUDA, numpy, python and the ISNet ``generator`` states, as tensors and plain types."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    rng = {"torch": torch.get_rng_state(),
           "numpy": {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                     "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
           "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                      "gauss_next": None if py_gauss is None else float(py_gauss)},
           "isnet": generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng_states(rng: Mapping, generator: torch.Generator, device: torch.device,
                       same_world: bool) -> None:
    """The inverse of :func:`rng_states` (the ISNet generator only when the number of processes
    is the one the run was saved with: it is seeded per rank)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if "numpy" in rng:
        n = rng["numpy"]
        np.random.set_state((n["name"], n["key"].cpu().numpy().astype(np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached_gaussian"])))
    if "python" in rng:
        p = rng["python"]
        random.setstate((int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "isnet" in rng and same_world:
        generator.set_state(rng["isnet"].cpu() if device.type == "cpu" else rng["isnet"])
    if "cuda" in rng and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(rng["cuda"])
        except Exception:  # a different number of GPUs
            pass


# ----------------------------------------------------------------------------- resume

def _json_same(a, b) -> bool:
    return json.loads(json.dumps(a, sort_keys=True)) == json.loads(json.dumps(b, sort_keys=True))


def check_resume_config(current: Mapping, saved: Mapping, done: int, path: str) -> None:
    """A resumed run keeps its settings: every field of ``current`` (a ``TrainConfig.to_dict()``)
    outside RESUME_FREE must equal the saved one, and ``epochs`` may not fall below the ``done``
    epochs."""
    for k, v in current.items():
        if k in RESUME_FREE or k not in saved:
            continue
        if not _json_same(v, saved[k]):
            raise ValueError(f"resuming {path}: {k} = {v!r} differs from the run's saved {k} = {saved[k]!r}; "
                             f"a resumed run keeps its settings (start a new run folder to change them)")
    epochs = int(current.get("epochs", done))
    if epochs < done:
        raise ValueError(f"resuming {path}: the run already finished {done} epochs; epochs = {epochs} "
                         f"cannot shorten it (give epochs >= {done})")


def load_weights(model: nn.Module, state: Mapping, path: str) -> None:
    """``model.load_state_dict`` with a one-line error when the weights do not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"resuming {path}: its weights do not fit this model ({str(e).splitlines()[0]} ...); "
                         f"resume with the run's own model settings") from None
