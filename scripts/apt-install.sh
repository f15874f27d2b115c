#!/usr/bin/env bash
# Installs the named Debian packages that are not installed yet, quietly, with one
# `apt-get update` first (a fresh machine has no package lists). Used by scripts/setup.sh and
# tests/test_containers.py, so that the project installs every system package it runs.
# Usage: scripts/apt-install.sh PACKAGE...
# Exit status: 0 when every package is installed (now or before); 3 when some are missing and
# cannot be installed here (not root, or no apt-get), with what to do on stderr; else apt's.
set -euo pipefail

installed() {
  # dpkg knows; without dpkg (another distribution) a command of the package's name will do.
  if command -v dpkg-query >/dev/null 2>&1; then
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
  else
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/lib/podman/$1" ]
  fi
}

missing=()
for package in "$@"; do
  installed "$package" || missing+=("$package")
done
[ ${#missing[@]} = 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup] missing system packages: ${missing[*]}; they cannot be installed here (needs root and apt-get)." >&2
  echo "        Install them with your package manager, e.g. 'sudo apt-get install -y ${missing[*]}'." >&2
  exit 3
fi
echo "[setup] installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
