#!/usr/bin/env bash
# One command for the whole test suite: install what is missing (Mosquitto included), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec "${PYTHON:-python3}" -m pytest -q "$@"
