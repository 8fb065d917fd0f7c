#!/usr/bin/env bash
# Build, once, the parity fixture of the FID Inception-v3 port (tests/inception.rs) in
# .cache/fixtures/inception/ (about 400 MB, git-ignored):
#
# 1. pip-installs pytorch-fid 0.3.0, torchvision 0.26.0 and what the PyPI torch 2.11.0 of
#    .libtorch/venv needs to be imported from Python (its small Python dependencies and
#    the CUDA libraries it is linked against: about 2.4 GB, only loaded, never used on a
#    CPU) into .cache/pyfix/, with the venv's pip (no network access after that);
# 2. runs scripts/fixtures/make_inception.py: pytorch-fid's FID InceptionV3 with random
#    weights, its pool3 features of a few images, the weights as model.safetensors and as
#    legacy / zip torch.save files;
# 3. converts those .pth files with scripts/convert_inception.py, with torch.load and
#    with the standard-library reader, into converted-*/ (the test checks that they hold
#    the same tensors as model.safetensors).
#
# Idempotent: stamp files record what was done; a second run does nothing. Run
# `source scripts/env.sh` first if .libtorch/venv does not exist yet.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.libtorch/venv"
PYFIX="$ROOT/.cache/pyfix"
OUT="$ROOT/.cache/fixtures/inception"

die() {
  echo "setup_inception_fixture: $*" >&2
  exit 1
}

PACKAGES=(
  pytorch-fid==0.3.0 torchvision==0.26.0
  numpy==2.2.6 pillow==11.3.0
  filelock==3.18.0 sympy==1.14.0 mpmath==1.3.0 networkx==3.5 jinja2==3.1.6
  markupsafe==3.0.2 fsspec==2025.5.1 typing_extensions==4.16.0
  nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 nvidia-nccl-cu13==2.28.9
  nvidia-nvshmem-cu13==3.4.5 nvidia-cublas==13.1.0.3 nvidia-cufft==12.0.0.61
  nvidia-cufile==1.15.1.6 nvidia-curand==10.4.0.35 nvidia-cusparse==12.6.3.3
  nvidia-nvjitlink==13.0.88
)

# With a libtorch of the user's own (LIBTORCH set, no project venv) the fixture cannot
# be built; outside CI the Inception parity tests then say they are skipped.
if [ ! -x "$VENV/bin/python" ] && [ -n "${LIBTORCH:-}" ] && [ -z "${CI:-}" ]; then
  echo "setup_inception_fixture: no $VENV (LIBTORCH is set): skipping the Inception parity fixture" >&2
  exit 0
fi
[ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/pip" ] \
  || die "$VENV/bin/python or pip is missing: run 'source scripts/env.sh' first (it installs torch 2.11.0 there)"
[ -d "$(ls -d "$VENV"/lib/python3.*/site-packages/torch 2>/dev/null | head -n1)" ] \
  || die "torch is not installed in $VENV: run 'source scripts/env.sh' first"

hash_of() { sha256sum | cut -c1-16; }
PKG_HASH="$(printf '%s\n' "${PACKAGES[@]}" | hash_of)"
PKG_STAMP="$PYFIX/.installed-inception-$PKG_HASH"
FIX_HASH="$( (printf '%s\n' "$PKG_HASH"; cat "$ROOT/scripts/fixtures/make_inception.py" \
  "$ROOT/scripts/convert_inception.py" "$ROOT/scripts/convert_efficientnet.py") | hash_of)"
FIX_STAMP="$OUT/.complete-$FIX_HASH"

if [ -f "$FIX_STAMP" ]; then
  echo "setup_inception_fixture: up to date ($OUT)" >&2
  exit 0
fi

if [ ! -f "$PKG_STAMP" ]; then
  echo "setup_inception_fixture: installing pytorch-fid, torchvision and torch's runtime libraries into $PYFIX (once, ~2.4 GB)" >&2
  mkdir -p "$PYFIX"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target "$PYFIX" "${PACKAGES[@]}" \
    || die "pip install into $PYFIX failed (PyPI must be reachable): ${PACKAGES[*]}"
  touch "$PKG_STAMP"
fi

# The CUDA libraries torch is linked against, found by the dynamic loader.
LIBS="$(find "$PYFIX/nvidia" -mindepth 2 -maxdepth 3 -type d -name lib | sort | paste -sd: -)"
[ -n "$LIBS" ] || die "no nvidia/*/lib folders in $PYFIX: delete $PYFIX and rerun"
run_py() {
  LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYTHONPATH="$PYFIX" \
    "$VENV/bin/python" "$@"
}
run_py -c "import torch, torchvision, pytorch_fid" \
  || die "torch / torchvision / pytorch_fid cannot be imported from $PYFIX (see above); delete $PYFIX and rerun"

TMP="$OUT.tmp"
rm -rf "$TMP"
mkdir -p "$TMP"
echo "setup_inception_fixture: generating the fixture with pytorch-fid" >&2
run_py "$ROOT/scripts/fixtures/make_inception.py" --out "$TMP" \
  || die "scripts/fixtures/make_inception.py failed"
run_py "$ROOT/scripts/convert_inception.py" --reader torch \
  "$TMP/inception_legacy.pth" "$TMP/converted-torch" \
  || die "convert_inception.py --reader torch failed"
# The standard-library reader, as a user without a working torch runs it.
"$VENV/bin/python" "$ROOT/scripts/convert_inception.py" --reader stdlib \
  "$TMP/inception_legacy.pth" "$TMP/converted-stdlib-legacy" \
  || die "convert_inception.py --reader stdlib failed on the legacy-format file"
"$VENV/bin/python" "$ROOT/scripts/convert_inception.py" --reader stdlib \
  "$TMP/inception_zip.pth" "$TMP/converted-stdlib-zip" \
  || die "convert_inception.py --reader stdlib failed on the zip-format file"
rm -f "$TMP"/*.pth
rm -rf "$OUT"
mv "$TMP" "$OUT"
touch "$FIX_STAMP"
echo "setup_inception_fixture: wrote $OUT" >&2
