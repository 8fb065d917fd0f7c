#!/usr/bin/env bash
# Kill-and-resume check: train examples/tiny-random.toml once without interruption,
# then again while killing it with SIGKILL at random moments and resuming each time
# with --resume, and compare the two runs' final files byte for byte.
#
#   scripts/kill_resume_check.sh                 # 20 kills, 100 iterations
#   KILLS=40 ITERS=100 SEED=7 scripts/kill_resume_check.sh
#
# Environment: KILLS (kills to deliver, default 20), ITERS (iterations, default 100),
# EVERY (checkpoint period, default 3), SEED (of the kill moments, default 1),
# MIN_MS / MAX_MS (a kill comes this long after a start; default 300 / 2500),
# ADT (the adt binary; default: built here with cargo, PROFILE=debug|release),
# WORK (the work folder; default a new temporary one, removed when all is identical).
# Compared: every file of final/ and of the last checkpoint except state.json (it
# holds the run id and the output folder), and metrics.jsonl without the per-step
# wall time. Exit status 0 only when all of them are identical.
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS=${KILLS:-20}
ITERS=${ITERS:-100}
EVERY=${EVERY:-3}
SEED=${SEED:-1}
MIN_MS=${MIN_MS:-300}
MAX_MS=${MAX_MS:-2500}
PROFILE=${PROFILE:-debug}
CONFIG=examples/tiny-random.toml

if [ -z "${ADT:-}" ]; then
  if [ "$PROFILE" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
  ADT=target/$PROFILE/adt
fi
WORK=${WORK:-$(mktemp -d -t adt-kill-resume.XXXXXX)}
mkdir -p "$WORK"
RANDOM=$SEED

args() { # output folder
  echo --config "$CONFIG" --set output.dir="$1" --set train.iterations="$ITERS" \
    --set output.checkpoint_every="$EVERY" --set output.sample_every=0
}

echo "work folder: $WORK"
t0=$(date +%s)
# shellcheck disable=SC2046
if ! "$ADT" train $(args "$WORK/ref") > "$WORK/ref.log" 2>&1; then
  echo "the uninterrupted run failed; log: $WORK/ref.log" >&2
  tail -n 5 "$WORK/ref.log" >&2
  exit 1
fi
t1=$(date +%s)
echo "uninterrupted run: $ITERS iterations in $((t1 - t0)) s"

run="$WORK/killed"
kills=0 starts=0 fresh=0 resumed=0 early=0 finished_early=0
while [ "$kills" -lt "$KILLS" ]; do
  starts=$((starts + 1))
  # shellcheck disable=SC2046
  "$ADT" train $(args "$run") --resume > "$WORK/start-$starts.log" 2>&1 &
  pid=$!
  wait_ms=$((MIN_MS + (RANDOM * 32768 + RANDOM) % (MAX_MS - MIN_MS + 1)))
  sleep "$(printf '%d.%03d' $((wait_ms / 1000)) $((wait_ms % 1000)))"
  if kill -9 "$pid" 2> /dev/null; then
    wait "$pid" 2> /dev/null || true
    kills=$((kills + 1))
  else
    # It ended before the kill: it must have succeeded.
    if ! wait "$pid"; then
      echo "start $starts failed (not killed); log: $WORK/start-$starts.log" >&2
      tail -n 5 "$WORK/start-$starts.log" >&2
      exit 1
    fi
    finished_early=$((finished_early + 1))
    break
  fi
  if grep -q "resumed from" "$WORK/start-$starts.log"; then
    resumed=$((resumed + 1))
  elif grep -q "starting fresh" "$WORK/start-$starts.log"; then
    fresh=$((fresh + 1))
  else
    early=$((early + 1))
  fi
  step=$(cat "$run/checkpoints/latest" 2> /dev/null || echo none)
  echo "kill $kills after $wait_ms ms (latest checkpoint: $step)"
done
if [ "$finished_early" -eq 0 ]; then
  # shellcheck disable=SC2046
  if ! "$ADT" train $(args "$run") --resume > "$WORK/final.log" 2>&1; then
    echo "the final resume failed; log: $WORK/final.log" >&2
    tail -n 5 "$WORK/final.log" >&2
    exit 1
  fi
fi
t2=$(date +%s)
cleaned=$(cat "$WORK"/start-*.log "$WORK"/final.log 2> /dev/null | grep -c "removed the leftover" || true)
echo "interrupted run: $kills kills (SIGKILL), $starts starts ($resumed resumed from a checkpoint, $fresh started fresh before the first one, $early killed during start-up; $cleaned leftover temporary checkpoint(s) of a killed save removed at a restart), $((t2 - t1)) s"

last=checkpoints/$(printf 'step-%07d' "$ITERS")
same=0 differ=0
while IFS= read -r f; do
  if cmp -s "$WORK/ref/$f" "$run/$f"; then
    same=$((same + 1))
  else
    differ=$((differ + 1))
    echo "DIFFERS: $f"
  fi
done < <(cd "$WORK/ref" && find final "$last" -type f ! -name state.json | sort)
if ! cmp -s <(cd "$WORK/ref" && find final "$last" -type f | sort) <(cd "$run" && find final "$last" -type f | sort); then
  differ=$((differ + 1))
  echo "DIFFERS: the file lists of final/ and $last"
fi
strip() { sed -E 's/"seconds":[-0-9.eE+]+,?//' "$1"; }
if cmp -s <(strip "$WORK/ref/metrics.jsonl") <(strip "$run/metrics.jsonl"); then
  same=$((same + 1))
else
  differ=$((differ + 1))
  echo "DIFFERS: metrics.jsonl (wall time removed)"
fi
leftovers=$(find "$run/checkpoints" "$run/final" -name '.*tmp-*' | wc -l)
echo "compared $((same + differ)) files: $same identical, $differ different; $leftovers leftover temporary folders"
if [ "$differ" -ne 0 ] || [ "$leftovers" -ne 0 ]; then
  echo "FAILED (logs in $WORK)" >&2
  exit 1
fi
if [ "$kills" -lt "$KILLS" ]; then
  echo "identical, but the run finished after $kills of $KILLS kills: raise ITERS (logs in $WORK)" >&2
  exit 2
fi
echo "OK: the interrupted run's files are byte-identical to the uninterrupted run's"
rm -rf "$WORK"
