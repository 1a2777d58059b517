#!/usr/bin/env bash
# Install (or upgrade) the edge gateway on Raspberry Pi OS / Debian 12 "bookworm", arm64 or armhf, as a systemd
# service: a virtual environment under /opt/edge-gateway, a dedicated system user, the configuration under
# /etc/edge-gateway and the state (outbox, rule state, incentive ledger) under /var/lib/edge-gateway.
#
# Usage (from a checkout of the repository, as root):
#   sudo deploy/install-pi.sh [--site FILE] [--wheel FILE] [--no-start]
#
#   --site FILE   install FILE as /etc/edge-gateway/site.yaml (an existing site.yaml is kept otherwise;
#                 on a first install without --site, the demo building is installed so the service starts)
#   --wheel FILE  install this wheel instead of building from the checkout
#   --no-start    install and enable, but do not (re)start the service
#
# Running it again upgrades the gateway in place; the site file, the state and the token are kept.
set -euo pipefail

PREFIX=/opt/edge-gateway
VENV="$PREFIX/venv"
CONF_DIR=/etc/edge-gateway
STATE_DIR=/var/lib/edge-gateway
SERVICE_USER=edge-gateway
UNIT_NAME=edge-gateway.service
UNIT_PATH="/etc/systemd/system/$UNIT_NAME"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

site_file=""
wheel=""
start=1

die() {
  echo "install-pi.sh: $*" >&2
  exit 1
}

step() {
  echo "==> $*"
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    --site)
      [ "$#" -ge 2 ] || die "--site needs a file"
      site_file="$2"
      shift 2
      ;;
    --wheel)
      [ "$#" -ge 2 ] || die "--wheel needs a file"
      wheel="$2"
      shift 2
      ;;
    --no-start)
      start=0
      shift
      ;;
    -h | --help)
      sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      die "unknown option $1 (see --help)"
      ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0 $*"
[ -z "$site_file" ] || [ -f "$site_file" ] || die "site file not found: $site_file"
[ -z "$wheel" ] || [ -f "$wheel" ] || die "wheel not found: $wheel"
[ -f "$REPO/pyproject.toml" ] || die "run this script from a checkout of the edge-gateway repository"
command -v systemctl >/dev/null || die "systemd is required"

arch="$(dpkg --print-architecture)"
case "$arch" in
  arm64 | armhf | amd64) ;;
  *) die "unsupported architecture $arch (arm64, armhf or amd64)" ;;
esac
# shellcheck source=/dev/null
. /etc/os-release
if [ "${VERSION_ID:-}" != "12" ]; then
  echo "warning: made for Debian 12 (bookworm); this is ${PRETTY_NAME:-unknown}" >&2
fi

step "system packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
packages=(python3 python3-venv python3-pip ca-certificates)
if [ "$arch" = "armhf" ]; then
  # 32-bit ARM: when piwheels (Raspberry Pi OS's default extra index) has no wheel, pip builds from source
  packages+=(python3-dev build-essential libffi-dev libssl-dev)
fi
apt-get install -y -qq --no-install-recommends "${packages[@]}"

step "user $SERVICE_USER"
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin \
    --comment "edge gateway" "$SERVICE_USER"
fi
# RS-485 adapters are group dialout; the unit adds the group too, this makes `sudo -u edge-gateway` tests work
usermod -a -G dialout "$SERVICE_USER"

step "virtual environment in $VENV"
install -d -m 0755 "$PREFIX"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip wheel
if [ -n "$wheel" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$wheel"
else
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$REPO"
fi

step "device profiles and rule examples in $PREFIX/firmware_configs"
rm -rf "$PREFIX/firmware_configs.new"
cp -r "$REPO/firmware_configs" "$PREFIX/firmware_configs.new"
rm -rf "$PREFIX/firmware_configs"
mv "$PREFIX/firmware_configs.new" "$PREFIX/firmware_configs"
install -m 0644 "$REPO/deploy/README.md" "$PREFIX/README.md"

step "configuration in $CONF_DIR"
install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
if [ -n "$site_file" ]; then
  install -m 0640 -o root -g "$SERVICE_USER" "$site_file" "$CONF_DIR/site.yaml"
elif [ ! -f "$CONF_DIR/site.yaml" ]; then
  echo "    no site file yet: installing the demo building (simulated devices); replace it with yours"
  install -m 0640 -o root -g "$SERVICE_USER" "$REPO/firmware_configs/sites/demo.yaml" "$CONF_DIR/site.yaml"
fi
if [ ! -f "$CONF_DIR/http-token" ]; then
  # the status page's access token, needed only when http.listen is not loopback (http.token_file: http-token)
  (umask 027 && head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$CONF_DIR/http-token")
  chown root:"$SERVICE_USER" "$CONF_DIR/http-token"
fi

step "checking $CONF_DIR/site.yaml"
# with the service's data directory, so key files relative to it are checked where `run` will look for them
if ! EDGE_GATEWAY_CONFIGS="$PREFIX/firmware_configs" "$VENV/bin/edge-gateway" check --data-dir "$STATE_DIR" \
    "$CONF_DIR/site.yaml"; then
  die "the site file has errors (above); fix it and run this script again"
fi

step "systemd unit $UNIT_PATH"
install -m 0644 "$REPO/deploy/$UNIT_NAME" "$UNIT_PATH"
systemctl daemon-reload
systemctl enable "$UNIT_NAME" >/dev/null
if [ "$start" -eq 1 ]; then
  systemctl restart "$UNIT_NAME"
  # Type=notify: restart returns once the gateway sent READY=1 (or failed)
  if systemctl is-active --quiet "$UNIT_NAME"; then
    echo "    running; status: $VENV/bin/edge-gateway status   logs: journalctl -u $UNIT_NAME -f"
  else
    systemctl --no-pager status "$UNIT_NAME" || true
    die "the service did not start (journalctl -u $UNIT_NAME)"
  fi
fi
echo "done: edge gateway installed in $PREFIX, config in $CONF_DIR, state in $STATE_DIR"
