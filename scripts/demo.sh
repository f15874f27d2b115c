#!/usr/bin/env bash
# One command for the demo: install what is missing (Mosquitto, .venv), then run the
# four-hospital federation with the arguments given (e.g. `bash scripts/demo.sh --rounds 2`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
exec "$FEDMQ_PY" -m fedmq demo "$@"
