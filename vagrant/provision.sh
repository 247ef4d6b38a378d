#!/usr/bin/env bash
# Provisions one VM of the Vagrant lab; idempotent, so `vagrant provision` may run it again.
#   provision.sh etcd ADDRESS OVERLAY         etcd for the lab, the overlay's config written once
#   provision.sh worker ADDRESS ETCD_ADDRESS  flannel-bpf as the packaged systemd unit, two pods
# Installation is scripts/setup.sh --node, the same steps as on any machine; pods are attached by
# `flannel-bpf lab attach-pods` through /etc/cni/net.d's list, as the namespace lab attaches them.
set -euo pipefail

ROLE=${1:?role: etcd or worker}
ADDRESS=${2:?the private address of this VM}
SRC=/opt/flannel-bpf/src
say() { printf 'provision(%s): %s\n' "$ROLE" "$*"; }

# The private NIC is the one holding ADDRESS; Vagrant's NAT/management NIC (10.0.2.15 on
# VirtualBox) is the same on every VM and must never carry the overlay.
NIC=$(ip -o -4 addr show | awk -v a="$ADDRESS" '$4 ~ "^"a"/" {print $2; exit}')
[ -n "$NIC" ] || { echo "provision: no NIC holds $ADDRESS" >&2; exit 1; }

rm -rf "$SRC.new" && mkdir -p "$SRC.new"
tar -xzf /tmp/flannel-bpf-src.tar.gz -C "$SRC.new"
rm -rf "$SRC" && mv "$SRC.new" "$SRC"
bash "$SRC/scripts/setup.sh" --node

case $ROLE in
etcd)
  OVERLAY=${3:?overlay network}
  cat >/etc/default/etcd <<EOF
ETCD_LISTEN_CLIENT_URLS=http://$ADDRESS:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$ADDRESS:2379
EOF
  systemctl enable etcd.service 2>/dev/null
  systemctl restart etcd.service
  for _ in $(seq 100); do
    ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:2379" endpoint health >/dev/null 2>&1 && break
    sleep 0.3
  done
  key=/coreos.com/network/config
  if [ -z "$(ETCDCTL_API=3 etcdctl get --print-value-only "$key")" ]; then
    ETCDCTL_API=3 etcdctl put "$key" "{\"Network\": \"$OVERLAY\", \"Backend\": {\"Type\": \"vxlan\"}}" >/dev/null
    say "wrote $key: $OVERLAY, vxlan"
  else
    say "$key already set: $(ETCDCTL_API=3 etcdctl get --print-value-only "$key")"
  fi
  ;;
worker)
  ETCD=${3:?etcd address}
  install -m 644 "$SRC/packaging/systemd/flannel-bpf.service" /etc/systemd/system/flannel-bpf.service
  # The example environment file with this lab's values: a node is configured the documented way.
  sed -e "s|^FLANNELD_ETCD_ENDPOINTS=.*|FLANNELD_ETCD_ENDPOINTS=http://$ETCD:2379|" \
      -e "/^FLANNELD_ETCD_\(CA\|CERT\|KEY\)FILE=/d" \
      -e "s|^FLANNELD_IFACE=.*|FLANNELD_IFACE=$NIC|" \
      -e "s|^FLANNELD_METRICS_ADDR=.*|FLANNELD_METRICS_ADDR=$ADDRESS:9867|" \
      "$SRC/packaging/flannel-bpf.env.example" >/etc/default/flannel-bpf
  # The CNI set-up of a flannel node: the flannel plugin (from the host's build, Debian has
  # none) beside Debian's plugins, and the configuration list the DaemonSet would install.
  install -D -m 755 /tmp/flannel-cni /opt/cni/bin/flannel
  install -D -m 644 "$SRC/packaging/cni/10-flannel.conflist" /etc/cni/net.d/10-flannel.conflist
  systemctl daemon-reload
  sysctl -qw net.ipv4.ip_forward=1
  # Type=notify: restart returns once the agent holds a lease and wrote subnet.env.
  systemctl enable flannel-bpf.service 2>/dev/null
  systemctl restart flannel-bpf.service
  say "flannel-bpf on $NIC ($ADDRESS): $(grep FLANNEL_SUBNET /run/flannel/subnet.env)"
  flannel-bpf lab attach-pods --count 2
  ;;
*)
  echo "provision: unknown role $ROLE" >&2
  exit 2
  ;;
esac
