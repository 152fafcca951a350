#!/usr/bin/env bash
# Builds, tests and benchmarks ctxkern on a machine with an NVIDIA GPU inside one call of a lent device (at most
# 10 minutes a command, 15 in all): most important first (build, the CUDA and GPU-Triton correctness tests, the
# benchmarks, then the torch backend's CUDA tests), each phase under its own `timeout` and all of them under
# one deadline, each phase's results and log written to the output folder as soon as it ends, so that a run
# cut off still returns what it did. Uses the machine's own python3 and torch; needs no network.
#
#   usage: benchmarks/gpu_check.sh [OUTDIR]       OUTDIR: $OUT when set, else the argument
#   env:   GPU_CHECK_SECONDS (deadline, default 480), PYTHON (default python3), GPU_TEST_WORKERS (pytest-xdist
#          workers for the tests when xdist is installed, default 8; 0: one process), GPU_CHECK_TESTS (which
#          test phases: default "kernels torch-cuda"; "" for none), GPU_CHECK_OPS (the ops to benchmark, in
#          order; default "layer_norm attention masked_mean_pool lstm_cell lstm bert")
#
# Files in OUTDIR (6; a device call returns at most 8): summary.txt (one line per phase: exit status, wall
# seconds, limit), gpu_check.log (everything, each test's outcome as it finishes), tests-kernels.xml and
# tests-torch-cuda.xml (junit), bench.txt (the printed tables), bench.tar.gz (each op's <date>-<gpu>-<op>
# .json/.md/.png, re-packed after every op; unpack it into benchmarks/results/ to commit them).
#
# Budget for a 16-core H200 machine. Nothing here has run on a GPU yet: these are estimates from measurements
# on the 2-core x86-64 development machine (2026-12-01), which was shared and loaded (load average 10 to 15),
# so the figures scaled are its CPU seconds per job (user + sys, children included), not its wall times.
#
#   phase             limit  expected  basis
#   env                  30        5   nvidia-smi, versions
#   build               300     ~170   CPU s per compile job, one job at a time, with the build's flags:
#                                        nvcc, sm_80 + sm_90 + compute_90 PTX (the default build): attention.cu
#                                        28.5, attention_bwd.cu 46.3, layer_norm.cu 42.7, lstm_cell.cu 4.9,
#                                        masked_mean_pool.cu 5.0; sm_90 + its PTX only (this script:
#                                        CTXKERN_CUDA_ARCHS=90, the H200 is sm_90 and every CPU machine
#                                        compiles sm_80 in tests/test_cuda_compile.py): attention_bwd.cu 24.2,
#                                        layer_norm.cu 25.0 (52-59% of the three targets)
#                                        host C++ against torch's headers, -O3: ops.cpp 55.3, cuda/bindings.cpp
#                                        29.7; cpu/*.cpp for AVX-512: module 46.1 (pybind11), attention 32.0,
#                                        masked_mean_pool 28.4, lstm_cell 27.1, layer_norm 23.0; for AVX2:
#                                        attention 28.3, layer_norm 23.7 (the rest taken as alike)
#                                      The 3 extensions build one after another (see build()), all the files
#                                      of one at once (MAX_JOBS=16 >= its 5 to 7 files), so the critical path
#                                      is the sum of each extension's longest file, ops.cpp 55 + module.cpp
#                                      46 + 46 = ~150 s, plus 3 links and pip's own work
#   smoke                60       10   `ctxkern info`; the cuda and triton backends must be available
#   tests-kernels       180     ~150   `pytest -m cuda -k "not torch-cuda"`: 1047 tests at 2026-12-01, night (958
#                                      that morning; the cuda and triton backends, opcheck and torch.compile on
#                                      CUDA among them, LayerNorm's prenorm, CLIP, ELMo and the LSTM layer operators
#                                      added; `-m cuda` collects 1453, all skipped on a CPU machine). When 648 of them existed,
#                                      their cpu-backend twins (324) took 111 s here, loaded; on the GPU the
#                                      time is mostly Triton's JIT compiles: 0.26 CPU s per kernel
#                                      specialization here (tests/test_triton_compile.py, 174 compiles in
#                                      45.6 s), a few hundred specializations, over 8 xdist workers; the phase
#                                      may be cut at its limit (each test's outcome is in the log as it ends)
#   bench-<op>   150 each  ~170+120 `ctxkern bench --device cuda --no-compile --op <op>` in the order layer_norm,
#                                      attention, masked_mean_pool, lstm_cell, lstm, bert: 45 cases of 3 to 8
#                                      candidates (layer_norm 12, attention 12, masked_mean_pool 6, lstm_cell 8,
#                                      lstm 3, bert 4); ~10 s per op to start python, torch and CUDA, each
#                                      candidate ~0.3 s of do_bench (25 ms warm-up, 100 ms of runs, L2
#                                      flushed), bert's ~4 s (a call encodes 256 sentences): ~170 s before
#                                      bert, ~120 s for bert; torch.compile left out (its compiles would take
#                                      minutes)
#   tests-torch-cuda    120       40   `pytest -m cuda -k torch-cuda`: the 406 tests of the torch backend on CUDA
#
#   deadline 480 s (8 minutes): every limit is cut to what is left of it, less 15 s (10 for `timeout -k`, 5 for
#   the summary), so the call ends within 8 minutes and keeps 2 of the 10 spare. Expected: build, smoke and
#   the kernel tests in about 5.6 minutes (5 + 170 + 10 + 150 s), then the benchmarks one op at a time until the
#   deadline (about 30 s each before bert): lstm, bert and tests-torch-cuda are likely recorded as cut (exit
#   124) or skipped; a second call runs them: GPU_CHECK_TESTS=torch-cuda GPU_CHECK_OPS="lstm bert".
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-${1:-}}
if [ -z "$OUTDIR" ]; then
  echo "usage: benchmarks/gpu_check.sh OUTDIR (or set OUT)" >&2
  exit 2
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_SECONDS:-480}
WORKERS=${GPU_TEST_WORKERS:-8}
TESTS=${GPU_CHECK_TESTS-kernels torch-cuda}
OPS=${GPU_CHECK_OPS:-layer_norm attention masked_mean_pool lstm_cell lstm bert}
LOG=$OUTDIR/gpu_check.log
SUMMARY=$OUTDIR/summary.txt
BENCH_DIR=$(mktemp -d)/bench
START=$(date +%s)
: >"$LOG"
: >"$SUMMARY"
# The python's own bin folder first: ninja (parallel compiles) and pip live there.
PATH="$(dirname "$(command -v "$PY")"):$PATH"
export PATH PYTHONUNBUFFERED=1

remaining() { echo $((DEADLINE - ($(date +%s) - START))); }

# phase NAME CAP MIN CMD...: runs CMD under `timeout` (CAP seconds, or what is left of the deadline when that is
# less), its output appended to the log, and records its exit status and wall time in the summary; a phase with
# less than MIN seconds left is skipped (exit status 124 recorded, as for a phase cut off).
phase() {
  local name=$1 cap=$2 min=$3
  shift 3
  local left limit t0 rc
  left=$(( $(remaining) - 15 ))   # 10 s of grace for `timeout -k`, 5 for writing the summary
  limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt "$min" ]; then
    printf '%-22s skipped: %ss left of the %ss deadline\n' "$name" "$(remaining)" "$DEADLINE" | tee -a "$SUMMARY" "$LOG"
    return 124
  fi
  echo "== $name (limit ${limit}s, $(remaining)s left)" | tee -a "$LOG"
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1
  rc=$?
  printf '%-22s exit %-3s %4ss (limit %ss)\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" | tee -a "$SUMMARY"
  return $rc
}

env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c 'import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  "$PY" -c 'import triton; print("triton", triton.__version__)'
  "$PY" -c 'import setuptools; print("setuptools", setuptools.__version__)'
  command -v nvcc && nvcc --version | tail -n 2
  ninja --version
  nproc
}

build() {
  # sm_90 (with its PTX) only: the H200 is sm_90, and sm_80 is compiled on every CPU machine by the tests.
  # The extensions build one after another, each with ninja's parallel jobs: not at once (build_ext's
  # parallel / -j), since torch's ninja build writes every extension's build.ninja into the same build_temp.
  local t0=$(date +%s)
  CTXKERN_CUDA=1 CTXKERN_CUDA_ARCHS=90 MAX_JOBS=16 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . && return 0
  # pip itself failing fast (not a compile error): the same build, in place, importable from the tree.
  if [ $(( $(date +%s) - t0 )) -lt 60 ]; then
    echo "pip failed within a minute: building in place instead"
    [ -e ctxkern/kernels ] || ln -s ../kernels ctxkern/kernels
    CTXKERN_CUDA=1 CTXKERN_CUDA_ARCHS=90 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
    return
  fi
  return 1
}

smoke() {
  PYTHONPATH=$PWD "$PY" -m ctxkern info || return 1
  PYTHONPATH=$PWD "$PY" -c '
import ctxkern
status = ctxkern.backends()
bad = {k: v for k, v in status.items() if k in ("cuda", "triton") and v != "available"}
raise SystemExit(f"not available: {bad}" if bad else 0)'
}

pytest_cuda() {  # pytest_cuda JUNIT_NAME -k EXPR
  local junit=$1
  shift
  local args=(-m cuda -v -rfEs -p no:cacheprovider --junitxml="$OUTDIR/$junit")
  "$PY" -c 'import xdist' 2>/dev/null && [ "$WORKERS" -gt 0 ] && args+=(-n "$WORKERS")
  # A hanging test fails alone instead of eating the phase (pytest-timeout, where installed).
  "$PY" -c 'import pytest_timeout' 2>/dev/null && args+=(--timeout 90)
  PYTHONPATH=$PWD "$PY" -m pytest tests "${args[@]}" "$@"
}

bench_op() {
  PYTHONPATH=$PWD "$PY" -m ctxkern bench --device cuda --no-compile --op "$1" --out "$BENCH_DIR" \
    | tee -a "$OUTDIR/bench.txt"
  local rc=${PIPESTATUS[0]}
  # Written aside and renamed, so that a cut-off run leaves the previous op's complete archive.
  tar -czf "$OUTDIR/bench.tar.gz.part" -C "$(dirname "$BENCH_DIR")" bench \
    && mv "$OUTDIR/bench.tar.gz.part" "$OUTDIR/bench.tar.gz"
  return "$rc"
}

# The phases run under `timeout` in a child bash, which needs the functions and settings.
export -f env_info build smoke pytest_cuda bench_op
export PY OUTDIR WORKERS BENCH_DIR LOG

status=0
phase env 30 5 env_info
if ! phase build 300 60 build; then
  tail -n 60 "$LOG"
  echo "gpu_check: build failed or cut off; see $LOG" | tee -a "$SUMMARY"
  exit 1
fi
phase smoke 60 10 smoke || status=1
case " $TESTS " in
  *" kernels "*) phase tests-kernels 180 30 pytest_cuda tests-kernels.xml -k "not torch-cuda" || status=1 ;;
esac
mkdir -p "$BENCH_DIR"
for op in $OPS; do
  phase "bench-$op" 150 20 bench_op "$op" || status=1
done
case " $TESTS " in
  *" torch-cuda "*) phase tests-torch-cuda 120 20 pytest_cuda tests-torch-cuda.xml -k torch-cuda || status=1 ;;
esac
echo "gpu_check: $(( $(date +%s) - START ))s in all; exit $status (per phase above)" | tee -a "$SUMMARY"
exit $status
