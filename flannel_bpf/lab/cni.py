"""Pods attached the way a container runtime attaches them on a flannel node: the node's CNI
network configuration list (kube-flannel's `cni-conf.json`: the flannel plugin, then portmap) run
plugin by plugin as libcni runs a list (CNI spec 0.4.0): ADD in order, each plugin given the
previous one's result as `prevResult`; DEL in reverse order.

Every plugin is the real one: the flannel plugin (built by scripts/build-peers.sh, Debian has
none) reads the node's subnet.env and delegates to Debian's bridge and host-local plugins. The
lab only points the flannel plugin at the node's own files, since the lab's nodes share one
filesystem where real nodes each have /run/flannel and /var/lib/cni to themselves.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
from collections.abc import Sequence
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from flannel_bpf.lab.netns import in_netns

# Where CNI plugins are installed: Debian's containernetworking-plugins, then the usual place.
CNI_PATHS = ("/usr/lib/cni", "/opt/cni/bin")
# The configuration list every flannel node has in /etc/cni/net.d (kube-flannel's cni-conf.json).
NODE_CONFLIST = Path(__file__).resolve().parents[2] / "packaging" / "cni" / "10-flannel.conflist"


class CniError(RuntimeError):
    pass


def plugin_dirs() -> list[str]:
    """CNI_PATH for the runtime: the installed plugins, then the flannel plugin's build."""
    from flannel_bpf.lab.peers import PeerMissing, peer

    dirs = list(CNI_PATHS)
    with contextlib.suppress(PeerMissing):  # then a missing flannel plugin is named on use
        dirs.append(str(peer("flannel-cni").directory))
    return dirs


def find_plugin(name: str, dirs: Sequence[str]) -> str:
    for directory in dirs:
        path = Path(directory, name)
        if os.access(path, os.X_OK):
            return str(path)
    hint = " (scripts/build-peers.sh flannel-cni builds it)" if name == "flannel" else ""
    raise CniError(f"CNI plugin {name!r} not found in {':'.join(dirs)}{hint}")


def load_conflist(path: Path) -> dict[str, Any]:
    try:
        conflist = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CniError(f"CNI configuration list {path}: {exc}") from None
    if not isinstance(conflist, dict) or not isinstance(conflist.get("plugins"), list):
        raise CniError(f"CNI configuration list {path}: no 'plugins' list")
    return conflist


def for_node(conflist: dict[str, Any], subnet_file: Path, data_dir: Path) -> dict[str, Any]:
    """The cluster's list with one node's paths in the flannel plugin's entry: its subnet.env,
    the flannel plugin's scratch directory and host-local's store (options both plugins have)."""
    out = copy.deepcopy(conflist)
    for plugin in out["plugins"]:
        if plugin.get("type") == "flannel":
            plugin["subnetFile"] = str(subnet_file)
            plugin["dataDir"] = str(data_dir / "flannel")
            ipam = plugin.setdefault("ipam", {})
            ipam["dataDir"] = str(data_dir / "networks")
    return out


def _run(command: str, plugin_conf: dict[str, Any], container_id: str, netns: str,
         ifname: str, node_ns: str | None, dirs: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    env = {
        **os.environ,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": ":".join(dirs),
    }
    plugin = find_plugin(str(plugin_conf.get("type", "")), dirs)
    proc = subprocess.run(
        in_netns(node_ns, [plugin]),
        input=json.dumps(plugin_conf).encode(),
        capture_output=True,
        env=env,
        timeout=60,
    )
    if proc.returncode != 0:
        # A failing plugin prints a CNI error object ({"code", "msg", "details"}) on stdout.
        detail = (proc.stdout or proc.stderr).decode(errors="replace").strip()
        raise CniError(f"CNI {command} {plugin_conf.get('type')} for {container_id}: {detail}")
    result: dict[str, Any] = json.loads(proc.stdout or b"{}")
    return result


def _plugin_conf(conflist: dict[str, Any], plugin: dict[str, Any]) -> dict[str, Any]:
    return {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}


def add(conflist: dict[str, Any], container_id: str, netns: str, node_ns: str | None,
        ifname: str = "eth0") -> dict[str, Any]:  # fmt: skip
    """ADD through every plugin of the list; the last plugin's result (the pod's addresses)."""
    dirs = plugin_dirs()
    result: dict[str, Any] | None = None
    for plugin in conflist["plugins"]:
        conf = _plugin_conf(conflist, plugin)
        if result is not None:
            conf["prevResult"] = result
        result = _run("ADD", conf, container_id, netns, ifname, node_ns, dirs)
    return result or {}


def delete(conflist: dict[str, Any], container_id: str, netns: str, node_ns: str | None,
           ifname: str = "eth0") -> None:  # fmt: skip
    """DEL through every plugin, last first; a plugin whose state is gone succeeds (spec)."""
    dirs = plugin_dirs()
    for plugin in reversed(conflist["plugins"]):
        _run("DEL", _plugin_conf(conflist, plugin), container_id, netns, ifname, node_ns, dirs)


def ipv6_conflist(subnet_file: Path, data_dir: Path) -> dict[str, Any]:
    """A dual-stack or IPv6-only node's list: what the flannel plugin hands the bridge plugin
    when subnet.env carries FLANNEL_IPV6_* (flannel-io/cni-plugin's delegate: one host-local
    range per family present, a route to each cluster network, ipMasq unless flanneld
    masquerades), then portmap.

    The flannel plugin that can be built here (containernetworking/plugins v0.9.1; its newer
    home flannel-io/cni-plugin is not served by the module proxy) predates IPv6, so the lab
    writes that delegate itself from the node's subnet.env, the same file the plugin reads."""
    try:
        env = dict(
            line.split("=", 1) for line in subnet_file.read_text().splitlines() if "=" in line
        )
        # The plugin parses each subnet with net.ParseCIDR: host-local gets the network.
        families = [("FLANNEL_SUBNET", "FLANNEL_NETWORK")] if "FLANNEL_SUBNET" in env else []
        families.append(("FLANNEL_IPV6_SUBNET", "FLANNEL_IPV6_NETWORK"))
        ranges = [[{"subnet": str(ip_network(env[key], strict=False))}] for key, _ in families]
        routes = [{"dst": env[network]} for _, network in families]
        mtu = int(env["FLANNEL_MTU"])
    except (OSError, KeyError, ValueError) as exc:
        raise CniError(f"{subnet_file}: no IPv6 in this subnet.env ({exc})") from None
    bridge = {
        "type": "bridge",
        "bridge": "cni0",
        "mtu": mtu,
        "ipMasq": env.get("FLANNEL_IPMASQ") != "true",
        "isGateway": True,
        "hairpinMode": True,
        "isDefaultGateway": True,
        "ipam": {
            "type": "host-local",
            "dataDir": str(data_dir / "networks"),
            "ranges": ranges,
            "routes": routes,
        },
    }
    portmap = {"type": "portmap", "capabilities": {"portMappings": True}}
    return {"name": "cbr0", "cniVersion": "0.4.0", "plugins": [bridge, portmap]}
