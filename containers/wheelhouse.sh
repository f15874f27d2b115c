#!/usr/bin/env bash
# Fill wheelhouse/ with the fedmq wheel and every runtime dependency as wheels for
# CPython 3.11 on manylinux x86_64 (glibc <= 2.36, i.e. Debian bookworm and python:3.11-slim).
#
# Why: the images install with `pip install --no-index` from this directory, because
# container builds may have no (or an intercepted) route to PyPI, and so that what is
# tested is exactly what ships. torch is pinned to the CPU build: the default PyPI wheel
# pulls several GB of CUDA libraries that a hospital CPU server cannot use.
#
# Idempotent: wheels already present are not fetched again. Environment: WHEELHOUSE
# (default <project>/wheelhouse), TORCH_VERSION (default 2.13.0+cpu), PYTHON (default python3).
set -euo pipefail
# shellcheck source=containers/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WHEELHOUSE="${WHEELHOUSE:-$PROJECT_DIR/wheelhouse}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0+cpu}"
PYTHON="${PYTHON:-python3}"

mkdir -p "$WHEELHOUSE"
START=$SECONDS
BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/fedmq-wheel.XXXXXX")"
trap 'rm -rf "$BUILD_DIR"' EXIT

step "[1/3] building the fedmq wheel from $PROJECT_DIR"
# From a copy: setuptools writes build/ and *.egg-info next to the sources, and a stale
# build/lib would smuggle deleted modules into the wheel.
mkdir "$BUILD_DIR/src"
tar -C "$PROJECT_DIR" --exclude=./.git --exclude=./wheelhouse --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./containers -cf - . | tar -C "$BUILD_DIR/src" -xf -
rm -f "$WHEELHOUSE"/fedmq-*.whl
# Fixed zip timestamps: an unchanged tree gives a byte-identical wheel, so image builds
# reuse their cached layers instead of reinstalling everything.
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$PROJECT_DIR" log -1 --format=%ct 2>/dev/null || echo 315532800)}"
export SOURCE_DATE_EPOCH
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELHOUSE" "$BUILD_DIR/src"
FEDMQ_WHEEL="$(ls "$WHEELHOUSE"/fedmq-*.whl)"

step "[2/3] downloading dependency wheels for cp311 manylinux x86_64 (torch $TORCH_VERSION; several minutes on a first run)"
PLATFORMS=(--platform manylinux2014_x86_64)   # pip expands this to manylinux2010 and manylinux1
for glibc_minor in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${glibc_minor}_x86_64"); done
echo "torch==$TORCH_VERSION" > "$BUILD_DIR/constraints.txt"
"$PYTHON" -m pip download --progress-bar on --only-binary=:all: \
    --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none "${PLATFORMS[@]}" \
    --constraint "$BUILD_DIR/constraints.txt" --dest "$WHEELHOUSE" "$FEDMQ_WHEEL"

step "[3/3] checking that the wheelhouse alone resolves fedmq"
"$PYTHON" -m pip download --quiet --no-index --find-links "$WHEELHOUSE" --only-binary=:all: \
    --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none "${PLATFORMS[@]}" \
    --dest "$BUILD_DIR/check" "$FEDMQ_WHEEL"

step "done in $((SECONDS - START))s: $(find "$WHEELHOUSE" -maxdepth 1 -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1) in $WHEELHOUSE"
