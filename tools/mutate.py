#!/usr/bin/env python3
"""Mutation testing for the method layer (python/fisnet), by hand before a release.

Each mutant is one single-line change a developer could make by mistake (a sign, a bound, an
inverted mask, a dropped stabiliser). For every mutant the script copies python/fisnet to a
temporary folder, applies that one change there, and runs a quick test subset with PYTHONPATH
pointing at the copy (so `import fisnet` loads the mutant; fisnet_ext still comes from the
installed package). A mutant is *killed* when the tests fail, *survived* when they pass.
The working tree is never written to (no bytecode, no pytest cache).

    python tools/mutate.py                       # every mutant, the default test subset
    python tools/mutate.py --list                # the mutants, and whether each still applies
    python tools/mutate.py --only zb-sign0,eta-eps --tests tests/fisnet/test_mutants.py --all-failures

While others edit the tree, `--rev HEAD` mutates and tests the committed sources instead (the
compiled extension still comes from the working tree).

A mutant whose original text no longer occurs exactly once in its file (the code changed) is
reported as STALE and left out of the score: update its text here. Exit status: 0 when every
applicable mutant was killed, 1 otherwise, 2 on a usage error or when the tests fail without
a mutant (the baseline run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "fisnet"

# the quick subset: closed forms, invariants, variants, the loss, and the mutant killers
DEFAULT_TESTS = ["tests/fisnet/test_mutants.py", "tests/fisnet/test_zplus_signed.py", "tests/fisnet/test_loss.py",
                 "tests/fisnet/test_lrp.py", "tests/fisnet/test_rules_zb.py", "tests/fisnet/test_rules_attention.py",
                 "tests/fisnet/test_variants.py"]
# ...less the slow ones (each over 20 s on the 2-core VM under load): every backbone x variant,
# the ResNet-18 two-slot pass, the end-to-end gradgradcheck, the tune-cuts training
DEFAULT_KEYWORD = ("not every_variant_on_every_backbone and not resnet18 and not gradgradcheck_through_explain "
                   "and not tune_cuts_and_save_load")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to python/fisnet
    old: str  # must occur exactly once in the file
    new: str
    why: str


MUTANTS: List[Mutant] = [
    # rules.py — Zb (docs/spec.md §2.1) and BatchNorm folding
    # zb_relevance as one op (the first implementation, _zb_relevance_reference, is the tests' oracle)
    Mutant("zb-stabiliser", "rules.py",
           "return torch.where(z >= 0, e, -e).add_(z)",
           "return z + e",
           "Zb stabiliser ε·sign(z) replaced by +ε"),
    Mutant("zb-sign0", "rules.py",
           "return torch.where(z >= 0, e, -e).add_(z)",
           "return torch.where(z > 0, e, -e).add_(z)",
           "Zb: sign(0) := −1"),
    Mutant("zb-bounds-swapped", "rules.py",
           "for v in [a] + [img for img, _ in kept]], dim=2)",
           "for v in [a] + [img for img, _ in kept][::-1]], dim=2)",
           "Zb: l and h swapped in the backward (conv layers)"),
    Mutant("zb-bound-term-grad-sign", "rules.py",
           "gcs = [-gz.sum_to_size(shape) if need and gz is not None else None",
           "gcs = [gz.sum_to_size(shape) if need and gz is not None else None",
           "Zb: the bound terms' gradient (ZbRatio's c) with the wrong sign"),
    Mutant("bn-batch-var-grad", "rules.py",
           "a = torch.zeros_like(mean) if g_var is None else g_var.reshape(-1) * (2.0 / n)",
           "a = torch.zeros_like(mean) if g_var is None else g_var.reshape(-1) * (1.0 / n)",
           "folded BatchNorm (TracedBatchNorm's statistics, _BatchStats): the batch variance's derivative "
           "without its factor 2"),
    Mutant("scaled-part-weight-grad", "rules.py",
           "return (g.mul_(s) if ctx.needs_input_grad[0] else None), gs, None",
           "return (g if ctx.needs_input_grad[0] else None), gs, None",
           "z⁺ folded weight parts: W's gradient without the BatchNorm scale"),
    Mutant("bn-fold-mean-sign", "rules.py",
           "b = (b - mean) * scale",
           "b = (b + mean) * scale",
           "BatchNorm folding: bias b' = γ(b + μ)/σ + β"),
    # variants.py — what is explained (docs/spec.md §3)
    Mutant("eta-eps", "variants.py",
           "return torch.log(p + eps_s) - torch.log(1.0 - p + eps_s)",
           "return torch.log(p + eps_s) - torch.log(1.0 - p)",
           "Selective η without ε_s in log(1 − p)"),
    Mutant("stochastic-other-may-be-base", "variants.py",
           "other = (base + 1 + torch.randint(0, K - 1, (B,), device=dev, generator=generator)) % K",
           "other = (base + torch.randint(0, K - 1, (B,), device=dev, generator=generator)) % K",
           "Stochastic: the 'other' class may be the base class"),
    Mutant("stochastic-always-base", "variants.py",
           "keep = torch.rand(B, device=dev, generator=generator) < 0.5",
           "keep = torch.rand(B, device=dev, generator=generator) < 1.0",
           "Stochastic: the base class always"),
    # metrics.py
    Mutant("share-mask-inverted", "metrics.py",
           "bg = 1.0 - (m[:, 0] > 0.5).double()",
           "bg = (m[:, 0] > 0.5).double()",
           "background_share with the mask inverted"),
    Mutant("accuracy-inverted", "metrics.py",
           "correct += int((pred == y).sum())",
           "correct += int((pred != y).sum())",
           "evaluate counts the errors"),
    # loss.py (docs/spec.md §4)
    Mutant("loss-low-side", "loss.py",
           "l_lo = ((Fsum / c1).clamp(max=1.0) - 1.0) ** 2",
           "l_lo = ((Fsum / c2).clamp(max=1.0) - 1.0) ** 2",
           "foreground low side against C2 instead of C1"),
    Mutant("loss-hybrid-offset", "loss.py",
           "l_hi = torch.where(Fsum <= c1 + c2, l_hi, (Fsum - c1 - c2) + 1.0)",
           "l_hi = torch.where(Fsum <= c1 + c2, l_hi, (Fsum - c1 - c2))",
           "hybrid high side without the +1 (discontinuous)"),
    Mutant("loss-bg-log", "loss.py",
           "l_bg = torch.log1p(g / E).mean(dim=(1, 2))",
           "l_bg = torch.log1p(g * E).mean(dim=(1, 2))",
           "background term log(1 + g·E)"),
    Mutant("gwrp-norm", "loss.py",
           "norm = (1.0 - d ** n) / (1.0 - d)",
           "norm = (1.0 - d ** (n - 1)) / (1.0 - d)",
           "GWRP normaliser one term short"),
    # cuts.py (docs/spec.md §4.3)
    Mutant("cuts-c1-min", "cuts.py",
           "c1 = max(mu / 5.0, mu - 3.0 * sd)",
           "c1 = min(mu / 5.0, mu - 3.0 * sd)",
           "C1 = min(μ/5, μ − 3σ)"),
    Mutant("cuts-c2-max", "cuts.py",
           "c2 = min(25.0 * c1, mu + 3.0 * sd)",
           "c2 = max(25.0 * c1, mu + 3.0 * sd)",
           "C2 = max(25·C1, μ + 3σ)"),
    # zplus.py (docs/spec.md §3.1)
    Mutant("zplus-numerator", "zplus.py",
           "    num = zp if rec.is_logits else z.to(dt)\n",
           "    num = z.to(dt) if rec.is_logits else zp\n",
           "z⁺ (non-negative inputs): numerators of the classifier and the hidden layers swapped"),
    Mutant("zplus-signed-negative-dropped", "zplus.py",
           "sn = fisnet_ext.zplus_ratio(g, out.clamp(max=0), zn.neg(), eps).neg()",
           "sn = torch.zeros_like(sp)",
           "sign-matched z⁺: outputs z < 0 give no relevance (positive contributions only)"),
    Mutant("zplus-split-sign", "lrp.py",
           "keep = ((a > 0) if ctx.positive else (a < 0)).to(g.dtype)",
           "keep = ((a < 0) if ctx.positive else (a > 0)).to(g.dtype)",
           "sign-matched z⁺ at pooling/attention/bias adds: the two input signs swapped"),
    # lrp.py
    Mutant("attention-hand-not-held", "lrp.py",
           "            if rule == \"cp\":\n                a = self._hold(a)",
           "            if rule == \"held\":\n                a = self._hold(a)",
           "attention written by hand: cp does not hold A (q and k get relevance)"),
    Mutant("attention-hand-misuse-accepted", "lrp.py",
           "            if not one_linear or func in MATMUL_FUNCS:",
           "            if False:",
           "attention written by hand: other uses of the scores q kᵀ accepted as linear"),
    Mutant("zplus-relu-stands-in-unchecked", "lrp.py",
           "and stage not in rec.read and not rec.branch \\\n",
           "\\\n",
           "z⁺ copy-on-write: an in-place ReLU's output stands in for a layer output read before it"),
    Mutant("nonneg-version-unchecked", "lrp.py",
           "return r is not None and r[0]() is t and t._version == r[1]",
           "return r is not None and r[0]() is t",
           "Dual trace: a ReLU output changed in place afterwards still taken as ≥ 0"),
    Mutant("eps-negative-accepted", "lrp.py",
           "if not eps >= 0:",
           "if not eps >= -1:",
           "trace accepts a negative ε"),
    Mutant("relevance-without-input", "lrp.py",
           "out[name] = a.unsqueeze(1) * g",
           "out[name] = g",
           "relevance R = G instead of a ⊙ G"),
]


def _source_root(rev: Optional[str]):
    return PACKAGE if rev is None else rev


def _read(root, file: str) -> Optional[str]:
    if isinstance(root, Path):
        p = root / file
        return p.read_text(encoding="utf-8") if p.is_file() else None
    r = subprocess.run(["git", "-C", str(ROOT), "show", f"{root}:python/fisnet/{file}"], capture_output=True)
    return r.stdout.decode("utf-8") if r.returncode == 0 else None


def applies(m: Mutant, root=PACKAGE) -> Optional[str]:
    """None when `m.old` occurs exactly once in its file (in the folder `root`, or at the git
    revision `root`), else the reason it does not apply."""
    text = _read(root, m.file)
    if text is None:
        return f"{m.file} does not exist"
    n = text.count(m.old)
    return None if n == 1 else f"its text occurs {n} times in {m.file} (expected once)"


def _prepare(tmp: str, rev: Optional[str]):
    """Copy the sources into `tmp`: (folder of the fisnet copy, PYTHONPATH entries, folder to run in).

    Working tree (rev None): python/fisnet only; the tests run from the working tree.
    A git revision: python/fisnet, fisnet_ext, tests and pyproject.toml as committed at `rev`
    (`git archive`), plus the compiled fisnet_ext/_C*.so of the working tree; the tests run from
    the copy. Use it while others edit the tree (a half-written file anywhere breaks every run)."""
    if rev is None:
        copy = Path(tmp) / "fisnet"
        shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
        return copy, [tmp], ROOT
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "python/fisnet", "fisnet_ext",
                           "tests", "pyproject.toml"], capture_output=True)
    if arch.returncode != 0:
        raise RuntimeError(f"git archive {rev}: {arch.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", tmp], input=arch.stdout, check=True)
    for so in (ROOT / "fisnet_ext").glob("_C*.so"):
        shutil.copy2(so, Path(tmp) / "fisnet_ext" / so.name)
    return Path(tmp) / "python" / "fisnet", [str(Path(tmp) / "python"), tmp], Path(tmp)


def run_one(m: Optional[Mutant], tests: List[str], timeout: float, python: str, keep_going: bool = False,
            keyword: str = "", rev: Optional[str] = None):
    """('killed' | 'survived' | 'timeout', [failed test ids]) for mutant `m` (None: the sources as
    they are, the baseline); a timeout counts as killed."""
    with tempfile.TemporaryDirectory(prefix="fisnet-mutant-") as tmp:
        copy, paths, cwd = _prepare(tmp, rev)
        if m is not None:
            path = copy / m.file
            text = path.read_text(encoding="utf-8")
            if text.count(m.old) != 1:
                return "stale", []
            path.write_text(text.replace(m.old, m.new, 1), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
                   PYTHONDONTWRITEBYTECODE="1")
        check = subprocess.run([python, "-c", "import fisnet, sys; sys.stdout.write(fisnet.__file__)"],
                               env=env, cwd=tmp, capture_output=True, text=True)
        if not check.stdout.startswith(str(copy)):
            raise RuntimeError(f"`import fisnet` does not load the copy in {copy}: {check.stdout!r} "
                               f"{check.stderr.strip()[-400:]}")
        cmd = [python, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *([] if keep_going else ["-x"]),
               *(["-k", keyword] if keyword else []), *tests]
        try:
            r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", []
        failed = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
        if r.returncode != 0 and not failed:
            failed = [ln for ln in (r.stdout + r.stderr).strip().splitlines()[-3:]]
        return ("survived" if r.returncode == 0 else "killed"), failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", help=f"comma-separated test paths (default {','.join(DEFAULT_TESTS)})")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression (default: the slow tests left out when "
                                               "--tests is not given, none otherwise)")
    ap.add_argument("--only", help="comma-separated mutant names")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant run (default 900)")
    ap.add_argument("--python", default=sys.executable, help="interpreter with fisnet_ext installed")
    ap.add_argument("--rev", help="mutate the sources and run the tests as committed at this git revision "
                                   "(e.g. HEAD) instead of the working tree")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--all-failures", action="store_true",
                    help="run every test for each mutant (no -x) and list all that fail")
    args = ap.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        known = {m.name for m in MUTANTS}
        bad = [w for w in wanted if w not in known]
        if bad:
            print(f"mutate: unknown mutant(s) {bad}; --list shows the names", file=sys.stderr)
            return 2
        mutants = [m for m in MUTANTS if m.name in wanted]
    if args.list:
        for m in mutants:
            why = applies(m, _source_root(args.rev))
            print(f"{m.name:<30} {m.file:<12} {'STALE: ' + why if why else m.why}")
        return 0
    tests = [t.strip() for t in (args.tests.split(",") if args.tests else DEFAULT_TESTS) if t.strip()]
    missing = [t for t in tests if not (ROOT / t.split("::")[0]).exists()] if args.rev is None else []
    if missing:
        print(f"mutate: test path(s) not found: {missing}; pass --tests", file=sys.stderr)
        return 2

    keyword = args.keyword if args.keyword is not None else ("" if args.tests else DEFAULT_KEYWORD)

    t0 = time.time()
    if not args.no_baseline:
        res, failed = run_one(None, tests, args.timeout, args.python, True, keyword, args.rev)  # list every failure
        if res != "survived":
            print(f"mutate: the tests fail WITHOUT a mutant ({res}); fix them first (or use --rev HEAD while "
                  f"others edit the tree):", file=sys.stderr)
            for f in failed:
                print(f"  {f}", file=sys.stderr)
            return 2
        print(f"baseline: the unmutated sources pass ({time.time() - t0:.0f} s)", flush=True)
    killed = survived = stale = 0
    for m in mutants:
        why = applies(m, _source_root(args.rev))
        if why:
            stale += 1
            print(f"STALE     {m.name:<30} {why}", flush=True)
            continue
        t1 = time.time()
        res, failed = run_one(m, tests, args.timeout, args.python, args.all_failures, keyword, args.rev)
        if res == "survived":
            survived += 1
        else:
            killed += 1
        print(f"{res.upper():<9} {m.name:<30} {m.why}  ({time.time() - t1:.0f} s)", flush=True)
        for f in failed:
            print(f"          failed: {f}", flush=True)
    total = killed + survived
    print(f"\nmutation score: {killed}/{total} killed"
          + (f", {stale} stale (not run)" if stale else "")
          + f"; tests: {' '.join(tests)}" + (f" -k {keyword!r}" if keyword else "")
          + f"; {time.time() - t0:.0f} s")
    return 0 if survived == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
