#!/usr/bin/env bash
# Create .venv with the pinned dependencies (requirements.lock) and maprl itself.
# Safe to run again: it only installs what is missing. Needs Python 3.11 and the PyPI registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
# The pinned torch wheel pulls CUDA libraries (~6.5 GB installed); fail early with the fix, not mid-install.
need_gb=8
if [ ! -x .venv/bin/python ]; then
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((need_gb * 1024 * 1024)) ]; then
    echo "install.sh: only $((free_kb / 1024 / 1024)) GB free on $(df -P . | awk 'NR==2 {print $6}'); the environment needs about ${need_gb} GB." >&2
    echo "Free some disk space (old clones, ~/.cache/pip) and run it again." >&2
    exit 1
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir -r requirements.lock
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "maprl installed in .venv ($(.venv/bin/python --version))"
