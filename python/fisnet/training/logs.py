"""What a run reports: ``log.json`` / ``log.csv`` in the run folder, the one-line epoch summary,
the progress bar (only when stderr is a terminal)."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Any, Dict, List, Mapping

from .checkpoint import atomic_write_text


def tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # pragma: no cover - closed or replaced stderr
        return False


def flat(prefix: str, d: Mapping, out: Dict[str, Any]) -> Dict[str, Any]:
    """{"test": {"a": {"accuracy": 1}}} -> {"test/a/accuracy": 1}."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat(key + "/", v, out)
        else:
            out[key] = v
    return out


def summary_line(row: Mapping) -> str:
    """``epoch E: loss ... ce ... [bg ... fg ...] | N img/s | <test> acc A% bg S ...``."""
    s = f"epoch {row['epoch']}: loss {row['train_loss']:.4f} ce {row['train_ce']:.4f}"
    if row.get("train_background") is not None:
        s += f" bg {row['train_background']:.4f} fg {row['train_foreground']:.4f}"
    s += f" | {row['images_per_s']:.0f} img/s"
    for name, r in (row.get("test") or {}).items():
        s += f" | {name} acc {100 * r['accuracy']:.1f}%"
        if "background_share" in r:
            s += f" bg {r['background_share']:.3f}"
    return s


def write_logs(out: str, history: List[Mapping]) -> None:
    """``out/log.json`` (the rows) and ``out/log.csv`` (flattened; a column per key seen), atomically."""
    atomic_write_text(os.path.join(out, "log.json"), json.dumps(history, indent=2))
    rows = [flat("", r, {}) for r in history]
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
    atomic_write_text(os.path.join(out, "log.csv"), buf.getvalue())


def progress_bar(iterable, desc: str, show: bool):
    """A tqdm bar over ``iterable`` when ``show`` and stderr is a terminal (no bars in log files), else None."""
    if not (show and tty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def show_interval(bar, means: Mapping[str, float], images_per_s: float) -> None:
    """The bar's postfix at a read of the step sums: the interval's mean ce/bg/fg and images/s."""
    if bar is None:
        return
    bar.set_postfix(ce=f"{means['ce']:.3f}",
                    bg=f"{means['background']:.3f}" if means.get("background") is not None else "-",
                    fg=f"{means['foreground']:.3f}" if means.get("foreground") is not None else "-",
                    img_s=f"{images_per_s:.0f}")
