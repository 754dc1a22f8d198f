#!/usr/bin/env bash
# The first-GPU-machine suite (issue 11): build the CUDA kernels, run the CUDA tests, the kernel
# benchmark (GB/s against the measured copy bandwidth), the scaling benchmark with absolute times,
# and a ResNet-50 / DenseNet-121 ISNet step at 224 px, batch 32, fp32 and bf16 autocast; everything
# goes under one output folder, in under 8 minutes (each part has a timeout, and all parts share
# one deadline).  Without CUDA it is a quick CPU rehearsal: the build and the CUDA tests are
# skipped, the benchmarks run at tiny sizes.  See bench/README.md.
#
#   bench/gpu_suite.sh                  # output: $OUT if set, else bench/results/gpu-<date> (a temp folder without CUDA)
#   bench/gpu_suite.sh /path/to/folder
#   PYTHON=/usr/bin/python3 bench/gpu_suite.sh
#   FISNET_SUITE_BUDGET=440 (seconds, all parts but the report together)   FISNET_SUITE_BUILD=0 (use the built extension)
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUDGET="${FISNET_SUITE_BUDGET:-440}"
START=$(date +%s)

# the Python to use: $PYTHON, else the first of python3 / .venv/bin/python that imports torch
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
else
  PY=""
  for cand in python3 "$ROOT/.venv/bin/python" python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
  [ -n "$PY" ] || { echo "gpu_suite: no Python with torch found; set PYTHON=/path/to/python" >&2; exit 2; }
fi
# run from the checkout without installing: fisnet_ext from the root, fisnet from python/
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  CUDA=1; MODE="GPU"
else
  CUDA=0; MODE="CPU rehearsal (no CUDA device: build and CUDA tests skipped, tiny sizes)"
fi

# output: the argument, else $OUT, else a dated folder under bench/results (GPU) or a temp folder (rehearsal)
if [ -n "${1:-}" ]; then OUTDIR="$1"
elif [ -n "${OUT:-}" ]; then OUTDIR="$OUT"
elif [ "$CUDA" = 1 ]; then OUTDIR="$ROOT/bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)"
else OUTDIR="$(mktemp -d "${TMPDIR:-/tmp}/fisnet-gpu-suite-XXXXXX")"; fi
mkdir -p "$OUTDIR" || { echo "gpu_suite: cannot create the output folder $OUTDIR" >&2; exit 2; }
OUTDIR="$(cd "$OUTDIR" && pwd)"
SUMMARY="$OUTDIR/summary.txt"

: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
FAILED=0

# part NAME CAP_SECONDS CMD...: runs CMD with stdout+stderr to NAME.log, under min(CAP, what is left)
part() {
  local name="$1" cap="$2"; shift 2
  local now left t rc t0 t1
  now=$(date +%s); left=$((BUDGET - (now - START)))
  if [ "$left" -lt 10 ]; then say "$(printf '%-22s SKIPPED  (suite deadline reached)' "$name")"; FAILED=1; return; fi
  t=$(( cap < left ? cap : left ))
  t0=$(date +%s)
  timeout --kill-after=5 "$t" "$@" > "$OUTDIR/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  if [ $rc -eq 0 ]; then
    say "$(printf '%-22s ok       %4ss  %s' "$name" $((t1 - t0)) "$name.log")"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    say "$(printf '%-22s TIMEOUT  %4ss  (limit %ss) %s' "$name" $((t1 - t0)) "$t" "$name.log")"; FAILED=1
  else
    say "$(printf '%-22s FAILED   %4ss  (exit %s) %s' "$name" $((t1 - t0)) "$rc" "$name.log")"; FAILED=1
  fi
}
skip() { say "$(printf '%-22s skipped  (%s)' "$1" "$2")"; }

say "fisnet GPU suite: $MODE"
say "output: $OUTDIR; python: $PY; budget ${BUDGET}s; started $(date -u +%FT%TZ)"
say "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"

# 0. the machine
part info 30 bash -c '
  "$0" -c "import sys, platform, torch
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda)
try:
    import triton; print(\"triton\", triton.__version__)
except Exception as e: print(\"triton: not importable:\", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(\"gpu\", p.name, \"capability\", f\"{p.major}.{p.minor}\", \"memory GiB\", round(p.total_memory / 2**30, 1))
else:
    print(\"gpu: none\")"
  command -v nvidia-smi >/dev/null && nvidia-smi
  command -v nvcc >/dev/null && nvcc --version
  nproc; true' "$PY"

# 1. build the extension with the CUDA kernels, in place (no pip, no network)
if [ "$CUDA" = 1 ] && [ "${FISNET_SUITE_BUILD:-1}" = 1 ]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  part build 200 env FISNET_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" setup.py -q build_ext --inplace
  part backends 30 "$PY" -m fisnet_ext.info
  "$PY" -c "import fisnet_ext.ops as o, sys; sys.exit(0 if o.WITH_CUDA else 1)" >/dev/null 2>&1 \
    || say "WARNING: fisnet_ext was not built with the CUDA kernels (see build.log); the cuda backend is missing"
else
  if [ "$CUDA" = 1 ]; then skip build "FISNET_SUITE_BUILD=0"; else skip build "no CUDA device"; fi
  part backends 30 "$PY" -m fisnet_ext.info
fi

# 2. the CUDA tests: every test marked `cuda`, and the Triton launcher tests (test_launcher_* of the
#    op-family files; real GPU kernels there)
if [ "$CUDA" = 1 ]; then
  part tests-cuda 120 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m cuda tests \
    --junitxml="$OUTDIR/tests-cuda.xml"
  part tests-triton 90 "$PY" -m pytest -q -p no:cacheprovider tests/fisnet_ext/test_lrp_relu.py \
    tests/fisnet_ext/test_bn.py -k launcher --junitxml="$OUTDIR/tests-triton.xml"
else
  # rehearsal: the same selection, collected and skipped here (checks the command, not the kernels)
  part tests-cuda 90 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m cuda tests
  skip tests-triton "no CUDA device (they run under the CPU interpreter in the ordinary test suite)"
fi

# 3. kernel benchmark: GB/s and fraction of the copy bandwidth measured in the same run
if [ "$CUDA" = 1 ]; then
  part kernels 90 "$PY" bench/kernels.py --device cuda --sizes p16,p20,p24,p26,p28 --repeats 9 \
    --out "$OUTDIR/kernels.csv"
else
  part kernels 60 "$PY" bench/kernels.py --device cpu --sizes p16 --repeats 3 --out "$OUTDIR/kernels.csv"
fi

# 4. the ISNet step of large models: ResNet-50 and DenseNet-121, 224 px, batch 32, fp32 and bf16 autocast
if [ "$CUDA" = 1 ]; then
  BIG="--device cuda --size 224 --batch 32 --repeats 5 --variants plain,bare,selective,stochastic,dual,dual_slots"
  BIGCAP=75
else  # rehearsal: the same code paths at a toy size (no memory step, three variants)
  BIG="--device cpu --size 32 --batch 2 --repeats 1 --no-memory --threads 1 --variants plain,selective,dual_slots"
  BIGCAP=90
fi
for m in resnet50 densenet121; do
  for ac in none bf16; do
    # shellcheck disable=SC2086
    part "step-$m-$ac" $BIGCAP "$PY" bench/scaling.py --model $m --classes 10 $BIG --autocast $ac --out "$OUTDIR"
  done
done

# 5. the scaling benchmark with absolute times: the issue-11 settings (a) and (b), and the K sweep
if [ "$CUDA" = 1 ]; then
  part scaling-settings 60 "$PY" bench/scaling.py --device cuda --setting a,b --repeats 7 --out "$OUTDIR"
  part scaling-k 120 "$PY" bench/scaling.py --device cuda --classes 2,10,100,1000 --batch 32 --repeats 5 \
    --max-loop 100 --out "$OUTDIR"
else
  part scaling-settings 90 "$PY" bench/scaling.py --device cpu --setting a,b --batch 2 --size 16 --repeats 1 \
    --threads 1 --out "$OUTDIR"
  part scaling-k 90 "$PY" bench/scaling.py --device cpu --classes 2,3 --batch 2 --size 12 --width 4 --repeats 1 \
    --threads 1 --no-memory --out "$OUTDIR"
fi

# 5b. the ViT step as the demo runs it (plain, Selective, Selective + LDS; time and peak memory)
if [ "$CUDA" = 1 ]; then
  part vit-step 60 "$PY" bench/vit_step.py --device cuda --repeats 7 --out "$OUTDIR"
else
  part vit-step 60 "$PY" bench/vit_step.py --device cpu --batch 4 --repeats 1 --models vit_digits_stem \
    --out "$OUTDIR"
fi

# 6. one readable summary of the CSVs (always, outside the parts' budget: it takes a second)
if timeout 30 "$PY" bench/gpu_report.py "$OUTDIR" > "$OUTDIR/report.log" 2>&1; then
  say "$(printf '%-22s ok' report)"
else
  say "$(printf '%-22s FAILED   (see report.log)' report)"; FAILED=1
fi
[ -f "$OUTDIR/report.md" ] && cat "$OUTDIR/report.md"
END=$(date +%s)
say "total $((END - START))s; $( [ $FAILED = 0 ] && echo 'every part ok' || echo 'some parts FAILED or timed out (see above)' )"
exit $FAILED
