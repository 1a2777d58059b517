#!/usr/bin/env bash
# The README's test command: sets up everything the tests need on a fresh Debian 12 machine, then runs the same
# checks CI runs (ruff, mypy strict, pytest with the real broker, TSDB, Modbus servers and browser).
#   ./tests/run.sh                 everything
#   ./tests/run.sh -m "not integration"   extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the integration tests start or call (mosquitto, victoria-metrics, socat, mbpoll, chromium,
# ShellCheck, systemd-analyze). Installed only when missing, so a second run costs nothing.
packages=(mosquitto mosquitto-clients victoria-metrics socat mbpoll chromium shellcheck systemd)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The project's own virtual environment, with the package installed editable and the dev tools.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy (strict)"
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
