"""The BPF data path end to end in the namespace lab: real agents, real etcd, real CNI pods.

Each test reads the programs' own counters (`flannel-bpf status`) to show that the BPF path, not
the kernel fallback, carried the traffic.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from flannel_bpf.datapath import loader
from flannel_bpf.datapath.bpf_maps import PinnedMaps, Remote
from flannel_bpf.lab import lab
from flannel_bpf.lab.lab import STATE_ROOT

from .conftest import cli, pod_exec, requires_root
from .test_lab_backends import FAKE_KEY, FAKE_SUBNET, etcdctl

pytestmark = [pytest.mark.root, requires_root]

GB = 1024**3
Counters = dict[tuple[str, str], tuple[int, int]]


def node_status(lab_name: str, node: str) -> dict[str, Any]:
    status_file = str(STATE_ROOT / lab_name / node / "status.json")
    proc = cli("status", "-o", "json", "--status-file", status_file, netns=node)
    assert proc.stdout, proc.stderr
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def bpf_remotes(lab_name: str, node: str) -> dict[str, str]:
    """The node's BPF remote map, from `flannel-bpf status`: peer subnet -> VTEP IP."""
    bpf = node_status(lab_name, node).get("bpf") or {}
    return {r["subnet"]: r["vtep_ip"] for r in bpf.get("remotes", [])}


def counters_in(status: dict[str, Any]) -> Counters:
    """The BPF counters of a `flannel-bpf status -o json` document, by (hook, reason)."""
    bpf = status.get("bpf") or {}
    return {(c["hook"], c["reason"]): (c["packets"], c["bytes"]) for c in bpf.get("counters", [])}


def counters(lab_name: str, node: str) -> Counters:
    return counters_in(node_status(lab_name, node))


def delta(after: Counters, before: Counters, hook: str, reason: str) -> tuple[int, int]:
    a, b = after.get((hook, reason), (0, 0)), before.get((hook, reason), (0, 0))
    return a[0] - b[0], a[1] - b[1]


@contextmanager
def iperf_server(pod: str, port: int = 5201) -> Iterator[None]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", pod, "iperf3", "-s", "-1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.4)
        yield
    finally:
        server.kill()
        server.wait()


# net.ipv4.tcp_wmem[2] + tcp_rmem[2], a namespace's defaults on this kernel (4 MiB + 32 MiB): the
# sender's unsent and unacknowledged bytes plus what the receiver holds unread.
IN_FLIGHT_AT_MOST = (4 + 32) * 1024**2


@dataclass(frozen=True)
class Transfer:
    gbits: float
    received: int  # bytes the receiving iperf3 counted: each of them crossed both data paths


def transfer(lab_name: str, src: dict[str, Any], dst: dict[str, Any], size: str = "1G") -> Transfer:
    """A TCP transfer of size (1G or N M) from pod src to pod dst. iperf3's server stops reading
    as soon as the client says it is done, so the last segments still in flight can be reset and
    never cross: counters of a path are held to what the server received (Transfer.received).
    What may be lost so is at most both sockets' buffers (3.4 MiB of 50 MiB seen under an
    underlay MTU change), and never 10% of a gigabyte."""
    with iperf_server(dst["namespace"]):
        client = pod_exec(lab_name, src["namespace"], "iperf3", "-c", dst["ip"], "-n", size, "-J")
    assert client.returncode == 0, client.stdout[-2000:]
    result = json.loads(client.stdout)["end"]
    wanted = GB if size == "1G" else int(size.rstrip("M")) * 1024**2
    assert result["sum_sent"]["bytes"] >= wanted
    received = int(result["sum_received"]["bytes"])
    assert received >= wanted - max(IN_FLIGHT_AT_MOST, wanted // 10), (received, wanted)
    return Transfer(float(result["sum_received"]["bits_per_second"]) / 1e9, received)


def stream_through(
    src: dict[str, Any], dst: dict[str, Any], seconds: int, during: Callable[[], object]
) -> int:
    """An 800 Mbit/s TCP stream from pod src to pod dst, with ``during`` run 2 s into it: no
    half second of it may fall under 100 Mbit/s and 95% must arrive. Returns the bytes sent."""
    with iperf_server(dst["namespace"]):
        client = subprocess.Popen(
            ["ip", "netns", "exec", src["namespace"], "iperf3", "-c", dst["ip"],
             "-t", str(seconds), "-b", "800M", "-J", "-i", "0.5"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(2)
            during()
            out, _ = client.communicate(timeout=60)
        finally:
            client.kill()
    result = json.loads(out)
    assert client.returncode == 0, out[-2000:]
    sent, received = result["end"]["sum_sent"]["bytes"], result["end"]["sum_received"]["bytes"]
    assert received >= 0.95 * sent > 0
    rates = [i["sum"]["bits_per_second"] for i in result["intervals"]]
    assert min(rates) > 100e6, rates
    return int(sent)


def ping_all(lab_name: str, pods: list[dict[str, Any]]) -> None:
    for src in pods:
        for dst in pods:
            if src is not dst:
                ping = pod_exec(
                    lab_name, src["namespace"], "ping", "-c2", "-i0.2", "-W2", dst["ip"]
                )
                assert ping.returncode == 0, f"{src['namespace']} -> {dst['ip']}: {ping.stdout}"


def wait_for(predicate: Callable[[], bool], limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def by_node(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["node"]: p for p in info["pods"]}


@pytest.mark.parametrize("decap", ["xdp", "tc"])
def test_bpf_nodes_with_a_kernel_vxlan_node(
    decap: str, lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """n1, n2: BPF; n3: flanneld's kernel vxlan. Every pair pings; 1 GB each way that matters."""
    info = lab_up(
        "--nodes", "3", "--datapath", "bpf,bpf,kernel", f"--agent-arg=--bpf-decap={decap}"
    )
    n1, n2, n3 = (f"{lab_name}-n{i}" for i in (1, 2, 3))
    paths = {n["namespace"]: (n["datapath"], n["decap"]) for n in info["nodes"]}
    assert paths == {n1: ("bpf", decap), n2: ("bpf", decap), n3: ("kernel", "")}
    pods = by_node(info)
    ping_all(lab_name, info["pods"])

    before = {n: counters(lab_name, n) for n in (n1, n2)}
    done = {
        "bpf->bpf": transfer(lab_name, pods[n1], pods[n2]),
        "bpf->kernel": transfer(lab_name, pods[n1], pods[n3]),
        "kernel->bpf": transfer(lab_name, pods[n3], pods[n1]),
    }
    print(f"\n{decap}: " + ", ".join(f"{k} {v.gbits:.2f} Gbit/s" for k, v in done.items()))
    after = {n: counters(lab_name, n) for n in (n1, n2)}
    to_n2, to_n3, to_n1 = (done[k].received for k in ("bpf->bpf", "bpf->kernel", "kernel->bpf"))

    # n1 encapsulated both outgoing gigabytes itself.
    assert delta(after[n1], before[n1], "tc_encap", "encap_redirect")[1] >= to_n2 + to_n3
    if decap == "xdp":
        gro = subprocess.run(
            ["ip", "netns", "exec", n1, "ethtool", "-k", "eth1"], capture_output=True, text=True
        ).stdout
        assert "generic-receive-offload: on" in gro  # switched on with the XDP program
        # ... and XDP decapsulated what came in: n2's gigabyte from n1, n1's from kernel n3.
        assert delta(after[n2], before[n2], "xdp_decap", "decap_pass")[1] >= to_n2
        assert delta(after[n1], before[n1], "xdp_decap", "decap_pass")[1] >= to_n1
    else:
        # tc strips single packets (the ACKs here); aggregates go to vxlan.ko, counted as such.
        assert delta(after[n1], before[n1], "tc_decap", "decap_redirect")[0] > 1000
        gso = delta(after[n2], before[n2], "tc_decap", "pass_gso")[1]
        stripped = delta(after[n2], before[n2], "tc_decap", "decap_redirect")[1]
        assert gso > 0.9 * to_n2 and gso + stripped >= to_n2
    for node in (n1, n2):
        dropped = [k for k in after[node] if k[1].startswith("drop_")]
        assert dropped == [], f"{node} dropped: {dropped}"


@pytest.mark.parametrize(
    ("rp_filter", "decap_arg", "decap", "reason"),
    [
        (1, "auto", "tc", "rp_filter is strict"),
        (2, "auto", "tc", "eth1 is a veth"),  # auto's choice on a veth, whatever rp_filter says
        (2, "xdp", "xdp", ""),
    ],
)
def test_auto_picks_the_decap_hook_per_device(
    rp_filter: int,
    decap_arg: str,
    decap: str,
    reason: str,
    lab_name: str,
    lab_up: Callable[..., dict[str, Any]],
) -> None:
    info = lab_up(
        "--nodes", "2", "--rp-filter", str(rp_filter), f"--agent-arg=--bpf-decap={decap_arg}"
    )
    assert [(n["datapath"], n["decap"]) for n in info["nodes"]] == [("bpf", decap)] * 2
    n1, n2 = (f"{lab_name}-n{i}" for i in (1, 2))
    status = node_status(lab_name, n1)
    assert reason in status["details"]["decap_reason"]
    ping_all(lab_name, info["pods"])
    pods = by_node(info)
    before = counters(lab_name, n2)
    transfer(lab_name, pods[n1], pods[n2], "200M")
    after = counters(lab_name, n2)
    changed = {k: v for k, v in after.items() if v != before.get(k)}
    if decap == "tc":
        # Every frame crossed the tc hook; aggregates went on to vxlan.ko, single packets were
        # stripped in BPF. (Under a loaded suite a few frames land under another pass reason.)
        # 200M of TCP payload plus headers; one run in many counted 0.4% under the payload alone
        # (iperf3's -n is what the sender wrote, not what crossed before the counters were read).
        hook_total = sum(delta(after, before, h, r)[1] for h, r in after if h == "tc_decap")
        assert hook_total >= 0.98 * 200 * 1024**2, changed
        seen = sum(delta(after, before, "tc_decap", r)[1] for r in ("pass_gso", "decap_redirect"))
        assert seen >= 0.95 * 200 * 1024**2, changed
    else:
        seen = delta(after, before, "xdp_decap", "decap_pass")[1]
        assert seen >= 200 * 1024**2, changed

    # Lease events reach fb_remotes one entry at a time: a node joins, then leaves.
    def remotes() -> list[str]:
        return [r["subnet"] for r in node_status(lab_name, n1)["bpf"]["remotes"]]

    value = (
        '{"PublicIP":"198.18.0.99","PublicIPv6":null,"BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:99"}}'
    )
    etcdctl(lab_name, "put", FAKE_KEY, value)
    assert wait_for(lambda: FAKE_SUBNET in remotes())
    etcdctl(lab_name, "del", FAKE_KEY)
    assert wait_for(lambda: FAKE_SUBNET not in remotes())


def test_agent_killed_mid_transfer(lab_name: str, lab_up: Callable[..., dict[str, Any]]) -> None:
    """The data path outlives the agent: SIGKILL and restart under load lose nothing."""
    info = lab_up("--nodes", "2")
    n1, n2 = (f"{lab_name}-n{i}" for i in (1, 2))
    pods = by_node(info)
    status = node_status(lab_name, n1)
    lease, pin_dir = status["lease"]["subnet"], status["details"]["pin_dir"]
    before = counters(lab_name, n1)
    log = STATE_ROOT / lab_name / n1 / "agent.log"
    # A remote whose lease went away while no agent watched: the restart must sweep it.
    with PinnedMaps(Path(pin_dir)) as maps:
        maps.set_remote(
            Remote(IPv4Network("10.244.251.0/24"), IPv4Address("198.18.0.251"), "0e:00:00:00:02:51")
        )
    sent = stream_through(
        pods[n1], pods[n2], 8, lambda: lab.restart_agent(lab_name, n1, 9, ready_timeout=30)
    )
    assert node_status(lab_name, n1)["lease"]["subnet"] == lease
    text = log.read_text()
    assert "replaced the running BPF program" in text
    assert "BPF remotes reconciled with 1 leases: 0 written, 1 stale removed" in text
    remotes = [r["subnet"] for r in node_status(lab_name, n1)["bpf"]["remotes"]]
    assert remotes == [node_status(lab_name, n2)["lease"]["subnet"]]
    # The pinned counters kept counting across the restart.
    gained = delta(counters(lab_name, n1), before, "tc_encap", "encap_redirect")[1]
    assert gained >= 0.9 * sent


def _programs(node: str) -> dict[str, tuple[int, str]]:
    """hook -> (program id, tag) of what is attached now on a lab node (veths: tc decap)."""
    found = {}
    for hook, device, direction in (("encap", "flannel.1", "egress"), ("decap", "eth1", "ingress")):
        out = subprocess.run(
            ["tc", "-n", node, "filter", "show", "dev", device, direction],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        match = re.search(r" id (\d+) .*?tag ([0-9a-f]{16})", out)
        assert match, out
        found[hook] = (int(match[1]), match[2])
    return found


def _upgraded_sources(tmp_path: Path) -> Path:
    """bpf/ as a next release might ship it: same maps and behaviour, different instructions."""
    new = tmp_path / "bpf-next"
    shutil.copytree(loader.BPF_SOURCE_DIR, new)
    encap = new / "lib" / "vxlan_encap.h"
    text = encap.read_text()
    assert ".ttl = cfg->ttl," in text
    encap.write_text(text.replace(".ttl = cfg->ttl,", ".ttl = cfg->ttl ?: 64,"))
    vxlan = new / "lib" / "vxlan.h"
    text = vxlan.read_text()
    marker = "\tif (ip->version != 4 || ip->ihl != 5)\n\t\treturn FB_PASS_IP_OPTIONS;\n"
    assert marker in text
    vxlan.write_text(
        text.replace(marker, marker + "\tif (!ip->ttl)\n\t\treturn FB_PASS_NOT_OURS;\n")
    )
    return new


def test_rolling_upgrade_to_changed_programs_mid_transfer(
    lab_name: str, lab_up: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    """Both agents restarted, one after the other, onto changed BPF programs during a TCP
    stream: the programs are replaced in place, the stream never stalls, leases and pinned
    counters carry on."""
    info = lab_up("--nodes", "2")
    nodes = [f"{lab_name}-n{i}" for i in (1, 2)]
    pods = by_node(info)
    leases = {n: node_status(lab_name, n)["lease"]["subnet"] for n in nodes}
    old = {n: _programs(n) for n in nodes}
    before = {n: counters(lab_name, n) for n in nodes}
    sources = _upgraded_sources(tmp_path)
    upgraded = {"FLANNEL_BPF_SOURCE_DIR": str(sources)}

    def rolling_upgrade() -> None:
        for node in nodes:
            lab.restart_agent(lab_name, node, env=upgraded, ready_timeout=60)

    sent = stream_through(pods[nodes[0]], pods[nodes[1]], 10, rolling_upgrade)
    for node in nodes:
        new = _programs(node)
        for hook in ("encap", "decap"):
            assert new[hook][0] != old[node][hook][0], (node, hook)  # a new program...
            assert new[hook][1] != old[node][hook][1], (node, hook)  # ...of other instructions
        assert node_status(lab_name, node)["lease"]["subnet"] == leases[node]
        log = (STATE_ROOT / lab_name / node / "agent.log").read_text()
        assert "replaced the running BPF program on tc egress flannel.1 in place" in log
        assert "replaced the running BPF program on tc ingress eth1 in place" in log
        assert "Traceback" not in log
    # The pinned counters kept counting through both restarts: every byte sent is in them.
    gained = delta(counters(lab_name, nodes[0]), before[nodes[0]], "tc_encap", "encap_redirect")
    assert gained[1] >= 0.9 * sent
    decapped = delta(counters(lab_name, nodes[1]), before[nodes[1]], "tc_decap", "decap_redirect")
    assert decapped[0] > 0


def test_stop_keeps_the_data_path_and_cleanup_removes_it(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    info = lab_up("--nodes", "2")
    n1 = f"{lab_name}-n1"
    pods = info["pods"]
    state = lab.LabState.load(lab_name)
    pid = state.nodes[0].agent_pid
    subprocess.run(["kill", "-TERM", str(pid)], check=True)
    deadline = time.monotonic() + 15
    while node_status(lab_name, n1)["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    # Agent gone, programs still attached and carrying pod traffic.
    before = counters(lab_name, n1)
    ping_all(lab_name, pods)
    assert delta(counters(lab_name, n1), before, "tc_encap", "encap_redirect")[0] >= 2

    proc = cli("cleanup", netns=n1)
    assert proc.returncode == 0, proc.stderr
    assert "detached tc egress from flannel.1" in proc.stdout
    assert "unpinned" in proc.stdout
    assert "fb_" not in subprocess.run(
        ["tc", "-n", n1, "filter", "show", "dev", "flannel.1", "egress"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert (
        "xdp"
        not in subprocess.run(
            ["ip", "-n", n1, "link", "show", "eth1"], capture_output=True, text=True, check=True
        ).stdout
    )
    # vxlan.ko takes over with the entries flanneld would have left: traffic still flows.
    ping_all(lab_name, pods)
    again = cli("cleanup", netns=n1)
    assert (again.returncode, again.stdout.strip()) == (0, "cleanup: nothing to do")


def test_fallback_to_kernel_when_bpf_cannot_load(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    # An unusable bpffs location: the BPF path cannot pin its maps, so auto falls back.
    info = lab_up("--nodes", "2", "--agent-arg=--bpffs=/proc/flannel-bpf")
    assert [n["datapath"] for n in info["nodes"]] == ["kernel", "kernel"]
    for node in info["nodes"]:
        assert any("BPF data path unavailable" in r for r in node["fallbacks"]), node
    text = cli("lab", "--name", lab_name, "status").stdout
    assert "fallbacks:" in text and "BPF data path unavailable" in text
    ping_all(lab_name, info["pods"])
    log = (STATE_ROOT / lab_name / f"{lab_name}-n1" / "agent.log").read_text()
    assert "data path fallback: BPF data path unavailable" in log


def test_explicit_bpf_that_cannot_load_is_an_error(lab_name: str) -> None:
    proc = cli(
        "lab", "--name", lab_name, "up", "--nodes", "1", "--datapath", "bpf",
        "--agent-arg=--bpffs=/proc/flannel-bpf",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "BPF data path:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_userspace_fallback_node_talks_to_kernel_and_bpf_nodes(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    info = lab_up("--nodes", "3", "--datapath", "userspace,kernel,bpf")
    assert [n["datapath"] for n in info["nodes"]] == ["userspace", "kernel", "bpf"]
    ping_all(lab_name, info["pods"])


def test_generic_xdp_only_when_asked(lab_name: str, lab_up: Callable[..., dict[str, Any]]) -> None:
    info = lab_up("--nodes", "2", "--agent-arg=--bpf-decap=xdp-generic")
    assert [n["decap"] for n in info["nodes"]] == ["xdp-generic"] * 2
    n1 = f"{lab_name}-n1"
    assert (
        "xdpgeneric"
        in subprocess.run(
            ["ip", "-n", n1, "link", "show", "eth1"], capture_output=True, text=True, check=True
        ).stdout
    )
    before = counters(lab_name, n1)
    ping_all(lab_name, info["pods"])
    assert delta(counters(lab_name, n1), before, "xdp_decap", "decap_pass")[0] >= 2


# --------------------------------------------------------------------------------------------
# flannel's udp wire format


def capture_udp(lab_name: str, node: str, send: Callable[[], None]) -> list[bytes]:
    """Datagrams to port 8285 seen on the underlay bridge while send() runs (outer IPv4 on)."""
    underlay = f"{lab_name}-ul"
    pcap = STATE_ROOT / lab_name / f"{node}.pcap"
    dump = subprocess.Popen(
        ["ip", "netns", "exec", underlay, "tcpdump", "-U", "-n", "-i", "br0", "-w", str(pcap),
         f"udp dst port 8285 and src host {_underlay_ip(lab_name, node)}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        send()
        time.sleep(0.5)
    finally:
        dump.terminate()
        dump.wait()
    data = pcap.read_bytes()
    pcap.unlink()
    frames, offset = [], 24  # pcap global header, then (16-byte record header, frame)*
    while offset + 16 <= len(data):
        length = int.from_bytes(data[offset + 8 : offset + 12], "little")
        frames.append(data[offset + 16 + 14 : offset + 16 + length])  # drop Ethernet
        offset += 16 + length
    return frames


def _underlay_ip(lab_name: str, node: str) -> str:
    info = lab.status(lab_name)
    return str(next(n["underlay_ip"] for n in info["nodes"] if n["namespace"] == node))


def wire_shape(datagram: bytes) -> dict[str, int]:
    """The fields of a udp-backend datagram that must not depend on who sent it."""
    inner = datagram[28:]
    return {
        "tos": datagram[1],
        "df": datagram[6] & 0x40,
        "ttl": datagram[8],
        "sport": int.from_bytes(datagram[20:22], "big"),
        "dport": int.from_bytes(datagram[22:24], "big"),
        "udp_len_ok": int(int.from_bytes(datagram[24:26], "big") == len(datagram) - 20),
        "inner_ttl": inner[8],
        "inner_len_ok": int(int.from_bytes(inner[2:4], "big") == len(inner)),
    }


def test_udp_network_bpf_nodes_interoperate_with_flanneld_udp_nodes(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """n1, n3: the udp format in BPF (XDP decap); n2: flanneld's udp in userspace. Same wire."""
    info = lab_up(
        "--nodes", "3", "--backend", "udp", "--datapath", "bpf,userspace,bpf",
        "--agent-arg=--bpf-decap=xdp",
    )  # fmt: skip
    n1, n2, n3 = (f"{lab_name}-n{i}" for i in (1, 2, 3))
    assert [(n["datapath"], n["decap"]) for n in info["nodes"]] == [
        ("bpf", "xdp"), ("userspace", ""), ("bpf", "xdp"),
    ]  # fmt: skip
    pods = by_node(info)
    ping_all(lab_name, info["pods"])

    # On the wire a BPF node's datagram looks like flanneld's: same ports, DF, TTLs, lengths.
    def ping_from(node: str) -> Callable[[], None]:
        def send() -> None:
            pod_exec(lab_name, pods[node]["namespace"], "ping", "-c3", "-i0.2", pods[n3]["ip"])

        return send

    from_bpf = capture_udp(lab_name, n1, ping_from(n1))
    from_userspace = capture_udp(lab_name, n2, ping_from(n2))
    assert len(from_bpf) >= 3 and len(from_userspace) >= 3
    shapes = {json.dumps(wire_shape(d), sort_keys=True) for d in from_bpf + from_userspace}
    assert len(shapes) == 1, shapes
    shape = json.loads(shapes.pop())
    assert shape == {"tos": 0, "df": 0x40, "ttl": 64, "sport": 8285, "dport": 8285,
                     "udp_len_ok": 1, "inner_ttl": 62, "inner_len_ok": 1}  # fmt: skip

    before = {n: counters(lab_name, n) for n in (n1, n3)}
    bpf = transfer(lab_name, pods[n1], pods[n3], "1G")
    to_userspace = transfer(lab_name, pods[n1], pods[n2], "100M")
    from_userspace = transfer(lab_name, pods[n2], pods[n3], "100M")
    after = {n: counters(lab_name, n) for n in (n1, n3)}
    print(
        f"\nudp: bpf->bpf {bpf.gbits:.2f} Gbit/s, bpf->userspace {to_userspace.gbits:.2f}, "
        f"userspace->bpf {from_userspace.gbits:.2f}"
    )
    # n1 encapsulated the data of both of its transfers in BPF; n3 decapsulated both it received.
    sent_by_n1 = bpf.received + to_userspace.received
    received_by_n3 = bpf.received + from_userspace.received
    assert delta(after[n1], before[n1], "tc_encap", "encap_redirect")[1] >= sent_by_n1
    assert delta(after[n3], before[n3], "xdp_decap", "decap_pass")[1] >= received_by_n3
    # A destination without a lease is left to the userspace plane (which answers it flanneld's
    # way, with ICMP net unreachable: tests/test_vxlan_userspace.py).
    pod_exec(lab_name, pods[n1]["namespace"], "ping", "-c1", "-W1", "10.244.250.1")
    assert delta(counters(lab_name, n1), after[n1], "tc_encap", "pass_no_remote")[0] >= 1


def test_udp_network_with_tc_decap_under_strict_rp_filter(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    info = lab_up("--nodes", "2", "--backend", "udp", "--rp-filter", "1")
    n1, n2 = (f"{lab_name}-n{i}" for i in (1, 2))
    assert [(n["datapath"], n["decap"]) for n in info["nodes"]] == [("bpf", "tc")] * 2
    pods = by_node(info)
    ping_all(lab_name, info["pods"])
    before = counters(lab_name, n2)
    done = transfer(lab_name, pods[n1], pods[n2], "1G")
    after = counters(lab_name, n2)
    print(f"\nudp, tc decap, rp_filter 1: {done.gbits:.2f} Gbit/s")
    assert delta(after, before, "tc_decap", "decap_redirect")[1] >= done.received
