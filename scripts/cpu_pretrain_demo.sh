#!/usr/bin/env bash
# Continue pretraining the demo's base model on a CPU, in the background, resuming
# where it stopped. The committed base (assets/demo-base) had 2,981 iterations of
# examples/demo-pretrain.toml on one GPU; this script trains it further with the same
# configuration (a fresh warm-up and EMA) and can be stopped and restarted at any time:
#
#   nohup scripts/cpu_pretrain_demo.sh > pretrain.log 2>&1 &   # start or resume
#   kill %1                                                    # stop (any time)
#
# It runs at the lowest CPU priority (nice 19), so it only takes cycles nothing else
# wants. Checkpoints go to $OUTDIR every 100 iterations; the model (EMA weights) is
# written to $SAVE_TO when it stops by itself (after ITERATIONS or MINUTES). To get a
# model out of a run that is still going, stop it and run
#   adt train --config examples/demo-pretrain.toml --resume $OUTDIR --max-iterations 0 ...
# or simply let this script reach its limit.
#
# Environment: OUTDIR (runs/demo-pretrain-cpu), SAVE_TO (runs/demo-base-cpu), FROM
# (assets/demo-base; "scratch" starts from a new random pipeline), ITERATIONS (total,
# 20000), MINUTES (limit of one invocation; unset = none), THREADS (default: adt's).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUTDIR=${OUTDIR:-runs/demo-pretrain-cpu}
SAVE_TO=${SAVE_TO:-runs/demo-base-cpu}
FROM=${FROM:-assets/demo-base}
ITERATIONS=${ITERATIONS:-20000}
ADT=${ADT_BIN:-target/debug/adt}
[ -x "$ADT" ] || cargo build
[ -d .cache/demo/data/twemoji/train ] || {
  source scripts/setup_all.sh start demo
  setup_all_wait
  "$ADT" prepare-emoji --cache .cache/demo
}
if [ "$FROM" = scratch ]; then
  FROM=runs/demo-init
  [ -d "$FROM" ] || "$ADT" init-pipeline --preset demo --seed 0 --out "$FROM"
fi
args=(--config examples/demo-pretrain.toml
  --set "model.path=$FROM" --set "model.save_to=$SAVE_TO"
  --set "output.dir=$OUTDIR" --set "train.iterations=$ITERATIONS"
  --set output.checkpoint_every=100 --set output.sample_every=500
  --set output.log_every=10)
[ -n "${MINUTES:-}" ] && args+=(--set "train.time_limit_minutes=$MINUTES")
[ -n "${THREADS:-}" ] && args+=(--threads "$THREADS")
if [ -e "$OUTDIR/latest" ] || compgen -G "$OUTDIR/step-*" > /dev/null; then
  echo "resuming from $OUTDIR"
  args+=(--resume)
fi
exec nice -n 19 "$ADT" train "${args[@]}"
