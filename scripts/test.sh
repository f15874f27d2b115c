#!/usr/bin/env bash
# One command for the whole test suite: install what is missing (Mosquitto, .venv, test tools),
# then run pytest with the arguments given (e.g. `bash scripts/test.sh tests/test_config.py -q`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
exec "$FEDMQ_PY" -m pytest -q "$@"
