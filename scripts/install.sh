#!/usr/bin/env bash
# Create .venv with the pinned dependencies (requirements.lock) and maprl itself.
# Safe to run again: it only installs what is missing. Needs Python 3.11 and the PyPI registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "maprl installed in .venv ($(.venv/bin/python --version))"
