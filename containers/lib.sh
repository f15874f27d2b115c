# shellcheck shell=bash
# Sourced by the container build scripts: shared messages, paths, and the choice of
# container engine, so that every script picks the same engine and podman settings.

CONTAINERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
PROJECT_DIR="$(dirname "$CONTAINERS_DIR")"

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Sets ENGINE. Podman is preferred because it needs no daemon; Docker is used when only
# Docker is usable. Override with FEDMQ_ENGINE=podman|docker.
use_engine() {
    if [[ -n "${FEDMQ_ENGINE:-}" ]]; then
        ENGINE="$FEDMQ_ENGINE"
        command -v "$ENGINE" >/dev/null || die "FEDMQ_ENGINE=$ENGINE is not on PATH; install it or unset FEDMQ_ENGINE"
    elif command -v podman >/dev/null; then
        ENGINE=podman
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        ENGINE=docker
    else
        die "no container engine: install podman and what it needs (bash scripts/setup.sh --containers, or see containers/README.md) or start a Docker daemon"
    fi
    if [[ "$ENGINE" == podman ]]; then
        # Our settings (runc, no ulimits, cgroupfs) instead of editing /etc/containers.
        export CONTAINERS_CONF="${CONTAINERS_CONF:-$CONTAINERS_DIR/podman/containers.conf}"
    fi
}

image_exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }
