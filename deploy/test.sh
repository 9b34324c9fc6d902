#!/usr/bin/env bash
# Sets everything up (deploy/setup.sh) and runs the whole test suite: lint, format, types, import
# rules, then pytest (unit, property, fuzz, real SIP peers, and real NAT in network namespaces,
# which needs root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# One command per line: under `set -e` a failure on the left of `&&` would not stop the script.
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== import rules"
lint-imports
echo "== pytest"
exec pytest -q "$@"
