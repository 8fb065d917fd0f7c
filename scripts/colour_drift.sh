#!/usr/bin/env bash
# The colour-drift measurements (README, "Colour drift"), from one command:
#
#   scripts/colour_drift.sh
#
# 1. `adt ablate` on seed 1: ADT, FT and one variant per training hypothesis
#    (DiffAugment's colour op off, the colour op drawn once for the views compared
#    with each other, the generator learning rate, H, lambda, guidance in the
#    training trajectories), each the demo's ADT configuration with one setting
#    changed; then seed 0 for ADT, FT, lambda = 0, the paired colour op and lambda = 2.
# 2. `examples/colour_probe.rs`: how much the discriminator's features and the
#    evaluation's FD / KID move when only the colours change, and whether the trained
#    models' samples leave [-1, 1] before the clamp.
# 3. The results table (`colour_drift_table.py`) from the reports.
#
# Runs in the repository root after `scripts/setup_demo_data.sh` and
# `adt prepare-emoji` (see README). Single-threaded runs at low priority, one after
# another. Variables: ITERATIONS (default 60), EVAL_IMAGES (128), OUT (runs/colour-drift),
# ASSETS (assets/colour-drift), DEVICE (cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

ITERATIONS=${ITERATIONS:-60}
EVAL_IMAGES=${EVAL_IMAGES:-128}
OUT=${OUT:-runs/colour-drift}
ASSETS=${ASSETS:-assets/colour-drift}
DEVICE=${DEVICE:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

cargo build --bin adt --example colour_probe
ADT=./target/debug/adt
PROBE=./target/debug/examples/colour_probe

ablate() {
    local seed=$1 variants=$2
    nice -n 10 "$ADT" ablate --threads 1 --device "$DEVICE" --seeds "$seed" \
        --iterations "$ITERATIONS" --eval-images "$EVAL_IMAGES" --variants "$variants" \
        --out "$OUT/seed$seed"
}

ablate 1 ft,no-color-aug,paired-color,lambda0,lr-half,h4,cfg1
ablate 0 ft,lambda0,paired-color,lambda2

nice -n 10 "$PROBE" --n "$EVAL_IMAGES" --out "$OUT/probe" \
    base=assets/demo-base \
    adt-seed1="$OUT/seed1/adt-seed1/final" \
    ft-seed1="$OUT/seed1/ft-seed1/final" \
    lambda0-seed1="$OUT/seed1/lambda0-seed1/final" \
    paired-color-seed1="$OUT/seed1/paired-color-seed1/final"

mkdir -p "$ASSETS/seed1" "$ASSETS/seed0"
for s in seed1 seed0; do
    cp "$OUT/$s/report.md" "$OUT/$s/report.json" "$ASSETS/$s/"
done
cp "$OUT/probe/probe.md" "$OUT/probe/probe.json" "$ASSETS/"
S="$OUT/seed1/samples"
"$PROBE" --grid "$ASSETS/samples-seed1.png" \
    "$S/base-seed0,$S/adt-seed1,$S/ft-seed1,$S/lambda0-seed1,$S/paired-color-seed1"
python3 scripts/colour_drift_table.py "$ASSETS/results.md" \
    "$ASSETS/seed1/report.json" "$ASSETS/seed0/report.json"
