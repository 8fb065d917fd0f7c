#!/usr/bin/env bash
# The demo's FT and ADT runs on a CUDA machine (prepared script: builds nothing).
# Trains FT and ADT from assets/demo-base for each seed and draws one image per
# held-out Noto caption with every model; the evaluation (FD on held-out Noto) is
# then done anywhere with `adt eval`. Needs: the GPU-linked binary ($ADT_BIN, default
# target/gpu/adt from `scripts/gpu_bench.sh build`), the EfficientNet-Lite0 weights
# ($EFF, default .cache/weights/efficientnet-lite0 from scripts/setup_efficientnet.sh),
# the demo data (.cache/demo/data, scripts/setup_demo_data.sh) and the held-out captions
# (one per line; $CAPS, default: taken from the held-out Noto metadata.jsonl).
# Usage: scripts/gpu_demo.sh ITERATIONS "SEEDS" OUTDIR
set -uo pipefail
ITERS=${1:-200}
SEEDS=${2:-"0 1 2"}
OUTDIR=${3:-runs/gpu-demo-out}
TORCH_LIB=${TORCH_LIB:-$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))" 2>/dev/null)}
[ -n "$TORCH_LIB" ] || { echo "set TORCH_LIB to the lib folder of a PyTorch 2.11 install" >&2; exit 1; }
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ADT=${ADT_BIN:-target/gpu/adt}
EFF=${EFF:-.cache/weights/efficientnet-lite0}
W=runs/gpu-demo
mkdir -p "$OUTDIR" "$W/samples"
if [ -z "${CAPS:-}" ]; then
  CAPS="$OUTDIR/heldout_captions.txt"
  python3 -c 'import json, sys
for line in open(sys.argv[1]):
    if line.strip():
        print(json.loads(line)["text"])' .cache/demo/data/noto/heldout/metadata.jsonl > "$CAPS" \
    || { echo "gpu_demo: no held-out captions (run scripts/setup_demo_data.sh or set CAPS)" >&2; exit 1; }
fi
table="$OUTDIR/table.txt"
echo "run iterations train_s" > "$table"
sample() { # model out
  $ADT sample --model "$1" --prompts "$CAPS" --steps 10 --cfg 2 --seed 1234 --batch-size 128 --out "$2" >> "$OUTDIR/sample.log" 2>&1
}
sample assets/demo-base "$W/samples/base"
for s in $SEEDS; do
  for m in ft adt; do
    lim=0.5; [ "$m" = adt ] && lim=1.2
    t0=$(date +%s)
    $ADT train --config examples/demo-$m.toml --set train.device=cuda --set train.seed="$s" \
      --set train.iterations="$ITERS" --set output.dir="$W/$m-seed$s" --set disc.features_path="$EFF" \
      --set data.num_workers=4 --set train.time_limit_minutes="$lim" --overwrite > "$OUTDIR/$m-seed$s.log" 2>&1
    t1=$(date +%s)
    n=$(wc -l < "$W/$m-seed$s/metrics.jsonl" 2>/dev/null || echo 0)
    echo "$m-seed$s $n $((t1-t0))" >> "$table"
    sample "$W/$m-seed$s/final" "$W/samples/$m-seed$s"
    mkdir -p "$W/metrics"; cp "$W/$m-seed$s/metrics.jsonl" "$W/metrics/$m-seed$s.jsonl" 2>/dev/null
  done
  tar czf "$OUTDIR/demo-runs.tgz" -C "$W" samples metrics
done
cat "$table"
