#!/usr/bin/env bash
# One command for the demo: install what is missing, then run the four-hospital federation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m fedmq demo "$@"
