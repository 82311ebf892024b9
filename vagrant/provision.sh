#!/usr/bin/env bash
# Provision a Debian guest for ebpf-guard: the one script used by the Vagrantfile and by the
# QEMU harness (vagrant/qemu.sh). Run as root inside the guest, from the repository copy:
#   bash vagrant/provision.sh          # set up through scripts/bootstrap.sh setup, then report
#   bash vagrant/provision.sh kernel   # online guests: the distro's current kernel + its headers
#                                      # (reboot afterwards; the Vagrantfile does)
# Offline: when the image carries wheels in /opt/ebpf-guard-wheels (qemu.sh builds it so, with
# every apt package already installed), pip uses them and no index; nothing needs the network.
set -euo pipefail

REPO="${EBPF_GUARD_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
WHEELS=/opt/ebpf-guard-wheels
say() { printf 'provision: %s\n' "$*"; }
die() { printf 'provision: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo bash vagrant/provision.sh)"
grep -qi '^ID=debian' /etc/os-release || die "only Debian guests are provisioned here"
[ -f "$REPO/scripts/bootstrap.sh" ] || die "no scripts/bootstrap.sh under $REPO (set EBPF_GUARD_REPO)"

# pip settings of whoever called us (a host's PIP_FIND_LINKS, say) must not leak in.
for v in $(compgen -e | grep '^PIP_' || true); do unset "$v"; done

provision_kernel() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends linux-image-amd64 linux-headers-amd64 >/dev/null
  local newest; newest="$(ls /lib/modules | sort -V | tail -1)"
  if [ "$newest" = "$(uname -r)" ]; then
    say "kernel: running $newest, the distro's current kernel"
  else
    say "kernel: running $(uname -r), installed $newest: reboot to use it"
  fi
}

provision_setup() {
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "offline: pip uses only the wheels in $WHEELS; no corpus toolchain (the image has none)"
    EBPF_GUARD_CORPUS_TOOLS=0 PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS" bash "$REPO/scripts/bootstrap.sh" setup
  else
    bash "$REPO/scripts/bootstrap.sh" setup
  fi
}

# What kind of host this is, in the terms the project cares about.
report() {
  local fs lines lsm="?"
  fs="$(stat -fc %T /sys/fs/cgroup)"
  lines="$(wc -l < /proc/self/cgroup)"
  if [ "$fs" = cgroup2fs ] && [ "$lines" = 1 ]; then
    say "cgroup: pure v2 at /sys/fs/cgroup ($(cat /proc/self/cgroup))"
  else
    say "cgroup: NOT pure v2 (/sys/fs/cgroup is $fs, $lines lines in /proc/self/cgroup)"
  fi
  [ -r /sys/kernel/security/lsm ] || mount -t securityfs none /sys/kernel/security 2>/dev/null || true
  [ -r /sys/kernel/security/lsm ] && lsm="$(cat /sys/kernel/security/lsm)"
  say "kernel: $(uname -r); LSMs: $lsm; $(. /etc/os-release; echo "$PRETTY_NAME"); python $(python3 -V | cut -d' ' -f2)"
}

case "${1:-setup}" in
  setup) t0=$SECONDS; provision_setup; report; say "done in $((SECONDS - t0)) s" ;;
  kernel) provision_kernel ;;
  *) die "usage: provision.sh [setup|kernel]" ;;
esac
