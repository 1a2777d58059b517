#!/usr/bin/env bash
# The README's demo command: creates a virtual environment, installs the gateway, and runs the demo building
# (simulated meters, zones and an AHU; local store; status page on http://127.0.0.1:8080). Ctrl-C stops it cleanly.
# Extra arguments go to `edge-gateway demo` (e.g. --duration 60, --http 127.0.0.1:9090, --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/edge-gateway demo "$@"
