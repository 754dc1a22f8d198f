"""Pretrained weights for the built-in backbones: ``build(name, weights=PATH)``.

The file holds a state dict with torchvision's parameter names (the backbones here use them):
``.pth`` / ``.pt`` read with ``torch.load(weights_only=True)`` (plain tensors and containers only;
a pickle that would run code is refused), or ``.safetensors`` when the ``safetensors`` package is
installed. A state dict nested under ``"state_dict"`` or ``"model"`` and a DDP ``module.`` prefix
are accepted, as are the old DenseNet names (``denselayer1.norm.1.weight``) that torchvision
still converts.

Rules:

* every tensor of the model outside its classifier must be in the file with the same shape, and
  the file must hold nothing else outside the classifier — otherwise a ``ValueError`` lists the
  missing, unexpected and mis-shaped keys (BatchNorm's ``num_batches_tracked`` may be missing:
  old torchvision files lack it);
* the classifier (``model.classifier_modules``: ``fc`` for ResNet and the small CNN,
  ``classifier`` for DenseNet and VGG) is loaded when all its tensors match; when any differs
  (another number of classes; VGG's small-image head) the whole classifier keeps its fresh
  initialisation and a ``UserWarning`` says so.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["load_weights", "read_state_dict", "WeightsReport"]

PathLike = Union[str, "os.PathLike[str]"]

_DENSENET_OLD = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


@dataclass
class WeightsReport:
    """What :func:`load_weights` did: the keys loaded, and the classifier keys re-initialised."""

    path: str
    loaded: List[str] = field(default_factory=list)
    reinitialised: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)  # classifier keys of the file not in the model


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file, on the CPU, keyed by torchvision-style names."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"weights file {p!r} does not exist")
    if p.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{p}: reading .safetensors files needs the safetensors package "
                              f"(pip install safetensors), or convert the file to a .pth state dict") from None
        obj = load_file(p, device="cpu")
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{p}: not a plain state dict that torch.load(weights_only=True) accepts ({first[:300]}). "
                f"fisnet never unpickles code: save the weights with torch.save(model.state_dict(), path)") from None
    return _as_state_dict(obj, p)


def _as_state_dict(obj, where: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{where}: expected a state dict (a mapping from parameter names to tensors), "
                         f"got {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: entries that are not tensors: {', '.join(bad[:10])}"
                         + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        m = _DENSENET_OLD.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _in_head(key: str, heads: Sequence[str]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in heads)


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _listing(title: str, items: List[str], limit: int = 12) -> str:
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more


def load_weights(model: nn.Module, weights: Union[PathLike, Mapping[str, torch.Tensor]],
                 classifier: Sequence[str] = None, *, stacklevel: int = 2) -> WeightsReport:
    """Load a torchvision-format state dict (a file path, or a mapping) into `model` in place.

    `classifier`: module names of the classifier (default ``model.classifier_modules``); see the
    module docstring for the rules. Returns a :class:`WeightsReport`."""
    if isinstance(weights, Mapping):
        where = "state dict"
        sd = _as_state_dict(weights, where)
    else:
        where = os.fspath(weights)
        sd = read_state_dict(weights)
    heads = tuple(classifier if classifier is not None else getattr(model, "classifier_modules", ()))
    own = model.state_dict()

    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mis_shaped = [k for k in sd if k in own and _shape(sd[k]) != _shape(own[k])]
    body_errors = ([k for k in missing if not _in_head(k, heads)],
                   [k for k in unexpected if not _in_head(k, heads)],
                   [k for k in mis_shaped if not _in_head(k, heads)])
    if any(body_errors):
        miss, unexp, shaped = body_errors
        parts = []
        if miss:
            parts.append(_listing("missing from the file", miss))
        if unexp:
            parts.append(_listing("in the file but not in the model", unexp))
        if shaped:
            parts.append(_listing("different shapes (file vs model)",
                                  [f"{k} {list(_shape(sd[k]))} vs {list(_shape(own[k]))}" for k in shaped]))
        raise ValueError(f"{where} does not fit {type(model).__name__}: " + "; ".join(parts)
                         + ". Build the model with the settings the weights were trained with "
                           "(in_channels, small_input, width, batchnorm, hidden) and torchvision's names.")

    head_keys = [k for k in own if _in_head(k, heads)]
    head_fits = not any(_in_head(k, heads) for k in missing + mis_shaped)
    report = WeightsReport(path=where)
    report.ignored = [k for k in unexpected if _in_head(k, heads)]
    new_sd = dict(own)
    for k, v in sd.items():
        if k not in own:
            continue
        if _in_head(k, heads) and not head_fits:
            continue
        new_sd[k] = v
        report.loaded.append(k)
    if not head_fits:
        report.reinitialised = head_keys
        diffs = [f"{k} {list(_shape(sd[k]))} in the file, {list(_shape(own[k]))} in the model"
                 for k in head_keys if k in sd and _shape(sd[k]) != _shape(own[k])]
        absent = [k for k in head_keys if k not in sd]
        why = "; ".join(diffs + ([f"not in the file: {', '.join(absent)}"] if absent else []))
        warnings.warn(f"{where}: classifier ({', '.join(heads)}) re-initialised, not loaded: {why}",
                      UserWarning, stacklevel=stacklevel)
    with torch.no_grad():
        model.load_state_dict(new_sd, strict=True)
    return report


def with_weights(model: nn.Module, weights) -> nn.Module:
    """`model` with `weights` loaded (see :func:`load_weights`); unchanged when `weights` is None."""
    if weights is not None:
        load_weights(model, weights, stacklevel=4)  # the warning points at the builder's caller
    return model
