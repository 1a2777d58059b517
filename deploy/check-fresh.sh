#!/usr/bin/env bash
# The README's promise, checked before a release: both commands work on a fresh Debian 12 machine, from a clone.
#
# Builds a minimal Debian 12 (bookworm) root with debootstrap that holds only python3, git and ca-certificates,
# clones this repository's committed HEAD into it, and runs the README's two commands there in a chroot:
#   ./deploy/demo.sh --duration 20      then      ./tests/run.sh
# The host's resolver, CA certificates, apt settings and pip settings (files, PIP_* variables and the local wheel
# directories they name, bind-mounted read-only) are copied in, so the root reaches the same package registries the
# host does. /proc, /sys, /dev, /dev/pts and /dev/shm are mounted for the chroot and unmounted on exit, even on
# failure or Ctrl-C. Each step prints its time; the last line is PASS or FAIL.
#
# Needs root, debootstrap (installed here if missing), about 300 MB of downloads and 2 GB of disk; takes 10-20
# minutes on a 2-core machine. Not part of CI.
#
#   sudo deploy/check-fresh.sh [--keep] [--dir DIR] [--mirror URL] [--log-dir DIR]
#     --keep      keep the root afterwards (it is removed by default, once nothing is mounted in it)
#     --dir DIR   build the root in DIR (must not exist; default: a new directory under /var/tmp)
#     --mirror    Debian mirror for debootstrap (default: the host's, from its apt sources)
#     --log-dir   where each step's full output goes (default: DIR.logs beside the root)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
keep=0 root="" mirror="" log_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1 ;;
    --dir) root=${2:?--dir needs a directory}; shift ;;
    --mirror) mirror=${2:?--mirror needs a URL}; shift ;;
    --log-dir) log_dir=${2:?--log-dir needs a directory}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "check-fresh.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

repo=$(cd "$(dirname "$0")/.." && pwd)
suite=bookworm
started=$SECONDS
step_started=$SECONDS
step_name=""
results=()

log() { printf '[%5ds] %s\n' "$((SECONDS - started))" "$*"; }
begin() {
  step_name=$1
  step_started=$SECONDS
  log "== $step_name"
}
finish() { # finish RESULT: record the current step's time and result
  local took=$((SECONDS - step_started))
  results+=("$(printf '%-62s %6ds  %s' "$step_name" "$took" "$1")")
  log "-- $step_name: $1 in ${took}s"
}

if [ "$(id -u)" -ne 0 ]; then
  echo "check-fresh.sh: debootstrap, mount and chroot need root: sudo $0 $*" >&2
  exit 1
fi

# -- the host's Debian mirror ---------------------------------------------------------------------------------------
host_mirror() {
  local file
  # deb822 sources: the first stanza whose Suites name the release itself (not -security)
  for file in /etc/apt/sources.list.d/*.sources; do
    [ -e "$file" ] || continue
    awk -v suite="$suite" '
      /^[[:space:]]*$/ { if (uris != "" && found) { print uris; exit } uris = ""; found = 0; next }
      tolower($1) == "uris:" { uris = $2 }
      tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) found = 1 }
      END { if (uris != "" && found) print uris }
    ' "$file" | head -n 1
  done | head -n 1
  # one-line sources: "deb [options] URL bookworm main"
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -e "$file" ] || continue
    awk -v suite="$suite" '$1 == "deb" { sub(/\[[^]]*\][[:space:]]*/, ""); if ($3 == suite) { print $2; exit } }' "$file"
  done | head -n 1
}
[ -n "$mirror" ] || mirror=$(host_mirror | head -n 1)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

if [ -z "$root" ]; then
  root=$(mktemp -d /var/tmp/edge-gateway-fresh.XXXXXX)
else
  [ ! -e "$root" ] || { echo "check-fresh.sh: $root exists; give a new directory" >&2; exit 2; }
  mkdir -p "$root"
fi
root=$(cd "$root" && pwd)
chmod 755 "$root" # it becomes "/": mktemp's 0700 would lock every user but root out of the whole system
[ -n "$log_dir" ] || log_dir="$root.logs"
mkdir -p "$log_dir"

head_commit=$(git -C "$repo" rev-parse HEAD)
log "checking $repo at $head_commit ($(git -C "$repo" log -1 --format=%s | cut -c1-80))"
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  log "note: the work tree has uncommitted changes; only the committed HEAD is checked"
fi
log "root $root, mirror $mirror, logs in $log_dir"

# -- cleanup: whatever happens, nothing stays mounted or running in the root -------------------------------------
mounted=()
mount_in_root() { # mount_in_root TARGET MOUNT-ARGS...: mount, remember for the cleanup, keep the host's /dev apart
  local target=$1
  shift
  mkdir -p "$target"
  mount "$@" "$target"
  mounted+=("$target")
  mount --make-rslave "$target"
}
verdict=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local status=$? pid target i left
  trap - EXIT INT TERM ERR
  # processes started inside the root (a test's broker, a demo) would keep its mounts busy
  for pid in /proc/[0-9]*; do
    if [ "$(readlink "$pid/root" 2>/dev/null)" = "$root" ]; then
      kill -TERM "${pid#/proc/}" 2>/dev/null || true
    fi
  done
  sleep 1
  for pid in /proc/[0-9]*; do
    if [ "$(readlink "$pid/root" 2>/dev/null)" = "$root" ]; then
      kill -KILL "${pid#/proc/}" 2>/dev/null || true
    fi
  done
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    target=${mounted[i]}
    umount "$target" 2>/dev/null || umount --lazy "$target" || log "could not unmount $target"
  done
  left=$(awk -v root="$root" '$5 == root || index($5, root "/") == 1 { print $5 }' /proc/self/mountinfo)
  if [ -n "$left" ]; then
    log "still mounted, so the root is kept: $left"
    [ "$status" -ne 0 ] || status=1
  else
    log "unmounted everything under $root"
    if [ "$keep" -eq 0 ]; then
      rm -rf --one-file-system "$root"
      log "removed $root (--keep keeps it)"
    fi
  fi
  if [ -z "$verdict" ]; then
    [ ${#results[@]} -eq 0 ] || printf '   %s\n' "${results[@]}"
    echo "FAIL: check-fresh.sh stopped early (exit $status) after $((SECONDS - started))s; see $log_dir"
  fi
  [ "$status" -ne 0 ] || [ -n "$verdict" ] || status=1
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

# -- 1. debootstrap -------------------------------------------------------------------------------------------------
begin "host: debootstrap available"
if ! command -v debootstrap >/dev/null; then
  apt-get update >"$log_dir/host-apt.log" 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >>"$log_dir/host-apt.log" 2>&1
fi
finish "ok ($(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo '?'))"

begin "debootstrap $suite (minbase + python3, git, ca-certificates)"
# the progress lines of debootstrap (I: Retrieving ..., I: Unpacking ...) are shown as they come
if debootstrap --variant=minbase --include=python3,git,ca-certificates "$suite" "$root" "$mirror" 2>&1 |
  tee "$log_dir/debootstrap.log" |
  grep --line-buffered -E '^(I: (Retrieving (InRelease|Release|Packages)|Checking|Resolving|Found|Unpacking the base|Configuring the base|Base system)|E:|W:)'; then
  :
fi
if [ ! -x "$root/usr/bin/python3" ] || ! grep -q "Base system installed successfully" "$log_dir/debootstrap.log"; then
  finish FAIL
  log "debootstrap failed; see $log_dir/debootstrap.log"
  exit 1
fi
finish "ok ($(du -sh --one-file-system "$root" | cut -f1), $(chroot "$root" dpkg-query -W -f='.\n' | wc -l) packages)"

# -- 2. the host's network, CA and package-registry settings -------------------------------------------------------
begin "copy the host's resolver, CA certificates, apt and pip settings"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
[ -s "$root/etc/hosts" ] || cp /etc/hosts "$root/etc/hosts"
# extra CAs the host trusts (a registry proxy's): kept if the root's bundle is ever rebuilt by update-ca-certificates
if [ -d /usr/local/share/ca-certificates ]; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# apt: the host's sources, keys and settings replace what debootstrap wrote
rm -f "$root/etc/apt/sources.list"
for item in sources.list sources.list.d apt.conf.d preferences.d trusted.gpg trusted.gpg.d keyrings auth.conf.d; do
  if [ -e "/etc/apt/$item" ]; then
    rm -rf "${root:?}/etc/apt/$item"
    cp -a "/etc/apt/$item" "$root/etc/apt/$item"
  fi
done
# services must not start inside a chroot (they would outlive it and share the host's ports): the usual policy-rc.d
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
# pip: global and per-user config files, the PIP_* variables, and the local directories they name
for item in /etc/pip.conf /etc/xdg/pip "$HOME/.config/pip" "$HOME/.pip"; do
  if [ -e "$item" ]; then
    target="$root${item/#$HOME//root}"
    mkdir -p "$(dirname "$target")"
    cp -a "$item" "$target"
  fi
done
pip_env=()
while IFS= read -r line; do pip_env+=("$line"); done < <(env | grep -E '^PIP_' || true)
local_dirs=$(
  {
    printf '%s\n' "${pip_env[@]}" | cut -d= -f2-
    for file in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
      [ ! -f "$file" ] || awk -F= '/^[[:space:]]*(find-links|index-url|extra-index-url)[[:space:]]*=/ { print $2 }' "$file"
    done
  } | tr -s '[:space:]' '\n' | sed -n -e 's#^file://##p' -e '\#^/#p' | sed -e 's#/simple/*$##' -e 's#/*$##' | sort -u
)
for dir in $local_dirs; do
  if [ -d "$dir" ]; then
    mount_in_root "$root$dir" --bind "$dir"
    mount -o remount,bind,ro "$root$dir"
    log "   pip: $dir bind-mounted read-only"
  fi
done
log "   pip variables: ${pip_env[*]:-none}"
finish ok

# -- 3. the clone ---------------------------------------------------------------------------------------------------
begin "git clone of the committed HEAD into /root/edge-gateway"
git clone --quiet --no-local "$repo" "$root/root/edge-gateway"
git -C "$root/root/edge-gateway" checkout --quiet --detach "$head_commit"
finish "ok ($(git -C "$root/root/edge-gateway" log -1 --format=%h))"

# -- 4. mounts for the chroot ---------------------------------------------------------------------------------------
begin "mount /proc, /sys, /dev, /dev/pts, /dev/shm"
mount_in_root "$root/proc" -t proc proc
mount_in_root "$root/sys" -t sysfs sysfs
mount_in_root "$root/dev" --bind /dev
mount_in_root "$root/dev/pts" --bind /dev/pts
mount_in_root "$root/dev/shm" --bind /dev/shm
finish ok

in_root() { # in_root COMMAND: run a shell command in the clone, in the chroot, with a clean environment
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${pip_env[@]}" \
    /bin/bash -c "cd /root/edge-gateway && $1"
}
run_step() { # run_step NAME LOG COMMAND: a README command, its output shown and kept in LOG
  begin "$1"
  set +e
  in_root "$3" 2>&1 | tee "$log_dir/$2"
  local status=${PIPESTATUS[0]}
  set -e
  return "$status"
}

overall=0
in_root "python3 --version; git --version" | sed 's/^/   /'

# -- 5. the demo ----------------------------------------------------------------------------------------------------
demo_args="--duration 20"
if (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then
  demo_args="$demo_args --http 127.0.0.1:18080"  # the chroot shares the host's network, where 8080 is taken
fi
if run_step "./deploy/demo.sh $demo_args" demo.log "./deploy/demo.sh $demo_args"; then
  if grep -q "gateway demo_tower/demo_gw up: 8 devices" "$log_dir/demo.log" &&
    grep -q "gateway stopped; outbox closed" "$log_dir/demo.log" && ! grep -q Traceback "$log_dir/demo.log"; then
    finish "PASS (exit 0, up, stopped cleanly)"
  else
    finish "FAIL (exit 0 but the log lacks the start or the clean stop)"
    overall=1
  fi
else
  finish "FAIL (exit $?)"
  overall=1
fi

# -- 6. the tests ---------------------------------------------------------------------------------------------------
if run_step "./tests/run.sh" tests.log "./tests/run.sh"; then
  finish "PASS ($(grep -E '^=+ .*(passed|failed).* in ' "$log_dir/tests.log" | tail -n 1 | tr -d '=' | xargs))"
else
  finish "FAIL ($(grep -E '^=+ .*(passed|failed|error).* in ' "$log_dir/tests.log" | tail -n 1 | tr -d '=' | xargs))"
  overall=1
fi

echo
pretty_name() { sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$1"; }
log "summary: host $(pretty_name /etc/os-release), $(uname -m), $(nproc) cores; root $(pretty_name "$root/etc/os-release"), $(in_root 'python3 --version')"
printf '   %s\n' "${results[@]}"
printf '   %-62s %6ds\n' "total" "$((SECONDS - started))"
if [ "$overall" -eq 0 ]; then
  verdict="PASS: both README commands on a fresh Debian 12 root ($head_commit)"
else
  verdict="FAIL: see $log_dir ($head_commit)"
fi
echo "$verdict"
exit "$overall"
