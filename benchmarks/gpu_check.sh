#!/usr/bin/env bash
# Run on a machine with an NVIDIA GPU: build the CUDA extension, run the whole test suite (CUDA and GPU
# Triton tests included), run `ctxkern bench --device cuda`, and write the results to benchmarks/results/
# (and to OUTDIR when given). Uses the machine's own python3 and torch; needs no network.
#   usage: benchmarks/gpu_check.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-}
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
stamp="$(date +%F)-$("$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()))')"
log="$RESULTS/$stamp-check.log"

{
  echo "== nvidia-smi"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "== build (CTXKERN_CUDA=1)"
} | tee "$log"
export CTXKERN_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >>"$log" 2>&1; then
  tail -n 60 "$log"; echo "gpu_check: build failed" | tee -a "$log"; exit 1
fi
"$PY" -m ctxkern info | tee -a "$log"

echo "== tests" | tee -a "$log"
"$PY" -m pytest tests -q -rfEs -p no:cacheprovider 2>&1 | tee -a "$log"
test_rc=${PIPESTATUS[0]}

echo "== bench" | tee -a "$log"
"$PY" -m ctxkern bench --device cuda --out "$RESULTS" 2>&1 | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

if [ -n "$OUTDIR" ]; then
  mkdir -p "$OUTDIR" && cp "$RESULTS/$stamp"* "$OUTDIR"/
fi
echo "gpu_check: tests exit $test_rc, bench exit $bench_rc" | tee -a "$log"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
