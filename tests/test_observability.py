"""Observability: /metrics, /healthz and /readyz, the inspection commands, the Grafana dashboard
run query by query against a real Prometheus scraping a lab, and the alert rules under promtool."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flannel_bpf.datapath.bpf_maps import Hook, Reason
from flannel_bpf.lab.lab import STATE_ROOT, LabState, prometheus_of
from flannel_bpf.lab.netns import http_get
from flannel_bpf.subnet.subnet_env import docker_options

from .conftest import cli, metric, pod_exec, requires_root
from .test_agent import HOST_IP, TwoHosts, hosts, wait_for  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
METRICS = "http://127.0.0.1:9867"


# --------------------------------------------------------------------------------------------
# The dashboard and alert files themselves


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DASHBOARDS / "flannel-bpf.json").read_text())
    return doc


def panel_queries(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in doc["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_json_is_what_build_py_writes() -> None:
    build = runpy.run_path(str(DASHBOARDS / "build.py"))
    assert (DASHBOARDS / "flannel-bpf.json").read_text() == build["render"](), (
        "run python dashboards/build.py"
    )


def test_dashboard_has_the_rows_variables_and_scoping_operators_need() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 39 and doc["uid"] == "flannel-bpf"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["definition"] == "label_values(flannel_build_info, instance)"
    assert variables["node"]["includeAll"] and variables["node"]["allValue"] == ".*"
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert rows == [
        "Health",
        "Leases and peers",
        "Data path traffic",
        "Host routing (--host-routing=bpf)",
        "Drops",
        "etcd",
        "BPF maps and programs",
        "Agent resources",
    ]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            # every query follows the node picker
            assert 'instance=~"$node"' in target["expr"], (panel["title"], target["expr"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with make setup")
def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", "alerts.yml"], cwd=DASHBOARDS, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 12 rules found" in check.stdout
    unit = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=DASHBOARDS,
        capture_output=True,
        text=True,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # Each rule is exercised by at least one case.
    rules = re.findall(r"- alert: (\w+)", (DASHBOARDS / "alerts.yml").read_text())
    tests = (DASHBOARDS / "alerts_test.yml").read_text()
    assert {
        "FlannelLeaseExpiringSoon",
        "FlannelEtcdUnreachable",
        "FlannelDatapathDropsRising",
        "FlannelDatapathFellBack",
        "FlannelPeersNotProgrammed",
    } <= set(rules)
    for rule in rules:
        assert f"alertname: {rule}" in tests, rule


def test_promtool_test_catches_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests can fail: weaken a threshold and they must."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool comes with make setup")
    rules = (DASHBOARDS / "alerts.yml").read_text().replace("time() < 3000", "time() < 100")
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(DASHBOARDS / "alerts_test.yml", tmp_path)
    unit = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True
    )
    assert unit.returncode != 0


# --------------------------------------------------------------------------------------------
# docker-opts (mk-docker-opts.sh's logic)


SUBNET_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\n"


def test_docker_options_as_mk_docker_opts_sh() -> None:
    plain = docker_options(SUBNET_ENV + "FLANNEL_IPMASQ=false\n", {})
    assert plain.render(True, True) == (
        'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472 "\n'
    )
    # flannel masquerades, so Docker must not; -m drops that option.
    masq = docker_options(SUBNET_ENV + "FLANNEL_IPMASQ=true\n", {})
    assert masq.options["DOCKER_OPT_IPMASQ"] == "--ip-masq=false"
    assert list(masq.options) == ["DOCKER_OPT_BIP", "DOCKER_OPT_IPMASQ", "DOCKER_OPT_MTU"]
    no_masq = docker_options(SUBNET_ENV + "FLANNEL_IPMASQ=true\n", {}, ip_masq=False)
    assert "IPMASQ" not in no_masq.render(True, True)
    # -k and the environment: the combined key's value leads, DOCKER_OPT_* variables join.
    env = {"MY_OPTS": "--debug", "DOCKER_OPT_DNS": "--dns=10.0.0.10"}
    keyed = docker_options(SUBNET_ENV, env, combined_key="MY_OPTS")
    assert keyed.render(False, True) == (
        'MY_OPTS="--debug --bip=10.1.74.1/24 --dns=10.0.0.10 --mtu=1472 "\n'
    )


def test_docker_opts_command_writes_the_file_and_names_what_is_missing(tmp_path: Path) -> None:
    env_file = tmp_path / "subnet.env"
    env_file.write_text(SUBNET_ENV + "FLANNEL_IPMASQ=true\n")
    out = tmp_path / "docker_opts.env"
    proc = cli("docker-opts", "-f", str(env_file), "-d", str(out), "-c")
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == 'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=false --mtu=1472 "\n'
    doc = json.loads(cli("docker-opts", "-f", str(env_file), "-o", "json").stdout)
    assert doc["schema"] == "flannel-bpf/docker-opts/v1"
    assert doc["options"]["DOCKER_OPT_BIP"] == "--bip=10.1.74.1/24"
    missing = cli("docker-opts", "-f", str(tmp_path / "nope.env"), "-d", "-")
    assert missing.returncode == 1
    assert "nope.env" in missing.stderr and "is it running" in missing.stderr
    assert "Traceback" not in missing.stderr


# --------------------------------------------------------------------------------------------
# Endpoints on a real agent


@pytest.mark.root
@requires_root
def test_healthz_and_readyz_follow_flanneld(hosts: TwoHosts) -> None:  # noqa: F811
    agent = hosts.agent("--healthz-port", "10256", "--healthz-ip", "127.0.0.1")
    agent.wait_for_log("flannel config not found in etcd store")
    for base in (METRICS, "http://127.0.0.1:10256"):
        assert http_get(hosts.host_ns, f"{base}/healthz") == (200, b"flanneld is running")
        assert http_get(hosts.host_ns, f"{base}/readyz") == (503, b"flanneld is not ready yet")
    status, body = http_get(hosts.host_ns, f"{METRICS}/metrics")
    assert status == 200 and b"flannel_ready 0.0" in body
    assert http_get(hosts.host_ns, "http://127.0.0.1:10256/metrics")[0] == 404

    hosts.put_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}')
    wait_for(hosts.subnet_file.exists, 20, "subnet.env")
    for base in (METRICS, "http://127.0.0.1:10256"):
        assert http_get(hosts.host_ns, f"{base}/readyz") == (200, b"flanneld is ready")
    status, body = http_get(hosts.host_ns, f"{METRICS}/metrics")
    text = body.decode()
    assert "flannel_ready 1.0" in text
    assert 'flannel_subnet_file_writes_total{outcome="success"} 1.0' in text
    assert 'flannel_datapath_info{backend="alloc",datapath="none"' in text
    assert "flannel_lease_expiry_timestamp_seconds" in text
    assert "flannel_etcd_up 1.0" in text

    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert "serving metrics on http://0.0.0.0:9867" in agent.log()
    assert "serving healthz on http://127.0.0.1:10256" in agent.log()


@pytest.mark.root
@requires_root
def test_http_endpoint_refuses_what_it_does_not_serve(hosts: TwoHosts) -> None:  # noqa: F811
    agent = hosts.agent()
    agent.wait_for_log("serving metrics")
    # A raw request: a POST, garbage, a half request that the server times out.
    script = (
        "import socket, sys\n"
        "def ask(data):\n"
        "    s = socket.create_connection(('127.0.0.1', 9867), timeout=15)\n"
        "    s.sendall(data); out = b''\n"
        "    while chunk := s.recv(4096): out += chunk\n"
        "    return out.split(b'\\r\\n', 1)[0].decode()\n"
        "print(ask(b'POST /metrics HTTP/1.1\\r\\n\\r\\n'))\n"
        "print(ask(b'garbage\\r\\n\\r\\n'))\n"
        "print(ask(b'GET /nope HTTP/1.1\\r\\n\\r\\n'))\n"
        "print(ask(b'HEAD /healthz HTTP/1.0\\r\\n\\r\\n'))\n"
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", hosts.host_ns, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.splitlines() == [
        "HTTP/1.1 405 Method Not Allowed",
        "HTTP/1.1 400 Bad Request",
        "HTTP/1.1 404 Not Found",
        "HTTP/1.1 200 OK",
    ], proc.stderr
    assert agent.running() and "Traceback" not in agent.log()


@pytest.mark.root
@requires_root
def test_metrics_address_in_use_is_one_clear_line(hosts: TwoHosts) -> None:  # noqa: F811
    first = hosts.agent("--metrics-addr", "127.0.0.1:9999")
    first.wait_for_log("serving metrics")
    second = hosts.agent("--metrics-addr", "127.0.0.1:9999", name="second")
    assert second.wait(20) == 1
    assert "cannot listen on 127.0.0.1:9999 for metrics" in second.log()
    assert "Traceback" not in second.log()
    assert first.running()


@pytest.mark.parametrize(
    "value",
    ["9867", "localhost:9867", "0.0.0.0:http", "0.0.0.0:70000"],
)
def test_bad_metrics_address_is_a_usage_error(value: str) -> None:
    proc = cli("run", "--metrics-addr", value)
    assert proc.returncode == 2
    assert "--metrics-addr" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# A lab with Prometheus: every dashboard query returns data


def _traffic(info: dict[str, Any], count: int = 40) -> None:
    pods = info["pods"]
    for src in pods:
        for dst in pods:
            if src is not dst:
                proc = pod_exec(
                    info["name"], src["namespace"], "ping", "-c", str(count), "-i", "0.02",
                    "-q", dst["ip"],
                )  # fmt: skip
                assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.root
@requires_root
def test_every_dashboard_panel_returns_data_from_a_real_prometheus(
    lab_up: Callable[..., dict[str, Any]], lab_name: str
) -> None:
    # Host routing on (the userspace node says it cannot have it): its panels have data too.
    info = lab_up("--nodes", "3", "--datapath", "bpf,bpf,userspace", "--prometheus",
                  "--agent-arg=--host-routing=bpf")  # fmt: skip
    assert info["prometheus"], info
    _traffic(info)
    prom = prometheus_of(LabState.load(lab_name))

    def scalar(expr: str) -> float:
        (doc,) = prom.query([expr])
        assert doc["status"] == "success", (expr, doc)
        assert doc["data"]["result"], expr
        return float(doc["data"]["result"][0]["value"][1])

    # Scrapes after the traffic (1 s interval): wait until Prometheus has seen it.
    deadline = time.monotonic() + 30
    handled = 'sum(flannel_datapath_packets_total{outcome="handled"})'
    while True:
        try:
            if scalar(handled) > 0 and scalar("sum(flannel_userspace_packets_total)") > 0:
                break
        except AssertionError:
            pass
        assert time.monotonic() < deadline, prom.log()[-2000:]
        time.sleep(1)
    time.sleep(3)

    assert scalar("sum(flannel_ready)") == 3
    assert scalar("min(flannel_peers)") == 2 and scalar("min(flannel_peers_programmed)") == 2
    assert scalar('count(flannel_datapath_info{datapath="bpf"})') == 2
    assert scalar('count(flannel_datapath_info{datapath="userspace"})') == 1
    assert scalar('count(flannel_datapath_info{host_routing="bpf"})') == 2
    assert scalar("sum(flannel_bpf_program_attached)") == 4  # tc encap + tc decap, two nodes

    queries = panel_queries(dashboard())
    exprs = [expr.replace("$node", ".*").replace("$__rate_interval", "1m") for _, expr in queries]
    results = prom.query(exprs)
    failures = []
    for (title, expr), doc in zip(queries, results, strict=True):
        if doc.get("status") != "success":
            failures.append(f"{title}: {expr}: {doc.get('error')}")
        elif not doc["data"]["result"]:
            failures.append(f"{title}: {expr}: no data")
    assert not failures, "\n".join(failures)

    # The alert rules are loaded and evaluate; in a healthy lab none fires except by design.
    (alerts,) = prom.query(["ALERTS"])
    firing = {a["metric"]["alertname"] for a in alerts["data"]["result"]}
    assert not firing & {"FlannelNotReady", "FlannelEtcdUnreachable", "FlannelDatapathFellBack"}

    # Prometheus conventions, as exposed.
    n1 = info["nodes"][0]
    status, body = http_get(n1["namespace"], f"{METRICS}/metrics")
    assert status == 200
    check_conventions(body.decode())


def check_conventions(text: str) -> None:
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
    ours = {name: kind for name, kind in types.items() if name.startswith("flannel_")}
    assert len(ours) >= 25, sorted(ours)
    for name, kind in types.items():
        assert name.startswith(("flannel_", "process_")), name
        assert not name.endswith("_created")
        if kind == "counter":
            assert name.endswith("_total"), name
        assert not re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", name), name
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [s for s in samples if "_created" in s]
    # Bounded labels: no per-flow or per-pod label anywhere.
    labels = set(re.findall(r"[{,]([a-z_]+)=", text))
    assert labels <= {
        "operation", "outcome", "le", "type", "reason", "version", "python_version", "backend",
        "iface", "public_ip", "datapath", "decap", "host_routing", "fallback_reason", "subnet",
        "direction", "hook", "map", "collector",
    }, labels  # fmt: skip


# --------------------------------------------------------------------------------------------
# Commands and counters on a BPF lab, with and without the agent


def _node_cli(node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, netns=node)


@pytest.mark.root
@requires_root
def test_commands_read_etcd_and_pins_and_counters_survive_restarts(
    lab_up: Callable[..., dict[str, Any]], lab_name: str
) -> None:
    info = lab_up("--nodes", "2")
    n1 = info["nodes"][0]["namespace"]
    status_file = str(STATE_ROOT / lab_name / n1 / "status.json")
    _traffic(info, count=20)

    # status: the v1 document.
    status = json.loads(_node_cli(n1, "status", "-o", "json", "--status-file", status_file).stdout)
    assert status["schema"] == "flannel-bpf/status/v1" and status["running"]
    assert status["datapath"] == "bpf" and status["peers"] == 1
    assert status["lease"]["subnet"] == info["nodes"][0]["subnet"]
    assert 86000 < status["lease"]["expires_in_seconds"] <= 86400
    assert status["etcd"]["endpoints"] == [
        {"endpoint": "http://198.18.0.2:2379", "healthy": True, "error": "",
         "seconds": status["etcd"]["endpoints"][0]["seconds"]}
    ]  # fmt: skip
    assert set(status["bpf"]["attached"]) == {"tc_encap", "tc_decap"}
    text = _node_cli(n1, "status", "--status-file", status_file).stdout
    assert "expires in 23h" in text and "http://198.18.0.2:2379 healthy" in text

    # leases: every lease in etcd, plus a reservation and an entry no agent can use.
    etcd_ns = f"{lab_name}-etcd"
    endpoint = "http://198.18.0.2:2379"
    put = ["etcdctl", "--endpoints", endpoint, "put"]
    prefix = "/coreos.com/network/subnets"
    subprocess.run(
        ["ip", "netns", "exec", etcd_ns, *put, f"{prefix}/10.244.250.0-24",
         '{"PublicIP":"198.18.0.99","BackendType":"vxlan","BackendData":{"VNI":1,'
         '"VtepMAC":"0e:00:00:00:00:99"}}'],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["ip", "netns", "exec", etcd_ns, *put, f"{prefix}/garbage", "not json"],
        check=True,
        capture_output=True,
    )
    leases = json.loads(_node_cli(n1, "leases", "-o", "json", "--etcd-endpoints", endpoint).stdout)
    assert leases["schema"] == "flannel-bpf/leases/v1"
    by_subnet = {lease["subnet"]: lease for lease in leases["leases"]}
    assert set(by_subnet) == {n["subnet"] for n in info["nodes"]} | {"10.244.250.0/24"}
    reservation = by_subnet["10.244.250.0/24"]
    assert reservation["reservation"] and reservation["expiration"] is None
    own = by_subnet[info["nodes"][0]["subnet"]]
    assert not own["reservation"] and own["public_ip"] == info["nodes"][0]["underlay_ip"]
    assert own["backend_type"] == "vxlan" and 86000 < own["ttl_seconds"] <= 86400
    assert leases["invalid"] == [
        {"key": f"{prefix}/garbage", "error": leases["invalid"][0]["error"]}
    ]
    text = _node_cli(n1, "leases", "--etcd-endpoints", endpoint).stdout
    assert "reservation" in text and "invalid: /coreos.com/network/subnets/garbage" in text
    unreachable = _node_cli(n1, "leases", "--etcd-endpoints", "http://198.18.0.250:2379")
    assert unreachable.returncode == 1 and "198.18.0.250" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr

    # peers: the reservation is a peer too, as flanneld treats it.
    def peers() -> list[str]:
        doc = json.loads(_node_cli(n1, "peers", "-o", "json").stdout)
        assert doc["schema"] == "flannel-bpf/peers/v1"
        return [r["subnet"] for i in doc["instances"] for r in i["remotes"]]

    wait_for(lambda: "10.244.250.0/24" in peers(), 10, "the reservation in fb_remotes")
    assert sorted(peers()) == sorted([info["nodes"][1]["subnet"], "10.244.250.0/24"])

    def counters() -> dict[tuple[str, str], int]:
        doc = json.loads(_node_cli(n1, "stats", "-o", "json").stdout)
        assert doc["schema"] == "flannel-bpf/stats/v1"
        (instance,) = doc["instances"]
        return {(c["hook"], c["reason"]): c["packets"] for c in instance["counters"]}

    before = counters()
    assert before[("tc_encap", "encap_redirect")] >= 20

    # The next hop the encapsulation cached for the peer it sent to: node 2's uplink, via the FIB.
    doc = json.loads(_node_cli(n1, "peers", "-o", "json").stdout)
    hops = {r["subnet"]: r["next_hops"] for i in doc["instances"] for r in i["remotes"]}
    node2 = info["nodes"][1]
    link = subprocess.run(
        ["ip", "-j", "-n", node2["namespace"], "link", "show", "eth1"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert hops == {node2["subnet"]: [json.loads(link.stdout)[0]["address"]], "10.244.250.0/24": []}
    assert json.loads(link.stdout)[0]["address"] in _node_cli(n1, "peers").stdout
    assert len(before) == len(Hook) * len(Reason)  # every (hook, reason), zeros included

    encap = (
        'flannel_datapath_packets_total{hook="tc_encap",outcome="handled",reason="encap_redirect"}'
    )
    scraped_before = metric(n1, encap)
    assert scraped_before == before[("tc_encap", "encap_redirect")]

    # The agent restarts: the pins, and so the counters, carry on.
    proc = cli("lab", "--name", lab_name, "restart", n1)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: _ready(n1), 30, "agent ready after restart")
    assert metric(n1, encap) >= scraped_before
    _traffic(info, count=5)
    assert counters()[("tc_encap", "encap_redirect")] >= before[("tc_encap", "encap_redirect")] + 5

    # Without an agent: status says so (exit 1), peers and stats still read the pins.
    pid = json.loads(Path(status_file).read_text())["pid"]
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15, "agent exit")
    down = _node_cli(n1, "status", "--status-file", status_file, "--no-etcd-probe")
    assert down.returncode == 1 and "NOT running" in down.stdout
    assert _node_cli(n1, "peers").returncode == 0
    assert "encap_redirect" in _node_cli(n1, "stats").stdout
    gone = _node_cli(n1, "status", "--status-file", "/nonexistent/status.json")
    assert gone.returncode == 1 and "no status at /nonexistent/status.json" in gone.stderr
    # A namespace with no BPF data path: peers says what is missing.
    nothing = cli("peers", netns=f"{lab_name}-etcd")
    assert nothing.returncode == 1 and "no BPF data path is pinned" in nothing.stderr


def _ready(node: str) -> bool:
    try:
        return http_get(node, f"{METRICS}/readyz", timeout=2)[0] == 200
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Logs


@pytest.mark.root
@requires_root
def test_json_logs_are_one_object_per_line_with_levels(hosts: TwoHosts) -> None:  # noqa: F811
    hosts.put_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}')
    agent = hosts.agent("--log-format", "json")  # hosts adds -v 2
    wait_for(hosts.subnet_file.exists, 20, "subnet.env")
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    records = [json.loads(line) for line in agent.log().splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    messages = [r["msg"] for r in records]
    assert any(m.startswith("Allocated lease") for m in messages)
    assert "Exiting cleanly..." in messages
    assert {r["level"] for r in records} <= {"info", "detail", "debug", "warning", "error"}

    # Default: key=value, and -v 0 hides the detail levels -v 2 shows.
    quiet = hosts.agent("-v", "0", name="quiet")
    wait_for(lambda: "flannel is ready" in quiet.log(), 20, "ready")
    quiet.signal(signal.SIGTERM)
    assert quiet.wait(10) == 0
    lines = [line for line in quiet.log().splitlines() if line.strip()]
    assert all(line.startswith("ts=") and " level=" in line and " msg=" in line for line in lines)
    assert not any("level=debug" in line or "level=detail" in line for line in lines)
