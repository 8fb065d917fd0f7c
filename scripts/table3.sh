#!/usr/bin/env bash
# The paper's Table 3 at toy scale, three seeds, from one command (README, "Table 3"):
#
#   scripts/table3.sh [SEEDS] [ITERATIONS] [EVAL_IMAGES]     # defaults: 0,1,2 80 256
#
# Every variant of `adt ablate` (ADT, StyleGAN-T discriminator, DRTune path,
# lambda = 0, K = 1, K = 3, four feature levels, FT) from the committed base on each
# seed, scored in EfficientNet-Lite1 and Lite2 features. The defaults are the default
# demo's scale (80 iterations, 256 held-out captions): three seeds of all eight rows
# take a bit over an hour on two idle CPU cores. On a GPU box, DEVICE=cuda.
#
# Writes runs/table3/ and copies its report (report.md / report.json, the samples
# side by side) and the log to assets/table3/.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-0,1,2}
ITERATIONS=${2:-80}
EVAL=${3:-256}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-runs/table3}
ASSETS=${ASSETS:-assets/table3}
source scripts/env.sh
cargo build --bin adt
[ -d .cache/demo/data/noto/heldout ] || {
  source scripts/setup_all.sh start demo
  setup_all_wait
  ./target/debug/adt prepare-emoji --cache .cache/demo
}
mkdir -p "$OUT" "$ASSETS"
./target/debug/adt ablate --device "$DEVICE" --seeds "$SEEDS" --iterations "$ITERATIONS" \
  --eval-images "$EVAL" --out "$OUT" 2>&1 | tee "$OUT/log.txt"
cp "$OUT/report.md" "$OUT/report.json" "$ASSETS/"
[ -f "$OUT/samples-side-by-side.png" ] && cp "$OUT/samples-side-by-side.png" "$ASSETS/"
sed 's/\x1b\[[0-9;]*m//g' "$OUT/log.txt" | grep -E "ablation|reference|wall" > "$ASSETS/log.txt" || true
