#!/usr/bin/env bash
# Builds the offline bundle a hospital carries into an air-gapped site: the image archives,
# their sha256 checksums, compose.yaml with the broker configuration, and an install guide.
# Usage: containers/bundle.sh [OUT_DIR]   (run build-images.sh first; default OUT_DIR=dist/fedmq-bundle)
set -euo pipefail
# shellcheck source=containers/lib.sh
source "$(dirname "$0")/lib.sh"
use_engine

OUT="${1:-$PROJECT_DIR/dist/fedmq-bundle}"
IMAGES=(localhost/fedmq-agent localhost/fedmq-orchestrator localhost/fedmq-broker)
for image in "${IMAGES[@]}"; do
    image_exists "$image" || die "$image is not built; run containers/build-images.sh first"
done
mkdir -p "$OUT/images"
# One archive for all images: agent and orchestrator share every layer but the last.
multi=()
[[ "$ENGINE" == podman ]] && multi=(--multi-image-archive)
step "saving ${IMAGES[*]} to images/fedmq-images.tar"
rm -f "$OUT/images/fedmq-images.tar"
"$ENGINE" save "${multi[@]}" -o "$OUT/images/fedmq-images.tar" "${IMAGES[@]}"
step "copying compose.yaml and the broker configuration"
cp "$PROJECT_DIR/compose.yaml" "$OUT/"
mkdir -p "$OUT/containers"
cp -r "$CONTAINERS_DIR/mosquitto" "$OUT/containers/"
cat > "$OUT/INSTALL.md" <<'GUIDE'
# Installing the fedmq edge agent without internet access

1. Check the archives: `sha256sum -c SHA256SUMS` (every line must say OK).
2. Load the images: `docker load -i images/fedmq-images.tar` (Podman: `podman load -i ...`;
   on Debian/Ubuntu Podman needs `podman runc netavark aardvark-dns iptables` installed).
3. Put this site's certificate files (from the federation operator: `ca.crt`, `<site>.crt`,
   `<site>.key`) in a directory readable by uid 10001, and the hospital's CSV files in another.
4. Install and start the agent (restart policy, health check, read-only data, state volume):
   `fedmq agent deploy --help` lists the options; or use `compose.yaml` (see its comments).
5. `fedmq agent status` shows state, health and the last log lines.
GUIDE
step "writing SHA256SUMS"
(cd "$OUT" && find . -type f ! -name SHA256SUMS -print0 | sort -z | xargs -0 sha256sum > SHA256SUMS)
du -sh "$OUT" >&2
step "bundle ready in $OUT"
