#!/usr/bin/env bash
# The benchmark run for a CUDA machine: `adt bench` in every configuration, each
# with its own time limit, full logs and JSON reports in the output folder, a short
# table last.
#
# Building the GPU binary (on an x86_64 Linux machine with Rust, not on the GPU
# machine):
#
#   scripts/gpu_bench.sh build
#
# which runs `source scripts/env.sh && ADT_CUDA_LINK=1 cargo build --release
# --features cuda` after making sure the CUDA runtime headers that the C++ shim
# (csrc/cuda_shim.cpp) compiles against are present in the project's libtorch
# install (pip packages nvidia-cuda-runtime and nvidia-cuda-crt, headers only: the
# shim calls no CUDA runtime function itself). The binary links libtorch_cuda with
# --no-as-needed and --allow-shlib-undefined, so it links here without the CUDA
# libraries and finds the GPU there. It checks that the result references
# libtorch_cuda.so.
#
# The build writes the GPU binary to target/gpu/adt (a later CPU build does not
# overwrite it); copy the working tree with it to the CUDA machine.
#
# Running on the CUDA machine (no Rust, no network; PyTorch 2.11 installed):
#
#   scripts/gpu_bench.sh run [--out DIR] [--time-limit SECONDS]
#
# --out: the output folder (default bench-out/); --time-limit: stop starting runs once
# the whole benchmark has used this many seconds, and clip each run's own limit to what
# is left (default: no overall limit). Environment: ADT_BIN (default target/gpu/adt if
# present, else target/release/adt), TORCH_DIR (default the torch package of the
# machine's python3), BENCH_TIMEOUT_SCALE (multiplies every per-run time limit, default
# 1), BENCH_ONLY (space-separated names of the runs to do, default all: probe unet
# sample adt memory sd3 tiny).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="${1:-run}"

if [ "$MODE" = "build" ]; then
  set -e
  cd "$ROOT"
  # shellcheck source=/dev/null
  source scripts/env.sh
  inc="$(ls -d "$LIBTORCH"/../nvidia/cu1*/include 2>/dev/null | head -n1 || true)"
  if [ -z "${ADT_CUDA_INCLUDE:-}" ] && { [ -z "$inc" ] || [ ! -f "$inc/crt/host_defines.h" ]; }; then
    py="$(ls "$LIBTORCH"/../../../../bin/python 2>/dev/null | head -n1 || true)"
    [ -n "$py" ] || { echo "gpu_bench build: no python next to $LIBTORCH to install the CUDA headers" >&2; exit 1; }
    echo "gpu_bench build: installing the CUDA runtime headers (nvidia-cuda-crt) into the libtorch venv" >&2
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
  fi
  ADT_CUDA_LINK=1 cargo build --release --features cuda
  bin="$ROOT/target/release/adt"
  if ! readelf -d "$bin" | grep -q 'libtorch_cuda.so'; then
    echo "gpu_bench build: $bin does not reference libtorch_cuda.so" >&2
    exit 1
  fi
  # A later CPU build would overwrite target/release/adt: keep the GPU binary apart.
  mkdir -p "$ROOT/target/gpu"
  cp "$bin" "$ROOT/target/gpu/adt"
  echo "built target/gpu/adt ($(du -h "$bin" | cut -f1)); copy it with the working tree to the CUDA machine"
  exit 0
fi

if [ "$MODE" != "run" ]; then
  echo "usage: scripts/gpu_bench.sh build | run [--out DIR] [--time-limit SECONDS]" >&2
  exit 2
fi
shift || true
OUT="$ROOT/bench-out"
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --time-limit) BUDGET="$2"; shift 2 ;;
    *) echo "gpu_bench: unknown option $1 (--out DIR, --time-limit SECONDS)" >&2; exit 2 ;;
  esac
done

cd "$ROOT"
if [ -z "${ADT_BIN:-}" ]; then
  ADT_BIN="$ROOT/target/release/adt"
  [ -x "$ROOT/target/gpu/adt" ] && ADT_BIN="$ROOT/target/gpu/adt"
fi
TORCH_DIR="${TORCH_DIR:-$(python3 -c "import os, torch; print(os.path.dirname(torch.__file__))" 2>/dev/null)}"
SCALE="${BENCH_TIMEOUT_SCALE:-1}"
ONLY="${BENCH_ONLY:-probe unet sample adt memory sd3 tiny}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUST_LOG="${RUST_LOG:-info}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

[ -x "$ADT_BIN" ] || { echo "gpu_bench: no binary at $ADT_BIN (build it with scripts/gpu_bench.sh build)" >&2; exit 1; }
[ -d "$TORCH_DIR/lib" ] || { echo "gpu_bench: no libtorch at $TORCH_DIR" >&2; exit 1; }

{
  echo "== machine"
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  echo "binary: $ADT_BIN"
  echo "libtorch: $TORCH_DIR"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

wanted() { case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run NAME LIMIT_SECONDS ARGS...: one bench invocation with a time limit, clipped
# to what is left of --time-limit when one is given.
START=$SECONDS
run() {
  local name="$1" limit="$2"
  shift 2
  wanted "$name" || return 0
  limit=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { printf "%d", l * s }')
  if [ -n "$BUDGET" ]; then
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 30 ]; then
      echo "== $name: SKIPPED (${left}s of --time-limit left)"
      echo "== $name: SKIPPED, --time-limit reached" >> "$SUMMARY"
      return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  echo "== $name (limit ${limit}s): adt bench $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" \
    "$ADT_BIN" bench --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -eq 124 ] && status="TIMEOUT after ${limit}s (partial JSON kept)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED rc=$rc"
  echo "   $status in $((SECONDS - t0)) s; log $OUT/$name.log"
  [ $rc -ne 0 ] && tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
  {
    echo "== $name: $status"
    # The summary block printed last by adt bench.
    sed -n '/^summary (best variant per workload/,$p' "$OUT/$name.log"
  } >> "$SUMMARY"
}

# Timed rows are medians of 5 (10 for the UNet step) runs after the warm-up. Most important first. Expected times on one H100 / H200 are well under the limits.
# 1. Does the binary see the GPU, the shim work (tiny models, a few calls)?
run probe 60 --config tiny --device cuda --iters 3 --warmup 1 --workloads unet --levers all
# 2. SD1.5 sizes: one CFG UNet step, every lever alone and combined.
run unet 90 --config sd15 --device cuda --iters 10 --warmup 3 --workloads unet --levers all \
  --combo bf16+cuda_graph --combo bf16+cudnn_benchmark+cuda_graph --combo all
# 3. 50-step DDIM sampling + decode.
run sample 200 --config sd15 --device cuda --iters 5 --warmup 1 --workloads sample \
  --levers bf16,autocast --combo bf16+cudnn_benchmark+cuda_graph \
  --combo bf16+cudnn_benchmark+cuda_graph+tf32
# 4. ADT iterations: G+D from step 0 (K = 3), D-only from step 0, mean over H = 5.
#    Trajectory levers (bf16 copy, cuDNN benchmark, CUDA graph), then the gradient
#    part in TF32 on top (bf16 autocast of the whole iteration measured slower than
#    TF32: run it with --combo bf16+cudnn_benchmark+cuda_graph+autocast).
run adt 400 --config sd15 --device cuda --iters 5 --warmup 1 --workloads gd,d,h5 \
  --levers none --combo bf16+cudnn_benchmark+cuda_graph \
  --combo bf16+cudnn_benchmark+cuda_graph+tf32
# 5. Peak memory against K, per-step decomposition vs one graph (fp32 baseline): one
#    timed run per row (its time is a single iteration, not a median).
run memory 150 --config sd15 --device cuda --iters 1 --warmup 1 --workloads memory --k 1,3,8 --levers none
# SD3-medium sizes (MMDiT 2.0B, 1024 px): guided transformer step, 28-step flow
# sampling + decode, one ADT G+D iteration (K = 3); fp32 and the bf16 trajectory copy.
run sd3 500 --config sd3-medium --device cuda --iters 5 --warmup 1 --steps 28 \
  --workloads step,sample,gd --levers bf16 --combo bf16+tf32
# 6. Tiny models on the GPU (launch-overhead bound), everything.
run tiny 120 --config tiny --device cuda --iters 5 --warmup 1 --k 1,3,8 --levers all

echo
echo "===================== summary (ratios: levers / baseline, same run) ====================="
cat "$SUMMARY"
