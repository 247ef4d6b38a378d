#!/usr/bin/env bash
# Brings a Debian 12 machine (as root) to the point where flannel-bpf builds, tests and runs.
# Idempotent: every step checks first and says in one line what it did or found. One copy of the
# steps for every kind of machine the project runs on:
#   setup.sh                 a developer's or CI machine: node packages plus test and lab tools,
#                            the project editable in .venv with its test and bench extras, and
#                            the real flanneld, Kubernetes and etcd built from Go modules
#   setup.sh --node          a cluster node (the Vagrant VMs run this): node packages, the project
#                            in /opt/flannel-bpf/venv, /usr/local/bin/flannel-bpf; offline when
#                            /opt/flannel-bpf/wheels holds the dependencies (the lab's box)
#   setup.sh --vm-host       what booting the Vagrant lab here needs (libvirt, QEMU, Vagrant)
#   setup.sh --list-packages ROLE   the Debian packages of a role (node, dev, vm-host), one a line
set -euo pipefail

cd "$(dirname "$0")/.."

NODE_PACKAGES=(
  # control plane: etcd (the lab's store) and the agent's Python
  etcd-server etcd-client python3 python3-venv
  # data path: bcc and the kernel headers it compiles against
  bpfcc-tools python3-bpfcc linux-headers-amd64 bpftool
  # the kernel plumbing the backends and the lab drive
  iproute2 iputils-ping iptables nftables ethtool kmod tcpdump procps
  # pods attached the way flannel's CNI plugin does, and traffic to try the overlay with
  containernetworking-plugins iperf3 curl
)
DEV_PACKAGES=(
  "${NODE_PACKAGES[@]}"
  # building wheels, benchmarks, the lab's Prometheus
  python3-dev qperf prometheus
  # trafgen: 64-byte packets from a pod faster than any socket sends them (bench/)
  netsniff-ng
)
VM_HOST_PACKAGES=(
  # the Vagrant lab: software-emulated VMs under a libvirtd of our own, and the box's builder
  vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
  dnsmasq-base debootstrap e2fsprogs
)

ROLE=dev
case "${1:-}" in
  "") ;;
  --node) ROLE=node ;;
  --vm-host) ROLE=vm-host ;;
  --list-packages)
    case "${2:-}" in
      node) printf '%s\n' "${NODE_PACKAGES[@]}" ;;
      dev) printf '%s\n' "${DEV_PACKAGES[@]}" ;;
      vm-host) printf '%s\n' "${VM_HOST_PACKAGES[@]}" ;;
      *) echo "usage: $0 --list-packages node|dev|vm-host" >&2; exit 2 ;;
    esac
    exit 0 ;;
  *) echo "usage: $0 [--node | --vm-host | --list-packages ROLE]" >&2; exit 2 ;;
esac
case $ROLE in
  dev) VENV=${VENV:-.venv}; APT_PACKAGES=("${DEV_PACKAGES[@]}") ;;
  node) VENV=${VENV:-/opt/flannel-bpf/venv}; APT_PACKAGES=("${NODE_PACKAGES[@]}") ;;
  vm-host) APT_PACKAGES=("${VM_HOST_PACKAGES[@]}") ;;
esac

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

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    say "venv: created $VENV from /usr/bin/python3 with system site packages (for bcc)"
  fi
}

create_venv() {
  ensure_venv
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

install_node_venv() {
  # A node runs the project as built from this tree, not editable, with the same dependencies;
  # the box carries them as wheels because its VMs reach no registry.
  local pip_args=(-q)
  [ -d /opt/flannel-bpf/wheels ] && pip_args+=(--no-index --find-links /opt/flannel-bpf/wheels)
  ensure_venv
  if ! "$VENV/bin/python" -m pip install "${pip_args[@]}" . >"$VENV/pip-install.log" 2>&1; then
    cat "$VENV/pip-install.log" >&2
    die "pip install of the project into $VENV failed (log above)"
  fi
  ln -sfn "$VENV/bin/flannel-bpf" /usr/local/bin/flannel-bpf
  say "venv: $("$VENV/bin/flannel-bpf" version 2>/dev/null | head -n1) in $VENV, linked from /usr/local/bin"
}

prepare_kvm_device() {
  # Debian's udev rule makes /dev/kvm 0660 root:kvm. Where it is left 0600 root, libvirt decides
  # KVM is unusable for its qemu user and probes QEMU again on every call (a minute per define).
  [ -c /dev/kvm ] || return 0
  if [ "$(stat -c %a:%G /dev/kvm)" != "660:kvm" ]; then
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm
    say "/dev/kvm: set to Debian's 0660 root:kvm"
  fi
}

build_peers() {
  # The real flanneld, Kubernetes control plane and etcd the suite, the lab and the benchmarks
  # run beside flannel-bpf: built from Go modules, cached by version (scripts/build-peers.sh).
  bash scripts/build-peers.sh all
}

install_apt_packages
case $ROLE in
  dev) link_kernel_headers; mount_bpffs; create_venv; build_peers ;;
  node) link_kernel_headers; mount_bpffs; install_node_venv ;;
  vm-host) prepare_kvm_device ;;
esac
