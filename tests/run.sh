#!/usr/bin/env bash
# The README's test command: sets up everything the tests need on a fresh Debian 12 machine, then runs the same
# checks CI runs (ruff, mypy strict, pytest with the real broker, TSDB, Modbus servers and browser).
#   ./tests/run.sh                 everything
#   ./tests/run.sh -m "not integration"   extra arguments go to pytest
#
# The virtual environment is built from the Python users run: Debian's /usr/bin/python3 where it exists (3.11.2 on
# Debian 12 and Raspberry Pi OS bookworm), else the first python3 on PATH; PYTHON=/path/to/python3 overrides it.
# A .venv made from another interpreter is rebuilt, and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
step() { printf '== [%4ds] %s\n' "$((SECONDS - started))" "$*"; }

# Debian packages: root runs apt-get itself, a user with sudo that needs no password runs it through sudo; anyone
# else is told the exact command, in one line.
need_debian_packages() {
  local missing=() package
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  local as_root=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      as_root=(sudo)
    else
      local line="apt-get install -y --no-install-recommends ${missing[*]}"
      if command -v sudo >/dev/null; then line="sudo $line"; else line="su -c '$line'"; fi
      echo "tests/run.sh: missing Debian packages; install them, then run this again: $line" >&2
      exit 1
    fi
  fi
  step "installing Debian packages: ${missing[*]}"
  "${as_root[@]}" apt-get update
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# What the integration tests start or call (mosquitto, victoria-metrics, nats-server, socat, mbpoll, chromium,
# ShellCheck, systemd-analyze), and python3-venv: Debian's Python cannot create a virtual environment without it.
if command -v dpkg-query >/dev/null; then
  step "checking Debian packages"
  need_debian_packages python3-venv mosquitto mosquitto-clients victoria-metrics nats-server socat mbpoll chromium shellcheck systemd
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; else python=$(command -v python3 || true); fi
fi
if [ -z "$python" ]; then
  echo "edge-gateway needs Python 3.11 or newer and there is no python3: sudo apt-get install -y python3" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "edge-gateway needs Python 3.11 or newer; $python is $("$python" --version 2>&1)" >&2
  exit 1
fi
base=$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')
step "Python: $base ($("$python" -c 'import platform; print(platform.python_version())'))"

# The project's own virtual environment, with the package installed editable and the dev tools.
if [ -e .venv ] && [ "$(readlink -f .venv/bin/python 2>/dev/null || true)" != "$base" ]; then
  step "rebuilding .venv: it was made from $(readlink -f .venv/bin/python 2>/dev/null || echo 'a missing interpreter'), not $base"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  step "creating .venv from $base"
  "$python" -m venv .venv
fi
step "installing edge-gateway and its dev tools into .venv (pip)"
.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -e '.[dev]'

step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
step "mypy (strict)"
.venv/bin/mypy
step "pytest on $(.venv/bin/python -c 'import platform; print("Python", platform.python_version())')"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
step "done: pytest exit $status"
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
