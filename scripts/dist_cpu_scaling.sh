#!/usr/bin/env bash
# Data-parallel scaling on this machine's CPU: the tiny and demo-size ADT configs at
# 1 process (all cores) and 2 processes (`adt train --nproc 2`, half the cores each),
# same per-rank batch, so the 2-process global batch is twice as large.
# ADT iterations vary in cost with the random trajectory start step (and the runs
# draw different ones), so the FT run of the demo, whose iterations all cost the
# same, is the cleaner scaling figure.
# Prints seconds per iteration, throughput ratio and the share of time rank 0 spent
# waiting in collectives. Usage: scripts/dist_cpu_scaling.sh [ITERATIONS] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-8}
OUT=${2:-runs/dist-scaling}
ADT=${ADT:-target/debug/adt}
CORES=$(nproc)
rm -rf "$OUT"
mkdir -p "$OUT"
run() { # name nproc config extra...
  local name=$1 np=$2 cfg=$3
  shift 3
  local threads=$((CORES / np))
  [ "$threads" -ge 1 ] || threads=1
  local args=(train --config "$cfg" --set "output.dir=\"$OUT/$name\"" --set output.sample_every=0
    --set output.checkpoint_every=0 --set train.iterations="$ITERS" --set output.log_every=1 "$@")
  if [ "$np" -gt 1 ]; then args+=(--nproc "$np"); fi
  echo "== $name: $np process(es), OMP_NUM_THREADS=$threads"
  OMP_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE "$ADT" "${args[@]}" 2>"$OUT/$name.log" >/dev/null
  sed 's/\x1b\[[0-9;]*m//g' "$OUT/$name.log" | grep -h "waiting for collectives" | sed 's/.*run: *//' || true
}
run tiny-1 1 examples/tiny-random.toml --set data.num_workers=1
run tiny-2 2 examples/tiny-random.toml --set data.num_workers=1
run demo-1 1 examples/demo-adt.toml --set train.d_only_iterations=0
run demo-2 2 examples/demo-adt.toml --set train.d_only_iterations=0
run demo-2s 2 examples/demo-adt.toml --set train.d_only_iterations=0 --set train.dist_shared_start=true
run demoft-1 1 examples/demo-ft.toml
run demoft-2 2 examples/demo-ft.toml
python3 - "$OUT" <<'PY'
import json, re, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
def per_iter(name):
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in rows[1:])
def comm(name):
    text = re.sub(r"\x1b\[[0-9;]*m", "", (out / f"{name}.log").read_text())
    shares = {}
    for m in re.finditer(r"rank (\d): ([0-9.]+) s waiting for collectives.* over \d+ iterations of ([0-9.]+) s", text):
        shares[int(m.group(1))] = 100 * float(m.group(2)) / float(m.group(3))
    return " / ".join(f"{shares[r]:.0f} %" for r in sorted(shares))
print("| config | s/iteration, 1 process | s/iteration, 2 processes | throughput ratio (2 vs 1) | time waiting in collectives (rank 0 / rank 1) |")
print("|---|---|---|---|---|")
for label, one, two in [("tiny", "tiny-1", "tiny-2"), ("demo", "demo-1", "demo-2"),
                        ("demo, train.dist_shared_start", "demo-1", "demo-2s"),
                        ("demo FT (constant work per iteration)", "demoft-1", "demoft-2")]:
    t1, t2 = per_iter(one), per_iter(two)
    print(f"| {label} | {t1:.3f} | {t2:.3f} | {2 * t1 / t2:.2f} | {comm(two)} |")
PY
