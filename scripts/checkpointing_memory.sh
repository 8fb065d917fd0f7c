#!/usr/bin/env bash
# Gradient checkpointing's memory trade at SD1.5 size (512 px), measured on the CPU:
# the memory one kept-step recomputation (guided UNet call with gradient, batch 2
# with CFG, and its backward) and one VAE decode backward add over what is in use
# before them, without and with train.gradient_checkpointing. Random weights of the
# real sizes; no download. Needs about 16 GB of memory; on 2 cores it takes about
# half an hour. Writes assets/checkpointing/sd15-cpu.{json,txt}.
#
# glibc is told to map every allocation of 128 KiB or more on its own, so that freed
# tensors leave the resident set at once and the peak resident set follows the live
# tensors.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT=${OUT:-assets/checkpointing}
mkdir -p "$OUT"
[ -x target/debug/adt ] || cargo build
MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 \
  ./target/debug/adt bench --config sd15 --workloads ckpt --iters 1 --warmup 1 --steps 4 \
  --json "$OUT/sd15-cpu.json" "$@" | tee "$OUT/sd15-cpu.txt"
