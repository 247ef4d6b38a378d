"""A real etcd server for the lab and the tests: own data dir, own ports. Debian's etcd 3.4 by
default (what etcd-mode flannel clusters on Debian run); the Kubernetes control plane runs on the
etcd 3.6 that scripts/build-peers.sh builds (``binary``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flannel_bpf.lab.netns import in_netns
from flannel_bpf.lab.proc import stop_process

ETCD_BINARY = "etcd"
ETCDCTL_BINARY = "etcdctl"


class EtcdStartError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class EtcdTls:
    """Server-side TLS material; with client_cert_auth clients must present a certificate."""

    ca: Path
    cert: Path
    key: Path
    client_cert_auth: bool = True


@dataclass
class EtcdMember:
    name: str
    data_dir: Path
    host: str
    client_port: int
    peer_port: int
    netns: str | None = None
    tls: EtcdTls | None = None
    initial_cluster: str = ""
    cluster_token: str = "flannel-bpf"
    log_path: Path | None = None
    binary: str = ETCD_BINARY
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.endpoint,
            "--advertise-client-urls",
            self.endpoint,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            self.cluster_token,
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]
        if self.tls:
            cmd += [
                "--cert-file",
                str(self.tls.cert),
                "--key-file",
                str(self.tls.key),
                "--trusted-ca-file",
                str(self.tls.ca),
            ]
            if self.tls.client_cert_auth:
                cmd.append("--client-cert-auth")
        return in_netns(self.netns, cmd)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path or self.data_dir.parent / f"{self.name}.log"
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EtcdStartError(f"etcd {self.name} exited: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise EtcdStartError(f"etcd {self.name} not healthy after {timeout}s: {self.log_tail()}")

    def healthy(self) -> bool:
        try:
            proc = subprocess.run(
                self.ctl("endpoint", "health", "--command-timeout=1s"),
                capture_output=True,
                timeout=5,
            )
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def ctl(self, *args: str) -> list[str]:
        """An etcdctl argv against this member."""
        cmd = [ETCDCTL_BINARY, "--endpoints", self.endpoint]
        if self.tls:
            cmd += ["--cacert", str(self.tls.ca)]
            client = self.tls.cert.parent
            if (client / "client.pem").exists():
                cmd += [
                    "--cert",
                    str(client / "client.pem"),
                    "--key",
                    str(client / "client-key.pem"),
                ]
        return in_netns(self.netns, [*cmd, *args])

    def etcdctl(self, *args: str, input: bytes | None = None) -> str:
        proc = subprocess.run(
            self.ctl(*args),
            capture_output=True,
            input=input,
            timeout=30,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {proc.stderr.decode().strip()}")
        return proc.stdout.decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        stop_process(self.process, sig, timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def remove_data(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class EtcdCluster:
    members: list[EtcdMember]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        for member in self.members:
            member.start()
        for member in self.members:
            member.wait_ready(timeout)

    def stop(self) -> None:
        for member in self.members:
            member.stop()


def make_cluster(
    base_dir: Path,
    size: int = 1,
    *,
    host: str = "127.0.0.1",
    hosts: Sequence[str] = (),
    netns: str | None = None,
    tls: EtcdTls | None = None,
    name_prefix: str = "etcd",
    binary: str = ETCD_BINARY,
) -> EtcdCluster:
    """size members under base_dir. In a namespace, members listen on 2379/2380 of their own
    address from hosts, or share host on consecutive port pairs; outside one, on free ports.
    The same arguments give the same members again (a lab command stopping or starting one)."""
    if hosts and len(hosts) < size:
        raise ValueError(f"{size} members need {size} hosts, got {len(hosts)}")

    def ports(i: int) -> tuple[int, int]:
        if netns is None:
            return free_port(), free_port()
        return (2379, 2380) if hosts else (2379 + 2 * i, 2380 + 2 * i)

    members = []
    for i in range(size):
        client_port, peer_port = ports(i)
        members.append(
            EtcdMember(
                name=f"{name_prefix}{i}",
                data_dir=base_dir / f"{name_prefix}{i}.data",
                host=hosts[i] if hosts else host,
                client_port=client_port,
                peer_port=peer_port,
                netns=netns,
                tls=tls,
                binary=binary,
            )
        )
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    for member in members:
        member.initial_cluster = initial
        member.cluster_token = f"flannel-bpf-{base_dir.name}-{name_prefix}"
    return EtcdCluster(members)
