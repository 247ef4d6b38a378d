"""systemd integration: the notify protocol on a real socket, an agent run as `Type=notify`
would run it, and the packaging files (unit, environment example, Docker drop-in, CNI config)
checked against the code that reads them."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from flannel_bpf.cli.flags import parse_run_args
from flannel_bpf.observe.systemd import SystemdNotifier

from .conftest import requires_root
from .test_agent import TwoHosts, hosts, wait_for  # noqa: F401 - hosts is a fixture

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket, messages kept in order."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        yield listener
    finally:
        listener.close()


# --------------------------------------------------------------------------------------------
# The protocol


def test_notify_to_a_path_and_to_an_abstract_socket(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.ready("lease 10.1.2.0/24")
    assert notifier.stopping()
    assert notify_socket.drain() == [
        {"READY": "1", "STATUS": "lease 10.1.2.0/24"},
        {"STOPPING": "1", "STATUS": "shutting down"},
    ]
    abstract = NotifySocket(f"@flannel-bpf-test-{uuid.uuid4().hex}")
    try:
        assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": abstract.address}).status("x")
        assert abstract.drain() == [{"STATUS": "x"}]
    finally:
        abstract.close()


def test_outside_systemd_and_with_a_dead_socket_nothing_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not SystemdNotifier.from_environment({}).enabled
    assert not SystemdNotifier.from_environment({}).ready("x")
    gone = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert not gone.ready("x") and not gone.status("y")
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1  # once, not per message


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_period_and_only_ours(
    environ: dict[str, str], interval: float | None
) -> None:
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "/x", **environ})
    assert notifier.watchdog_interval == interval


async def test_watchdog_pings_while_the_loop_runs(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "100000"}
    )
    task = asyncio.create_task(notifier.keep_watchdog())
    await asyncio.sleep(0.33)
    task.cancel()
    pings = await asyncio.to_thread(notify_socket.drain)
    assert pings and all(m == {"WATCHDOG": "1"} for m in pings)
    assert 5 <= len(pings) <= 8, pings  # every 50 ms


# --------------------------------------------------------------------------------------------
# The agent as systemd runs it


@requires_root
def test_agent_reports_ready_only_with_subnet_env_then_status_watchdog_and_stopping(
    hosts: TwoHosts,  # noqa: F811
    notify_socket: NotifySocket,
) -> None:
    hosts.put_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    agent = hosts.agent(env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"})
    deadline = time.monotonic() + 30
    while not any(m.get("READY") == "1" for m in notify_socket.drain()):
        assert time.monotonic() < deadline, (notify_socket.messages, agent.log()[-2000:])
        time.sleep(0.05)
    # Ready means what flanneld's READY means: subnet.env is there for CNI and Docker.
    assert hosts.subnet_file.exists()
    ready = next(m for m in notify_socket.messages if m.get("READY") == "1")
    subnet = hosts.subnet_file.read_text().split("FLANNEL_SUBNET=")[1].split()[0]
    assert ready["STATUS"].startswith(f"lease {IPv4Network(subnet, strict=False)}, datapath ")
    before_ready = notify_socket.messages[: notify_socket.messages.index(ready)]
    assert any(m.get("STATUS", "").startswith("starting") for m in before_ready)

    time.sleep(1.2)
    pings = [m for m in notify_socket.drain() if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 5  # every 200 ms, from before READY on

    agent.signal(signal.SIGTERM)
    assert agent.wait(15) == 0
    assert notify_socket.drain()[-1].get("STOPPING") == "1"


# --------------------------------------------------------------------------------------------
# Packaging


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = (PACKAGING / "systemd" / "flannel-bpf.service").read_text()
    assert "Type=notify" in unit and "Restart=on-failure" in unit and "WatchdogSec=" in unit
    # verify checks that ExecStart exists: point it at a real one for the check.
    true = shutil.which("true")
    assert true
    (tmp_path / "flannel-bpf.service").write_text(unit.replace("/usr/local/bin/flannel-bpf", true))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "flannel-bpf.service")],
        capture_output=True,
        text=True,
    )
    problems = [
        line
        for line in proc.stderr.splitlines()
        if "flannel-bpf.service" in line and "Unknown" not in line.split(":", 1)[0]
    ]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_environment_example_is_what_the_flags_parse() -> None:
    environ = {}
    for line in (PACKAGING / "flannel-bpf.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            environ[key] = value
    opts = parse_run_args([], environ)
    assert opts.etcd_endpoints == (
        "https://10.0.0.11:2379",
        "https://10.0.0.12:2379",
        "https://10.0.0.13:2379",
    )
    assert opts.iface == ("eth1",) and opts.ip_masq and opts.healthz_port == 8471
    assert opts.etcd_certfile.endswith("client.pem") and opts.datapath == "auto"
    assert not opts.anti_spoofing and opts.metrics_addr == "0.0.0.0:9867"
    # Every FLANNELD_ variable in the example is a flag: a typo would be silently ignored.
    flags = {f.replace("-", "_").upper() for f in parse_run_args([], {}).__dataclass_fields__}
    assert {k.removeprefix("FLANNELD_") for k in environ if k.startswith("FLANNELD_")} <= flags


def test_docker_drop_in_reads_what_the_unit_writes() -> None:
    unit = (PACKAGING / "systemd" / "flannel-bpf.service").read_text()
    drop_in = (PACKAGING / "docker" / "flannel-bpf.conf").read_text()
    assert "docker-opts -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker" in unit
    assert "EnvironmentFile=/run/flannel/docker" in drop_in
    assert "$DOCKER_NETWORK_OPTIONS" in drop_in and "Requires=flannel-bpf.service" in drop_in


def test_cni_example_is_the_manifests_configuration_list() -> None:
    # packaging/cni's list is what the DaemonSet's init container installs from the ConfigMap,
    # with the flannel plugin's default paths spelt out (the lab runs it through the real plugin).
    import yaml

    conflist = json.loads((PACKAGING / "cni" / "10-flannel.conflist").read_text())
    docs = yaml.safe_load_all((PACKAGING.parent / "deploy" / "kube-flannel-bpf.yml").read_text())
    config_map = next(d for d in docs if d and d["kind"] == "ConfigMap")
    manifest = json.loads(config_map["data"]["cni-conf.json"])
    flannel = conflist["plugins"][0]
    assert flannel.pop("subnetFile") == "/run/flannel/subnet.env"
    assert flannel.pop("dataDir") == "/var/lib/cni/flannel"
    assert conflist == manifest
