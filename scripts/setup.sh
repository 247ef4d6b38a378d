#!/usr/bin/env bash
# Brings a fresh Debian 12 machine (as root) to the point where flannel-bpf builds, tests and
# runs its lab. Idempotent: every step checks first and says in one line what it did or found.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

APT_PACKAGES=(
  # control plane and its tests
  etcd-server etcd-client python3-venv python3-dev
  # data path: bcc and the kernel headers it compiles against
  bpfcc-tools python3-bpfcc linux-headers-amd64 bpftool
  # the kernel plumbing the backends and the lab drive
  iproute2 iputils-ping iptables nftables ethtool kmod tcpdump procps
  # lab pods, benchmarks and observability
  containernetworking-plugins iperf3 qperf prometheus curl
)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt, bpffs and network namespaces need it)"

install_apt_packages() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "system packages: all ${#APT_PACKAGES[@]} present"
    return
  fi
  say "system packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes
  apt-get update -qq
  # etcd-server and prometheus ship units that would start services on install; the project
  # starts its own instances on private ports and data dirs instead.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' RETURN
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

link_kernel_headers() {
  local mod="/lib/modules/$(uname -r)"
  if [ -e "$mod/build/include/linux/kconfig.h" ] || [ -e "$mod/build/include/generated/autoconf.h" ]; then
    say "kernel headers: $mod/build present"
    return
  fi
  # No headers exist for this running kernel; bcc only needs a consistent header tree, and the
  # distribution's newest one works for the BTF-enabled kernels we target (newer uapi constants
  # are defined in bpf/ ourselves).
  local amd64 common
  amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$amd64" ] && [ -n "$common" ] || die "kernel headers: no /usr/src/linux-headers-*-amd64 and *-common; is linux-headers-amd64 installed?"
  mkdir -p "$mod"
  ln -sfn "$amd64" "$mod/build"
  ln -sfn "$common" "$mod/source"
  say "kernel headers: none for $(uname -r); linked build -> $amd64, source -> $common"
}

mount_bpffs() {
  # /sys/fs/bpf for the root namespace; /run/flannel-bpf/bpffs because `ip netns exec` remounts
  # /sys and would hide the first from agents in the lab's namespaces.
  local dir made=()
  for dir in /sys/fs/bpf /run/flannel-bpf/bpffs; do
    if ! mount -t bpf | grep -q " $dir "; then
      mkdir -p "$dir"
      mount -t bpf bpffs "$dir"
      made+=("$dir")
    fi
  done
  if [ ${#made[@]} -eq 0 ]; then
    say "bpffs: already mounted at /sys/fs/bpf and /run/flannel-bpf/bpffs"
  else
    say "bpffs: mounted ${made[*]}"
  fi
}

create_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    say "venv: created $VENV from /usr/bin/python3 with system site packages (for bcc)"
  fi
  local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ -e "$stamp" ]; then
    say "venv: project, test and bench extras installed"
    return
  fi
  if ! "$VENV/bin/python" -m pip install -q -e '.[test,bench]' >"$VENV/pip-install.log" 2>&1; then
    cat "$VENV/pip-install.log" >&2
    die "pip install of the project failed (log above)"
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
  say "venv: installed flannel-bpf with its test and bench extras"
}

install_apt_packages
link_kernel_headers
mount_bpffs
create_venv
