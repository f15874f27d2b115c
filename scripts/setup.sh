#!/usr/bin/env bash
# Installs what fedmq needs on a fresh machine, skipping whatever is already there.
# Usage: scripts/setup.sh [--test] [--containers]   (--test adds the test tools; --containers adds
# the host packages of containers/host-packages, which tests/test_containers.py also installs itself)
#
# Python packages go into the project's virtual environment .venv (created here), or into the
# environment of the interpreter that PYTHON names: see scripts/venv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
source scripts/venv.sh

want_test=false want_containers=false
for arg in "$@"; do
  case "$arg" in
    --test) want_test=true ;;
    --containers) want_containers=true ;;
    *) echo "[setup] unknown option $arg (usage: scripts/setup.sh [--test] [--containers])" >&2; exit 2 ;;
  esac
done

# Exit status 3 of apt-install.sh: missing, and not installable here (it said what to do).
apt_install() { bash scripts/apt-install.sh "$@" || { status=$?; [ "$status" = 3 ] || exit "$status"; return 3; }; }

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  apt_install mosquitto || echo "        (the demo falls back to the embedded amqtt broker; the tests need Mosquitto)" >&2
fi

if [ -n "$FEDMQ_VENV" ] && ! "$FEDMQ_PY" -m pip --version >/dev/null 2>&1; then
  if [ -z "$FEDMQ_BASE_PY" ]; then
    echo "[setup] no python3 on PATH: install Python >= 3.11 (e.g. 'apt-get install -y python3 python3-venv')," >&2
    echo "        or set PYTHON=/path/to/python3.11 to use that interpreter's environment as it is." >&2
    exit 1
  fi
  if ! "$FEDMQ_BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "[setup] fedmq needs Python >= 3.11; $FEDMQ_BASE_PY is $("$FEDMQ_BASE_PY" -V 2>&1)." >&2
    echo "        Put a newer python3 first on PATH, or set PYTHON=/path/to/python3.11." >&2
    exit 1
  fi
  # Debian ships venv's pip bootstrap (ensurepip) in python3-venv, which a fresh machine lacks.
  if ! "$FEDMQ_BASE_PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt_install python3-venv || exit 1
    if ! "$FEDMQ_BASE_PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
      version=$("$FEDMQ_BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
      echo "[setup] $FEDMQ_BASE_PY still cannot create a virtual environment (no ensurepip):" >&2
      echo "        install python$version-venv, or set PYTHON=/path/to/python to use that interpreter as it is." >&2
      exit 1
    fi
  fi
  if [ -e "$FEDMQ_VENV" ]; then
    echo "[setup] .venv does not run (was its Python moved or removed?): creating it again"
    rm -rf "$FEDMQ_VENV"
  fi
  echo "[setup] creating the virtual environment .venv ($("$FEDMQ_BASE_PY" -V 2>&1))"
  "$FEDMQ_BASE_PY" -m venv "$FEDMQ_VENV"
fi

extras=()
$want_test && extras+=(test)
if ! "$FEDMQ_PY" scripts/requirements_met.py "${extras[@]}"; then
  spec="."
  [ ${#extras[@]} = 0 ] || spec=".[$(IFS=,; echo "${extras[*]}")]"
  # torch>=2.13,<2.14 (pyproject.toml): where the CPU build 2.13.0+cpu is on pip's find-links
  # pip takes it; elsewhere PyPI's 2.13.0 comes with CUDA libraries (README: "torch").
  target=".venv"
  [ -n "$FEDMQ_VENV" ] || target="the environment of $FEDMQ_PY"
  echo "[setup] installing fedmq${spec#.} and its dependencies into $target (minutes on a first run)"
  # Without the line per package that this machine's pip configuration may print for an extra
  # index directory lacking that package (pip then uses the other indexes).
  if ! "$FEDMQ_PY" -m pip install -q --disable-pip-version-check -e "$spec" \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); then
    echo "[setup] pip could not install into $target: see its message above." >&2
    [ -n "$FEDMQ_VENV" ] || echo "        Unset PYTHON to use the project's own .venv instead." >&2
    exit 1
  fi
fi

if $want_containers; then
  # shellcheck disable=SC2046  # one package a word
  apt_install $(sed -e 's/#.*//' containers/host-packages) || exit 1
fi
