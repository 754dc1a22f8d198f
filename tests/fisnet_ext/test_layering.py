"""The two-layer rule (docs/architecture.md), checked on the source text (AST, nothing imported
from the checked files):

* python/fisnet (the method layer) reaches fisnet_ext only through its public names: those in
  ``fisnet_ext.__all__`` and the public modules `fisnet_ext.reference` and `fisnet_ext.info`;
  never a private module (``fisnet_ext.ops``, ``fisnet_ext.bn_ops``, ...) or name;
* fisnet_ext (the op layer) imports nothing from fisnet.

Checked forms: ``import fisnet_ext.X``, ``from fisnet_ext.X import ...``, ``from fisnet_ext import
name`` and attribute access ``fisnet_ext.name`` on the imported package (or an alias of it), at
any depth of the module (imports inside functions included).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fisnet_ext

ROOT = Path(__file__).resolve().parents[2]
METHOD_LAYER = ROOT / "python" / "fisnet"
OP_LAYER = ROOT / "fisnet_ext"
PUBLIC_MODULES = {"reference", "info"}
PUBLIC = set(fisnet_ext.__all__) | PUBLIC_MODULES


def _sources(folder: Path):
    files = sorted(folder.rglob("*.py"))
    assert files, f"no Python files under {folder}"
    return files


def method_layer_violations(source: str, where: str = "<source>") -> list[str]:
    """Each use of a private fisnet_ext module or name in `source`, as 'where:line: what'."""
    tree = ast.parse(source, filename=where)
    bad = []
    aliases = set()  # names bound to the fisnet_ext package itself

    def flag(node, what):
        bad.append(f"{where}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] != "fisnet_ext":
                    continue
                if len(parts) == 1:
                    aliases.add(a.asname or "fisnet_ext")
                elif parts[1] not in PUBLIC_MODULES:
                    flag(node, f"import {a.name} (a private module)")
                elif a.asname is None:
                    aliases.add("fisnet_ext")  # `import fisnet_ext.reference` binds the package
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "fisnet_ext":
                continue
            if len(parts) > 1:
                if parts[1] not in PUBLIC_MODULES:
                    flag(node, f"from {node.module} import ... (a private module)")
                continue
            for a in node.names:
                if a.name == "*":
                    continue  # a star import takes __all__: public by definition
                if a.name not in PUBLIC:
                    flag(node, f"from fisnet_ext import {a.name} (not in fisnet_ext.__all__)")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr not in PUBLIC):
            flag(node, f"{node.value.id}.{node.attr} (not in fisnet_ext.__all__)")
    return bad


def op_layer_violations(source: str, where: str = "<source>") -> list[str]:
    """Each import of fisnet (the method layer) in `source`."""
    bad = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "fisnet":
                bad.append(f"{where}:{node.lineno}: imports {name}")
    return bad


def test_method_layer_uses_only_public_fisnet_ext():
    bad = []
    for path in _sources(METHOD_LAYER):
        bad += method_layer_violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not bad, "python/fisnet reaches private parts of fisnet_ext:\n" + "\n".join(bad)


def test_op_layer_imports_nothing_of_fisnet():
    bad = []
    for path in _sources(OP_LAYER):
        bad += op_layer_violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not bad, "fisnet_ext imports the method layer:\n" + "\n".join(bad)


def test_public_names_exist():
    """Every name the rule allows is really there (a stale __all__ would let anything through)."""
    for name in fisnet_ext.__all__:
        assert hasattr(fisnet_ext, name), name
    assert "bn_heatmap_backward" in fisnet_ext.__all__


# The checks can fail: each planted line is a violation they must report.
@pytest.mark.parametrize("line", [
    "from fisnet_ext.bn_ops import bn_family",  # what traced.py did before bn_heatmap_backward
    "from fisnet_ext import ops",
    "from fisnet_ext import bn_ops as b",
    "import fisnet_ext.ops",
    "import fisnet_ext.zplus_ops as z",
    "import fisnet_ext\nfam = fisnet_ext.ops.family",
    "import fisnet_ext as fe\nfe.bn_ops.bn_family(None)",
    "def f():\n    from fisnet_ext.opgroup import check_slot_args",
])
def test_planted_private_use_is_caught(line):
    assert method_layer_violations(line), line


@pytest.mark.parametrize("line", [
    "import fisnet_ext\nfisnet_ext.lrp_relu(x)\nfisnet_ext.bn_heatmap_backward(d)",
    "from fisnet_ext import HeatmapSwitch, zplus_ratio",
    "from fisnet_ext import reference\nimport fisnet_ext.info",
    "from fisnet_ext.reference import lrp_relu_bwd",
    "import fisnet\nfisnet.ops",  # another package's attributes are not fisnet_ext's
])
def test_public_use_passes(line):
    assert method_layer_violations(line) == [], line


@pytest.mark.parametrize("line", ["import fisnet", "from fisnet.rules import DEFAULT_RULES",
                                  "def f():\n    import fisnet.lrp"])
def test_planted_method_layer_import_is_caught(line):
    assert op_layer_violations(line), line
    assert op_layer_violations("import fisnet_ext\nfrom . import ops\nfrom fisnet_ext import ops") == []
