#!/usr/bin/env bash
# One entry point for setting up a Debian/Ubuntu host and running ebpf-guard.
#   sudo bash scripts/bootstrap.sh demo   # set up, then run the misbehaving example agent
#   sudo bash scripts/bootstrap.sh test   # set up, then run the whole test suite
#   sudo bash scripts/bootstrap.sh setup  # set up only
# Every step is idempotent: a second run only re-checks.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo bash scripts/bootstrap.sh ${1:-setup})"
command -v apt-get >/dev/null || die "only Debian/Ubuntu (apt-get) hosts are supported"

KREL="$(uname -r)"
ARCH="$(dpkg --print-architecture)"
APT_PACKAGES=(python3-bpfcc python3-venv python3-pip iproute2 procps kmod util-linux ca-certificates curl git)
# The benign corpus (tests/corpus/benign/) runs a coding agent's real tools: a C build, a wheel
# built offline, npm from a local tarball (npm: only where no node install brings its own).
CORPUS_PACKAGES=(build-essential python3-setuptools python3-wheel)
# Only the HTML report render test needs a browser. On Ubuntu `chromium` is a snap shim that
# fails in containers, so it is Debian-only; the test says so when it skips. bpftool: only the
# BTF test's cross-check uses it (Ubuntu ships it inside linux-tools instead).
OPTIONAL_PACKAGES=(chromium bpftool)

apt_updated=0
apt_update_once() { [ "$apt_updated" = 1 ] || { say "apt-get update"; apt-get update -qq; apt_updated=1; }; }
apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  apt_update_once
  say "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup_packages() {
  apt_install "${APT_PACKAGES[@]}"
  if [ "${EBPF_GUARD_CORPUS_TOOLS:-1}" = 1 ]; then
    apt_install "${CORPUS_PACKAGES[@]}"
    command -v npm >/dev/null || apt_install npm
  else
    # The offline guest images (vagrant/qemu.sh) carry no build toolchain: corpus entries whose
    # tool is missing skip and say which.
    say "EBPF_GUARD_CORPUS_TOOLS=0: not installing the corpus's tools (${CORPUS_PACKAGES[*]} npm)"
  fi
  if grep -qi '^ID=debian' /etc/os-release; then
    apt_install "${OPTIONAL_PACKAGES[@]}" || say "optional packages unavailable: ${OPTIONAL_PACKAGES[*]} (the HTML render test and the bpftool cross-check will skip)"
  else
    say "not Debian: skipping optional ${OPTIONAL_PACKAGES[*]} (the HTML render test and the bpftool cross-check will skip)"
  fi
}

# bcc compiles BPF C against kernel headers. Prefer headers that match the running kernel;
# when the distro has none (custom/cloud kernels), fall back to the distro's generic headers
# and say so: their struct layouts may then differ, which is why bpf/ reads kernel structs only
# through offsets taken from the running kernel's BTF (ebpf_guard/sensor/btf.py).
setup_headers() {
  local mod="/lib/modules/$KREL"
  if [ -e "$mod/build/include/linux/kconfig.h" ] || [ -e "$mod/build/Makefile" ]; then
    if [ -L "$mod/build" ] && [ -f "$mod/.ebpf-guard-fallback" ]; then
      say "headers: FALLBACK $(readlink "$mod/build") (no package matches $KREL)"
    else
      say "headers: matching $KREL"
    fi
    return 0
  fi
  apt_update_once
  if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
    apt_install "linux-headers-$KREL"
    say "headers: installed matching linux-headers-$KREL"
    return 0
  fi
  apt_install "linux-headers-$ARCH"
  local build common
  build="$(ls -d /usr/src/linux-headers-*-"$ARCH" 2>/dev/null | sort -V | tail -1)"
  common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)"
  [ -n "$build" ] || die "no kernel headers found under /usr/src after installing linux-headers-$ARCH"
  mkdir -p "$mod"
  ln -sfn "$build" "$mod/build"
  ln -sfn "${common:-$build}" "$mod/source"
  echo "$build" > "$mod/.ebpf-guard-fallback"
  say "headers: FALLBACK no linux-headers-$KREL in the distro; linked $mod/build -> $build (generic headers)"
}

setup_tracefs() {
  if [ -e /sys/kernel/tracing/events/syscalls ]; then say "tracefs: mounted"; return 0; fi
  mount -t tracefs nodev /sys/kernel/tracing
  say "tracefs: mounted at /sys/kernel/tracing"
}

# Debian's python3-bpfcc installs bcc for the distro python (/usr/bin/python3) only, so the
# project venv is built from that interpreter with system site-packages visible.
setup_venv() {
  local py=/usr/bin/python3
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import bcc" 2>/dev/null; then
    rm -rf "$VENV"
    "$py" -m venv --system-site-packages "$VENV"
    say "venv: created $VENV from $py (system site-packages, sees bcc)"
  fi
  local stamp="$VENV/.installed-$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO[test]"
    rm -f "$VENV"/.installed-*; touch "$stamp"
    say "venv: installed ebpf-guard and test dependencies"
  fi
  "$VENV/bin/python" -c "import bcc" || die "the venv cannot import bcc"
}

# `sudo ebpf-guard ...` works from anywhere: a link to the venv's entry point.
setup_command() {
  local link=/usr/local/bin/ebpf-guard
  if [ "$(readlink "$link" 2>/dev/null)" != "$VENV/bin/ebpf-guard" ]; then
    ln -sfn "$VENV/bin/ebpf-guard" "$link"
    say "command: linked $link -> $VENV/bin/ebpf-guard"
  fi
}

setup() { setup_packages; setup_headers; setup_tracefs; setup_venv; setup_command; }

case "${1:-setup}" in
  setup) setup ;;
  demo)  setup; shift; exec "$VENV/bin/python" "$REPO/examples/demo.py" "$@" ;;
  test)  setup; shift; cd "$REPO"; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) die "usage: bootstrap.sh setup|demo|test" ;;
esac
