#!/usr/bin/env bash
# Fill wheelhouse/ with every runtime dependency of fedmq as wheels for CPython 3.11 on
# manylinux x86_64 (glibc <= 2.36, i.e. Debian bookworm and python:3.11-slim), the exact
# versions in wheelhouse/requirements.txt, and the fedmq wheel itself in wheelhouse/app/.
#
# Why: the images install with `pip install --no-index` from this directory, because
# container builds may have no (or an intercepted) route to PyPI, and so that what is
# tested is exactly what ships. torch is pinned to the CPU build: the default PyPI wheel
# pulls several GB of CUDA libraries that a hospital CPU server cannot use. fedmq sits apart
# from its dependencies so that a code change rebuilds only the images' last, small layer.
#
# Idempotent: the fedmq wheel is always rebuilt (seconds); when fedmq's requirements, the
# torch build and the wheels present are those of the last complete run
# (wheelhouse/.requirements), nothing is downloaded or checked again.
# Environment: WHEELHOUSE (default <project>/wheelhouse), TORCH_VERSION (default 2.13.0+cpu),
# PYTHON (default python3).
set -euo pipefail
# shellcheck source=containers/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WHEELHOUSE="${WHEELHOUSE:-$PROJECT_DIR/wheelhouse}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0+cpu}"
PYTHON="${PYTHON:-python3}"

mkdir -p "$WHEELHOUSE/app"
START=$SECONDS
BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/fedmq-wheel.XXXXXX")"
trap 'rm -rf "$BUILD_DIR"' EXIT

step "[1/3] building the fedmq wheel from $PROJECT_DIR"
# From a copy: setuptools writes build/ and *.egg-info next to the sources, and a stale
# build/lib would smuggle deleted modules into the wheel.
mkdir "$BUILD_DIR/src"
tar -C "$PROJECT_DIR" --exclude=./.git --exclude=./wheelhouse --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./containers --exclude=./pki -cf - . | tar -C "$BUILD_DIR/src" -xf -
rm -f "$WHEELHOUSE"/fedmq-*.whl "$WHEELHOUSE"/app/fedmq-*.whl
# Fixed zip timestamps: an unchanged tree gives a byte-identical wheel, so image builds
# reuse their cached layers instead of reinstalling everything.
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$PROJECT_DIR" log -1 --format=%ct 2>/dev/null || echo 315532800)}"
export SOURCE_DATE_EPOCH
# Without build isolation when setuptools is here already: isolation fetches it from the
# index on every run, which is most of this step's time.
ISOLATION=()
"$PYTHON" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null \
    && ISOLATION=(--no-build-isolation)
"$PYTHON" -m pip wheel --quiet --no-deps "${ISOLATION[@]}" --wheel-dir "$WHEELHOUSE/app" "$BUILD_DIR/src"
FEDMQ_WHEEL="$(ls "$WHEELHOUSE"/app/fedmq-*.whl)"

PLATFORMS=(--platform manylinux2014_x86_64)   # pip expands this to manylinux2010 and manylinux1
for glibc_minor in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${glibc_minor}_x86_64"); done
TARGET=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none "${PLATFORMS[@]}")
# What the last complete run fetched and checked: fedmq's requirements, the torch build and
# the dependency wheels present. Equal now = nothing to download and nothing new to check.
STAMP="$WHEELHOUSE/.requirements"
fingerprint() {
    printf 'torch==%s\n' "$TORCH_VERSION"
    "$PYTHON" -c '
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    print("\n".join(sorted(l for l in whl.read(meta).decode().splitlines() if l.startswith("Requires-Dist:"))))
' "$FEDMQ_WHEEL"
    find "$WHEELHOUSE" -maxdepth 1 \( -name '*.whl' -o -name requirements.txt \) -printf '%f %s\n' | sort
}
if [[ -f "$WHEELHOUSE/requirements.txt" && -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" ]]; then
    step "[2/3] dependency wheels are current (same requirements and wheels as the last run): nothing to download"
    step "[3/3] skipped: the last run checked these very wheels"
else
    rm -f "$STAMP"
    step "[2/3] downloading dependency wheels for cp311 manylinux x86_64 (torch $TORCH_VERSION; several minutes on a first run)"
    echo "torch==$TORCH_VERSION" > "$BUILD_DIR/constraints.txt"
    "$PYTHON" -m pip download --progress-bar on "${TARGET[@]}" \
        --constraint "$BUILD_DIR/constraints.txt" --dest "$WHEELHOUSE" "$FEDMQ_WHEEL"
    rm -f "$WHEELHOUSE"/fedmq-*.whl   # pip download copies the wheel it resolved from

    step "[3/3] checking that the wheelhouse alone resolves fedmq, and pinning what it resolves to"
    # --isolated: no PIP_FIND_LINKS or pip.conf, whose extra wheel directories would hide a gap.
    "$PYTHON" -m pip --isolated install --quiet --dry-run --ignore-installed --no-index \
        --find-links "$WHEELHOUSE" "${TARGET[@]}" --target "$BUILD_DIR/check" \
        --report "$BUILD_DIR/resolution.json" "$FEDMQ_WHEEL"
    "$PYTHON" -c '
import json, sys
report = json.load(open(sys.argv[1]))
pins = sorted("%s==%s" % (i["metadata"]["name"], i["metadata"]["version"]) for i in report["install"]
              if i["metadata"]["name"] != "fedmq")
print("# the dependencies of fedmq as resolved from this wheelhouse (containers/wheelhouse.sh)")
print("\n".join(pins))
' "$BUILD_DIR/resolution.json" > "$WHEELHOUSE/requirements.txt"
    fingerprint > "$STAMP"
fi

step "done in $((SECONDS - START))s: $(find "$WHEELHOUSE" -maxdepth 1 -name '*.whl' | wc -l) dependency wheels ($(du -sh "$WHEELHOUSE" | cut -f1)) and $(basename "$FEDMQ_WHEEL") in $WHEELHOUSE"
