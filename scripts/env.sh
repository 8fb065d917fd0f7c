#!/usr/bin/env bash
# Source this file: it makes sure a libtorch 2.11.0 is available and exports
# LIBTORCH / LD_LIBRARY_PATH for cargo and for the built binary.
#
# If LIBTORCH is already set, it is used as is. Otherwise a project-local copy is
# installed once from PyPI into .libtorch/ (git-ignored); later calls are a no-op.
ADT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="2.11.0"

adt_die() { echo "adt setup: $*" >&2; return 1; }

adt_setup_libtorch() {
  if [ -n "${LIBTORCH:-}" ]; then
    [ -d "$LIBTORCH/lib" ] || { adt_die "LIBTORCH=$LIBTORCH has no lib/ folder"; return 1; }
    return 0
  fi
  local venv="$ADT_ROOT/.libtorch/venv"
  local stamp="$ADT_ROOT/.libtorch/installed-$TORCH_VERSION"
  if [ ! -f "$stamp" ]; then
    command -v python3 >/dev/null 2>&1 || { adt_die "python3 is required to fetch libtorch from PyPI (or set LIBTORCH to an existing libtorch $TORCH_VERSION)"; return 1; }
    python3 -m venv --help >/dev/null 2>&1 || { adt_die "python3 venv module is missing (Debian: apt-get install python3-venv)"; return 1; }
    echo "adt setup: installing libtorch $TORCH_VERSION from PyPI into .libtorch/ (once, ~550 MB)" >&2
    rm -rf "$ADT_ROOT/.libtorch"
    mkdir -p "$ADT_ROOT/.libtorch"
    python3 -m venv "$venv" || { adt_die "could not create $venv"; return 1; }
    "$venv/bin/python" -m pip --version >/dev/null 2>&1 || { adt_die "pip is missing in the venv (Debian: apt-get install python3-pip python3-venv)"; return 1; }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
      "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 \
      || { adt_die "pip install torch==$TORCH_VERSION failed"; return 1; }
    touch "$stamp"
  fi
  local sp
  sp="$(ls -d "$venv"/lib/python3.*/site-packages/torch 2>/dev/null | head -n1)"
  [ -n "$sp" ] || { adt_die "torch not found under $venv"; return 1; }
  export LIBTORCH="$sp"
}

adt_setup_libtorch || return 1 2>/dev/null || exit 1
export LIBTORCH
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LIBTORCH_BYPASS_VERSION_CHECK="${LIBTORCH_BYPASS_VERSION_CHECK:-0}"
