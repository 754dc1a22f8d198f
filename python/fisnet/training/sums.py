"""Step losses summed on the device, read once per logging interval (no host synchronisation per
step), with the first non-finite step remembered on the device for the divergence check."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch

KEYS = ("loss", "ce", "background", "foreground")  # then any extra key of the loss (``rrr``)

_GRAD, _LOSS = 1.0, 2.0  # what made the first bad step bad


class StepSums:
    """Sums over one epoch's steps of the loss parts in a loss's ``.last`` dict (0-d tensors), kept
    on the device in float64 (the same arithmetic as summing Python floats), and the first step
    whose gradient norm (``check_grad``) or loss (``check_loss``) is not finite.

    ``add`` launches a few tiny device ops and never reads a value; ``read`` copies everything to
    the host in one transfer."""

    def __init__(self, device: torch.device, *, check_grad: bool = True, check_loss: bool = True):
        self.device = torch.device(device)
        self.check_grad, self.check_loss = check_grad, check_loss
        self.keys: List[str] = list(KEYS)
        self.present: Dict[str, bool] = {}
        self.steps = 0  # steps added (host count)
        self._sums: Optional[torch.Tensor] = None
        self._zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self._step = torch.zeros((), dtype=torch.float64, device=self.device)  # device step counter
        # [first bad step (1-based; 0 = none), _GRAD | _LOSS, its gradient norm, its loss]
        self._bad = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._read_steps = 0
        self._read_sums: Optional[List[float]] = None

    def add(self, last: Mapping, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        if self._sums is None:  # the keys of this epoch's loss
            self.keys += [k for k in last if k not in self.keys and k in ("rrr",)]
            self.present = {k: last.get(k) is not None for k in self.keys}
            self._sums = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        vals = [self._value(last.get(k)) for k in self.keys]
        self._sums += torch.stack(vals)
        self._step += 1
        self.steps += 1
        if not (self.check_grad or self.check_loss):
            return
        loss = self._value(loss)
        gnorm = self._value(grad_norm)
        bad_g = ~torch.isfinite(gnorm) if self.check_grad else torch.zeros((), dtype=torch.bool, device=self.device)
        bad_l = ~torch.isfinite(loss) if self.check_loss else torch.zeros((), dtype=torch.bool, device=self.device)
        first = (bad_g | bad_l) & (self._bad[0] == 0)
        rec = torch.stack([self._step, torch.where(bad_g, _GRAD, _LOSS).to(torch.float64), gnorm, loss])
        self._bad = torch.where(first, rec, self._bad)

    def _value(self, v) -> torch.Tensor:
        if v is None:
            return self._zero
        if torch.is_tensor(v):
            return v.detach().reshape(()).to(device=self.device, dtype=torch.float64)
        return torch.tensor(float(v), dtype=torch.float64, device=self.device)

    def read(self) -> Tuple[Dict[str, float], Optional[str], Dict[str, Optional[float]]]:
        """(sums per key, the first bad step as text or None, the means since the previous read)
        — one device-to-host copy."""
        if self._sums is None:
            host = [0.0] * len(self.keys) + self._bad.tolist()
        else:
            host = torch.cat([self._sums, self._bad]).tolist()
        n = len(self.keys)
        sums, bad = dict(zip(self.keys, host[:n])), host[n:]
        prev = self._read_sums or [0.0] * n
        k = max(self.steps - self._read_steps, 1)
        means = {key: ((host[i] - prev[i]) / k if self.present.get(key, False) else None)
                 for i, key in enumerate(self.keys)}
        self._read_steps, self._read_sums = self.steps, host[:n]
        return sums, self._bad_text(bad), means

    @staticmethod
    def _bad_text(bad: List[float]) -> Optional[str]:
        step, kind, gnorm, loss = bad
        if step == 0:
            return None
        if kind == _GRAD:
            return f"step {int(step)}: gradient norm {gnorm}, loss {loss:g}"
        return f"step {int(step)}: loss {loss}"

    def totals(self) -> torch.Tensor:
        """The device sums (float64, one per key) followed by the step count: for an all-reduce."""
        s = self._sums if self._sums is not None else torch.zeros(len(self.keys), dtype=torch.float64,
                                                                  device=self.device)
        return torch.cat([s, torch.full((1,), float(self.steps), dtype=torch.float64, device=self.device)])
