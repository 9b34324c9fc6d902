#!/usr/bin/env bash
# Sets everything up (deploy/setup.sh) and runs the demo: a main host and two branch offices, each
# behind its own real Linux NAT (network namespaces), shown live. Needs root (for the namespaces).
# Extra arguments go to deploy/demo.py (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/python deploy/demo.py "$@"
