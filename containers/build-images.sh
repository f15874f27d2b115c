#!/usr/bin/env bash
# Build the fedmq-agent and fedmq-orchestrator images from wheelhouse/ and print their sizes.
#
# Why a script: the base image, the wheelhouse and the podman settings have to agree,
# and podman drops HEALTHCHECK unless it writes Docker-format images.
#
# Environment: BASE_IMAGE (default: localhost/fedmq-base:bookworm when that image exists,
# else python:3.11-slim), TAG (default: latest), FEDMQ_ENGINE (podman|docker),
# WHEELHOUSE (default <project>/wheelhouse).
set -euo pipefail
# shellcheck source=containers/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
use_engine

WHEELHOUSE="${WHEELHOUSE:-$PROJECT_DIR/wheelhouse}"
TAG="${TAG:-latest}"
LOCAL_BASE=localhost/fedmq-base:bookworm
if [[ -z "${BASE_IMAGE:-}" ]]; then
    if image_exists "$LOCAL_BASE"; then BASE_IMAGE="$LOCAL_BASE"; else BASE_IMAGE=python:3.11-slim; fi
fi
ls "$WHEELHOUSE"/fedmq-*.whl >/dev/null 2>&1 \
    || die "no fedmq wheel in $WHEELHOUSE: run containers/wheelhouse.sh first"

FORMAT=()
[[ "$ENGINE" == podman ]] && FORMAT=(--format docker)   # OCI images have no HEALTHCHECK

START=$SECONDS
for role in agent orchestrator; do
    step "building localhost/fedmq-$role:$TAG from $BASE_IMAGE with $ENGINE"
    "$ENGINE" build "${FORMAT[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -f "$CONTAINERS_DIR/$role.Containerfile" -t "localhost/fedmq-$role:$TAG" "$WHEELHOUSE"
done

step "built in $((SECONDS - START))s"
for role in agent orchestrator; do
    size="$("$ENGINE" image inspect --format '{{.Size}}' "localhost/fedmq-$role:$TAG")"
    printf '  %-40s %s\n' "localhost/fedmq-$role:$TAG" "$(numfmt --to=iec "$size")"
done
