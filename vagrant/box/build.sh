#!/usr/bin/env bash
# Builds, or finds already built, the Debian bookworm box the Vagrant lab boots (libvirt).
#
# The VMs reach nothing but each other, so everything a node needs is in the box: systemd and
# ssh for Vagrant, the kernel with matching headers and bcc for the BPF data path, etcd, iperf3,
# the CNI plugins, and a virtualenv with flannel-bpf's Python dependencies (the project itself is
# uploaded at provisioning). The root filesystem is written straight into an ext4 image (no
# partition table: the host kernel here cannot see partitions inside an image file) and the VMs
# boot its kernel directly (libvirt kernel/initrd/cmd_line), which needs no boot loader.
#
# Cached under $CACHE/<key>/, the key a hash of this script, the packages and the Python deps:
# the same inputs reuse the box, any change builds a new one. Prints the box directory last.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${FLANNEL_BPF_BOX_CACHE:-/var/cache/flannel-bpf/vagrant}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
DISK_GB=6

GUEST_PACKAGES=(
  # what Vagrant needs of a guest
  systemd systemd-sysv dbus udev kmod openssh-server sudo ifupdown isc-dhcp-client netbase
  ca-certificates procps less rsync
  # boot: the kernel, booted directly by libvirt, and an initramfs that finds virtio disks
  linux-image-amd64 initramfs-tools
)
# The node itself: the very list `scripts/setup.sh --node` installs, so provisioning finds every
# package present and needs no network.
mapfile -t NODE_PACKAGES < <(bash "$ROOT/scripts/setup.sh" --list-packages node)
PACKAGES=("${GUEST_PACKAGES[@]}" "${NODE_PACKAGES[@]}")

say() { printf 'box: %s\n' "$*" >&2; }
die() { printf 'box: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, mkfs)"

# The project's runtime dependencies, installed into the box's venv as wheels.
deps=$(python3 - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
EOF
)
mapfile -t requirements <<<"$deps"
KEY=$( { cat "$0"; printf '%s\n' "${PACKAGES[@]}" "${requirements[@]}"; } | sha256sum | cut -c1-16)
OUT=$CACHE/$KEY
if [ -f "$OUT/flannel-bpf-node.box" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ]; then
  say "reusing $OUT"
  echo "$OUT"
  exit 0
fi

for tool in debootstrap:debootstrap qemu-img:qemu-utils mkfs.ext4:e2fsprogs; do
  command -v "${tool%%:*}" >/dev/null || {
    say "installing ${tool##*:}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tool##*:}" >/dev/null
  }
done
VAGRANT_KEY=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1)
[ -n "$VAGRANT_KEY" ] || die "Vagrant's insecure public key not found: install the vagrant package"

WORK=$(mktemp -d "${CACHE%/*}/build.XXXXXX" 2>/dev/null || { mkdir -p "${CACHE%/*}"; mktemp -d "${CACHE%/*}/build.XXXXXX"; })
ROOTFS=$WORK/rootfs
cleanup() {
  for mount in dev/pts dev proc sys; do
    mountpoint -q "$ROOTFS/$mount" 2>/dev/null && umount -l "$ROOTFS/$mount"
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

started=$(date +%s)
say "debootstrap $SUITE from $MIRROR (${#PACKAGES[@]} packages and their dependencies)"
include=$(IFS=,; echo "${PACKAGES[*]}")
debootstrap --variant=minbase --include="$include" "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
say "debootstrap done in $(( $(date +%s) - started )) s"

in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
mount -t proc proc "$ROOTFS/proc"
mount -t sysfs sysfs "$ROOTFS/sys"
mount --bind /dev "$ROOTFS/dev"
mount --bind /dev/pts "$ROOTFS/dev/pts"

say "configuring the guest"
echo "fbnode" >"$ROOTFS/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 fbnode\n' >"$ROOTFS/etc/hosts"
echo "LABEL=root / ext4 defaults,noatime 0 1" >"$ROOTFS/etc/fstab"
cat >"$ROOTFS/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback

# Vagrant's management NIC; the private network (eth1) is configured by Vagrant.
auto eth0
iface eth0 inet dhcp

source /etc/network/interfaces.d/*
EOF
mkdir -p "$ROOTFS/etc/network/interfaces.d"
# Every VM must get its own identity on first boot: machine-id (also the DHCP client id) and
# ssh host keys.
: >"$ROOTFS/etc/machine-id"
rm -f "$ROOTFS"/etc/ssh/ssh_host_*
cat >"$ROOTFS/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Generate this VM's ssh host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable ssh-host-keys.service >/dev/null 2>&1
# Services the lab starts itself, on the nodes that need them; apt's timers have no network.
in_root systemctl disable etcd.service apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1 || true
in_root systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true

in_root useradd --create-home --shell /bin/bash vagrant
install -d -m 700 -o 1000 -g 1000 "$ROOTFS/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$VAGRANT_KEY" "$ROOTFS/home/vagrant/.ssh/authorized_keys"
echo "vagrant ALL=(ALL) NOPASSWD: ALL" >"$ROOTFS/etc/sudoers.d/vagrant"
chmod 440 "$ROOTFS/etc/sudoers.d/vagrant"
echo "UseDNS no" >"$ROOTFS/etc/ssh/sshd_config.d/vagrant.conf"

# bcc compiles against /lib/modules/<release>/build: the headers package provides it.
release=$(ls "$ROOTFS/lib/modules" | sort -V | tail -n1)
in_root test -e "/lib/modules/$release/build/Makefile" || die "no kernel headers for the guest kernel $release"

say "Python dependencies into /opt/flannel-bpf/venv (wheels fetched here, installed offline there)"
mkdir -p "$ROOTFS/opt/flannel-bpf/wheels"
python3 -m pip download --quiet --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --implementation cp \
  -d "$ROOTFS/opt/flannel-bpf/wheels" "${requirements[@]}" setuptools wheel
printf '%s\n' "${requirements[@]}" >"$ROOTFS/opt/flannel-bpf/requirements.txt"
in_root python3 -m venv --system-site-packages /opt/flannel-bpf/venv
in_root /opt/flannel-bpf/venv/bin/pip install --quiet --no-index --find-links /opt/flannel-bpf/wheels \
  -r /opt/flannel-bpf/requirements.txt

in_root apt-get clean
for mount in dev/pts dev proc sys; do umount -l "$ROOTFS/$mount"; done

say "writing the image"
mkdir -p "$WORK/box"
cp "$ROOTFS/boot/vmlinuz-$release" "$WORK/vmlinuz"
cp "$ROOTFS/boot/initrd.img-$release" "$WORK/initrd.img"
truncate -s "${DISK_GB}G" "$WORK/root.img"
mkfs.ext4 -q -L root -d "$ROOTFS" "$WORK/root.img"
qemu-img convert -O qcow2 "$WORK/root.img" "$WORK/box/box.img"
cat >"$WORK/box/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $DISK_GB}
EOF
tar -C "$WORK/box" -cf "$WORK/flannel-bpf-node.box" metadata.json box.img

# One box is kept: older builds (other keys) would only fill the disk.
for old in "$CACHE"/*/; do
  [ -f "$old/flannel-bpf-node.box" ] && [ "${old%/}" != "$OUT" ] && rm -rf "$old" && say "removed the older box ${old%/}"
done
mkdir -p "$OUT"
mv "$WORK/vmlinuz" "$WORK/initrd.img" "$OUT/"
echo "$release" >"$OUT/kernel-release"
mv "$WORK/flannel-bpf-node.box" "$OUT/"
say "built $OUT in $(( $(date +%s) - started )) s (guest kernel $release)"
echo "$OUT"
