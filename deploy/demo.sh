#!/usr/bin/env bash
# The README's demo command: creates a virtual environment, installs the gateway, and runs the demo building
# (simulated meters, zones and an AHU; local store; status page on http://127.0.0.1:8080). Ctrl-C stops it cleanly.
# Extra arguments go to `edge-gateway demo` (e.g. --duration 60, --http 127.0.0.1:9090, --data-dir DIR).
#
# The virtual environment is built from Debian's /usr/bin/python3 where it exists, else the first python3 on PATH
# (PYTHON=/path/to/python3 overrides it); a .venv made from another interpreter is rebuilt. Debian's Python needs
# the python3-venv package to create one: installed here when this runs as root or with sudo that needs no
# password, otherwise the script prints the apt-get line to run and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "demo.sh: $*" >&2; }

python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; else python=$(command -v python3 || true); fi
fi
if [ -z "$python" ]; then
  say "edge-gateway needs Python 3.11 or newer and there is no python3: sudo apt-get install -y python3"
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "edge-gateway needs Python 3.11 or newer; $python is $("$python" --version 2>&1)"
  exit 1
fi

# venv needs ensurepip, which Debian ships separately (python3-venv); Raspberry Pi OS Lite and cloud images lack it
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  if ! command -v apt-get >/dev/null; then
    say "$python cannot create a virtual environment (no ensurepip): install its venv module, then run this again"
    exit 1
  fi
  as_root=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      as_root=(sudo)
    else
      line="apt-get install -y python3-venv"
      if command -v sudo >/dev/null; then line="sudo $line"; else line="su -c '$line'"; fi
      say "$python cannot create a virtual environment without python3-venv; install it, then run this again: $line"
      exit 1
    fi
  fi
  say "installing python3-venv (Debian's Python needs it to create a virtual environment)"
  "${as_root[@]}" apt-get update
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
fi

base=$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')
if [ -e .venv ] && [ "$(readlink -f .venv/bin/python 2>/dev/null || true)" != "$base" ]; then
  say "rebuilding .venv: it was made from $(readlink -f .venv/bin/python 2>/dev/null || echo 'a missing interpreter'), not $base"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv from $base (Python $("$python" -c 'import platform; print(platform.python_version())'))"
  "$python" -m venv .venv
fi
say "installing edge-gateway into .venv (pip)"
.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -e .
say "starting the demo: status page on http://127.0.0.1:8080 unless --http says otherwise; Ctrl-C stops it"
exec .venv/bin/edge-gateway demo "$@"
