# shellcheck shell=bash
# Sourced by setup.sh, test.sh and demo.sh (from the project root): which Python runs fedmq.
#
# PYTHON=/path/to/python names an interpreter to use as it is, in its own environment (an
# activated virtualenv, conda, a container's Python). Otherwise the project's own virtual
# environment .venv in the checkout: Debian's python3 refuses `pip install` outside one
# (PEP 668, "externally managed environment"), and a venv keeps fedmq's pins away from the
# system's packages. .venv/bin then comes first on PATH, so that what the scripts start
# (pytest's subprocesses, the container build scripts' python3, `fedmq`) runs from it too.
# Sets FEDMQ_PY (the interpreter), FEDMQ_VENV (empty with PYTHON) and FEDMQ_BASE_PY (the
# python3 a new .venv is made from).
FEDMQ_BASE_PY="$(command -v python3 || true)"
if [ -n "${PYTHON:-}" ]; then
  FEDMQ_PY="$PYTHON"
  FEDMQ_VENV=""
else
  FEDMQ_VENV="$PWD/.venv"
  FEDMQ_PY="$FEDMQ_VENV/bin/python"
  export VIRTUAL_ENV="$FEDMQ_VENV"
  export PATH="$FEDMQ_VENV/bin:$PATH"
fi
