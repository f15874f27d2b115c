#!/usr/bin/env bash
# Build the local base image localhost/fedmq-base:bookworm from Debian packages.
#
# Why: where no container registry is reachable (CI, air-gapped hospital build hosts)
# python:3.11-slim cannot be pulled, but Debian's package mirror can be. Debian
# bookworm ships Python 3.11, the same ABI as the wheelhouse (cp311), so the
# Containerfiles work unchanged with --build-arg BASE_IMAGE=localhost/fedmq-base:bookworm.
#
# Idempotent: does nothing when the image exists (FORCE=1 rebuilds). Needs root for
# debootstrap. Environment: FEDMQ_BASE_IMAGE (tag), DEBIAN_MIRROR, FEDMQ_ENGINE.
set -euo pipefail
# shellcheck source=containers/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
use_engine

IMAGE="${FEDMQ_BASE_IMAGE:-localhost/fedmq-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm

if image_exists "$IMAGE" && [[ "${FORCE:-0}" != 1 ]]; then
    step "$IMAGE already exists ($ENGINE); nothing to do (FORCE=1 $0 rebuilds it)"
    exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install -y debootstrap"
[[ "$(id -u)" == 0 ]] || die "debootstrap needs root: run 'sudo $0' (or build with the default BASE_IMAGE=python:3.11-slim where a registry is reachable)"

ROOTFS="$(mktemp -d "${TMPDIR:-/tmp}/fedmq-rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
START=$SECONDS

step "[1/3] debootstrap $SUITE (minbase + python3) from $MIRROR into $ROOTFS (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR"

step "[2/3] trimming package caches and docs"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
# The image runs with the host's resolver, not the build host's.
: > "$ROOTFS/etc/resolv.conf"

step "[3/3] importing the root filesystem as $IMAGE ($ENGINE)"
tar -C "$ROOTFS" -c . | "$ENGINE" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE" >/dev/null

step "done in $((SECONDS - START))s: $IMAGE, $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec) bytes"
