#!/usr/bin/env bash
# The demo's claim on an emoji style that is not the demo's target: FT and ADT from
# the same Twemoji base (assets/demo-base) with the same configurations
# (examples/demo-ft.toml, examples/demo-adt.toml), towards another emoji-datasource
# style (apple, facebook, ...), evaluated as the demo is (FD / KID in
# EfficientNet-Lite1 and Lite2, colour statistics). Usage:
#
#   scripts/other_style.sh STYLE [SEEDS] [EVAL_IMAGES]      e.g. apple 0,1,2 256
#
# Fetches emoji-datasource-STYLE and -twitter 16.0.0 with `npm pack` into
# .cache/STYLE/, builds the 32x32 datasets there (the target style takes the
# demo's "noto" place in the folder layout) and runs `adt ablate --variants ft` on them
# (ADT always runs). The report goes to runs/STYLE and is copied to
# assets/other-styles/STYLE/.
set -euo pipefail
cd "$(dirname "$0")/.."
STYLE=${1:?usage: scripts/other_style.sh STYLE [SEEDS] [EVAL_IMAGES]}
SEEDS=${2:-0}
EVAL=${3:-256}
VERSION=16.0.0
source scripts/env.sh
[ -x target/debug/adt ] || cargo build
CACHE=.cache/$STYLE
mkdir -p "$CACHE"
for s in twitter "$STYLE"; do
  tgz="$CACHE/emoji-datasource-$s-$VERSION.tgz"
  [ -s "$tgz" ] && continue
  if [ -s ".cache/demo/emoji-datasource-$s-$VERSION.tgz" ]; then
    cp ".cache/demo/emoji-datasource-$s-$VERSION.tgz" "$tgz"
  else
    (cd "$CACHE" && npm pack --silent "emoji-datasource-$s@$VERSION" > /dev/null)
  fi
done
./target/debug/adt prepare-emoji --cache "$CACHE" --style twitter=twemoji --style "$STYLE=noto"
OUT=${OUT:-runs/$STYLE}
./target/debug/adt ablate --variants ft --data "$CACHE/data" --seeds "$SEEDS" \
  --eval-images "$EVAL" --out "$OUT" 2>&1 | tee "$OUT.log"
mkdir -p "assets/other-styles/$STYLE"
cp "$OUT/report.md" "$OUT/report.json" "$OUT/samples-side-by-side.png" "assets/other-styles/$STYLE/"
