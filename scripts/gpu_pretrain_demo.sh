#!/usr/bin/env bash
# Pretrain the demo's base model on a CUDA machine (prepared script: builds nothing).
# Expects the GPU-linked binary at target/gpu/adt or $ADT_BIN (`scripts/gpu_bench.sh
# build`; see README, "GPU builds") and the demo
# data at .cache/demo/data (scripts/setup_demo_data.sh). Usage:
#   scripts/gpu_pretrain_demo.sh MINUTES OUTDIR
set -uo pipefail
MIN=${1:-5}
OUTDIR=${2:-runs/demo-gpu}
TORCH_LIB=${TORCH_LIB:-$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))" 2>/dev/null)}
[ -n "$TORCH_LIB" ] || { echo "set TORCH_LIB to the lib folder of a PyTorch 2.11 install" >&2; exit 1; }
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$OUTDIR"
ADT=${ADT_BIN:-target/gpu/adt}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
$ADT init-pipeline --preset demo --seed 0 --out runs/demo-init 2>&1 | tee "$OUTDIR/init.log"
start=$(date +%s)
$ADT train --config examples/demo-pretrain.toml \
  --set train.device=cuda --set train.time_limit_minutes="$MIN" \
  --set output.dir=runs/demo-pretrain --set model.save_to=runs/demo-base --overwrite \
  > "$OUTDIR/train.log" 2>&1
rc=$?
end=$(date +%s)
tail -n 5 "$OUTDIR/train.log"
cp runs/demo-pretrain/metrics.jsonl "$OUTDIR/" 2>/dev/null
cp runs/demo-base/unet/diffusion_pytorch_model.safetensors "$OUTDIR/unet.safetensors" 2>/dev/null
cp runs/demo-base/unet/config.json "$OUTDIR/unet_config.json" 2>/dev/null
last=$(ls runs/demo-pretrain/samples/*.png 2>/dev/null | tail -n 1)
[ -n "$last" ] && cp "$last" "$OUTDIR/last_samples.png"
steps=$(wc -l < runs/demo-pretrain/metrics.jsonl 2>/dev/null || echo 0)
echo "rc=$rc wall_s=$((end-start)) logged_lines=$steps"
tail -n 1 runs/demo-pretrain/metrics.jsonl 2>/dev/null
sha256sum runs/demo-init/text_encoder/model.safetensors
