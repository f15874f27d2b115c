#!/usr/bin/env bash
# Installs what fedmq needs on a fresh machine, skipping whatever is already there.
# Usage: scripts/setup.sh [--test] [--containers]   (--test adds the test tools; --containers adds
# Podman and debootstrap for containers/, which tests/test_containers.py also installs itself)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Mosquitto (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  else
    echo "[setup] Mosquitto not found and cannot install it here (need root + apt-get)." >&2
    echo "        The demo falls back to the embedded amqtt broker; the tests need Mosquitto:" >&2
    echo "        install it with your package manager (e.g. 'sudo apt-get install mosquitto')." >&2
  fi
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # The CPU build of 2.13.0 is the one provisioned for offline machines; pip finds it locally.
  echo "[setup] installing torch 2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
fi

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
# Checked from outside the tree: an install of a checkout that has since moved imports nothing.
installed_here() {
  (cd / && "$PY" -c "import os, sys, fedmq; sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(fedmq.__file__))) != os.path.realpath(sys.argv[1]))" "$1") >/dev/null 2>&1
}
if ! installed_here "$PWD" || [ -n "$extras" ]; then
  echo "[setup] installing fedmq${extras} and its dependencies"
  "$PY" -m pip install -q --disable-pip-version-check -e ".${extras}"
fi

# Optional: what containers/ needs to build and run the images without a registry.
if [[ " $* " == *" --containers "* ]] && ! command -v podman >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Podman and debootstrap (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      podman runc debootstrap netavark aardvark-dns >/dev/null
  else
    echo "[setup] --containers: install podman, runc and debootstrap with your package manager (needs root)." >&2
  fi
fi
