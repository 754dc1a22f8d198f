"""Every op family has its test file, and its test class climbs the whole ladder (tests/README.md).

An op family is a kernel file csrc/cuda/<family>.cu or fisnet_ext/triton/<family>.py; its tests
are tests/fisnet_ext/test_<family>.py with one class Test*.  Checked on the test class's source:
a reference comparison with poisoned outputs, fp64 gradcheck and gradgradcheck, opcheck, vmap,
and the (family, device) cases reaching Triton under the interpreter and CUDA.  A new family
without these fails here, naming what is missing.
"""
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def families():
    cu = {p.stem for p in (ROOT / "csrc" / "cuda").glob("*.cu")}
    tr = {p.stem for p in (ROOT / "fisnet_ext" / "triton").glob("*.py") if not p.stem.startswith("_")}
    return sorted(cu | tr)


# what the source of a family's test class must contain, per rung
RUNGS = {
    "reference comparison": ["reference."],
    "poisoned outputs": ["poisoned("],
    "fp64 gradcheck": ["gradcheck(", "torch.float64"],
    "gradgradcheck": ["gradgradcheck("],
    "opcheck": ["torch.library.opcheck("],
    "vmap": ["vmap("],
}


def test_there_are_families():
    assert {"lrp_relu", "zplus", "bn", "act"} <= set(families())


@pytest.mark.parametrize("family", families())
def test_family_climbs_the_ladder(family):
    path = HERE / f"test_{family}.py"
    assert path.exists(), f"op family {family!r} has no tests/fisnet_ext/test_{family}.py"
    mod = importlib.import_module(f"tests.fisnet_ext.test_{family}")
    classes = [c for n, c in vars(mod).items()
               if n.startswith("Test") and inspect.isclass(c) and c.__module__ == mod.__name__]
    assert len(classes) == 1, f"test_{family}.py: one test class per op family, found {[c.__name__ for c in classes]}"
    src = inspect.getsource(classes[0])
    missing = [rung for rung, needles in RUNGS.items() if not all(n in src for n in needles)]
    assert not missing, f"{classes[0].__name__} lacks rungs of the ladder: {missing}"
    # the backends: Triton under the interpreter and the CUDA cases, as parameters of its tests
    ids = {getattr(p, "id", None) for m in vars(classes[0]).values() if callable(m)
           for mark in getattr(m, "pytestmark", []) if mark.name == "parametrize"
           for p in (mark.args[1] if len(mark.args) > 1 else [])}
    assert any(i and "triton" in i and "cuda" not in i for i in ids), f"{family}: no Triton-interpreter case"
    assert any(i and "cuda" in i for i in ids), f"{family}: no CUDA case"
