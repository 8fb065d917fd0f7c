#!/usr/bin/env bash
# Gradient checkpointing's memory trade at SD1.5 size, measured on the CPU: the
# memory one kept-step recomputation (guided UNet call with gradient, batch 2 with
# CFG, and its backward) and one VAE decode backward add over what is in use before
# them, without and with train.gradient_checkpointing. Random weights of the real
# sizes; no download. At 256 px (the default here) it needs about 12 GB of memory and
# a few minutes on 2 cores. At 512 px the run without checkpointing needs more than
# 20 GB on the CPU, whose attention keeps the full attention matrices for the
# backward (GPUs use memory-efficient attention instead). Writes
# assets/checkpointing/sd15-<RES>px-cpu.{json,txt}. Usage:
#   scripts/checkpointing_memory.sh [RES]
#
# glibc is told to map every allocation of 128 KiB or more on its own, so that freed
# tensors leave the resident set at once and the peak resident set follows the live
# tensors.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT=${OUT:-assets/checkpointing}
RES=${1:-256}
mkdir -p "$OUT"
[ -x target/debug/adt ] || cargo build
MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 \
  ./target/debug/adt bench --config sd15 --workloads ckpt --iters 3 --warmup 1 --steps 4 \
  --resolution "$RES" --json "$OUT/sd15-${RES}px-cpu.json" | tee "$OUT/sd15-${RES}px-cpu.txt"
