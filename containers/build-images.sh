#!/usr/bin/env bash
# Build the fedmq-agent, fedmq-orchestrator and fedmq-broker images and print their sizes.
#
# Why a script: the base image, the wheelhouse and the podman settings have to agree,
# and podman drops HEALTHCHECK unless it writes Docker-format images.
#
# Environment: BASE_IMAGE (default: localhost/fedmq-base:bookworm when that image exists,
# else python:3.11-slim), TAG (default: latest), FEDMQ_ENGINE (podman|docker),
# WHEELHOUSE (default <project>/wheelhouse), FORCE=1 (build even images that are current).
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
ls "$WHEELHOUSE"/app/fedmq-*.whl "$WHEELHOUSE"/requirements.txt >/dev/null 2>&1 \
    || die "no fedmq wheel or requirements.txt in $WHEELHOUSE: run containers/wheelhouse.sh first"

FORMAT=()
[[ "$ENGINE" == podman ]] && FORMAT=(--format docker)   # OCI images have no HEALTHCHECK

# The Python images see only the wheelhouse; the broker needs no files at build time.
ROLES=(agent orchestrator broker)
declare -A CONTEXT=([agent]="$WHEELHOUSE" [orchestrator]="$WHEELHOUSE" [broker]="$CONTAINERS_DIR/mosquitto")

# Everything an image is built from, as one digest stored in a label. Equal digests mean the
# image is current and the build is skipped: even a fully cached build spends a minute
# hashing the wheelhouse and the 1.4 GB virtualenv. FORCE=1 builds anyway.
inputs_digest() {
    {
        "$ENGINE" image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || echo "$BASE_IMAGE"
        cat "$CONTAINERS_DIR/$1.Containerfile"
        if [[ "${CONTEXT[$1]}" == "$WHEELHOUSE" ]]; then
            cat "$WHEELHOUSE/requirements.txt"
            sha256sum "$WHEELHOUSE"/app/fedmq-*.whl | cut -d' ' -f1
            find "$WHEELHOUSE" -maxdepth 1 -name '*.whl' -printf '%f %s\n' | sort
        fi
    } | sha256sum | cut -d' ' -f1
}

START=$SECONDS
for i in "${!ROLES[@]}"; do
    role="${ROLES[$i]}"
    image="localhost/fedmq-$role:$TAG"
    digest="$(inputs_digest "$role")"
    if [[ "${FORCE:-0}" != 1 ]] && image_exists "$image" \
        && [[ "$("$ENGINE" image inspect --format '{{index .Labels "org.fedmq.inputs"}}' "$image")" == "$digest" ]]; then
        step "[$((i + 1))/${#ROLES[@]}] $image is current (same base, Containerfile and wheels); not rebuilding"
        continue
    fi
    step "[$((i + 1))/${#ROLES[@]}] building $image from $BASE_IMAGE with $ENGINE"
    "$ENGINE" build "${FORMAT[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" --label "org.fedmq.inputs=$digest" \
        -f "$CONTAINERS_DIR/$role.Containerfile" -t "$image" "${CONTEXT[$role]}"
done

# The images these builds superseded (untagged now, and only ours): 1.5 GB each otherwise.
"$ENGINE" image prune -f --filter label=org.fedmq.inputs >/dev/null
step "built in $((SECONDS - START))s"
for role in "${ROLES[@]}"; do
    size="$("$ENGINE" image inspect --format '{{.Size}}' "localhost/fedmq-$role:$TAG")"
    printf '  %-40s %s\n' "localhost/fedmq-$role:$TAG" "$(numfmt --to=iec "$size")"
done
