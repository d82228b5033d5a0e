#!/usr/bin/env bash
# Lint, type-check and run the default (fast) test suite with the project's .venv.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
set -e
ruff check .
ruff format --check maprl pipeline benchmarks tests
mypy
lint-imports
# PostgreSQL for the multi-worker tuning test (prints an export, or a reason and nothing to export).
eval "$(bash scripts/postgres.sh)" || true
set +e
python -m pytest "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: the selection is empty, which is a failure here" >&2
  exit 1
fi
exit "$code"
