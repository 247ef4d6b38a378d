"""A real Kubernetes control plane for the lab and the tests: kube-apiserver and
kube-controller-manager (node IPAM) of the release scripts/build-peers.sh builds, on an etcd,
inside a network namespace. Certificates and keys are made here with openssl (throwaway, two
days); kubectl talks to it with an admin kubeconfig; agents get kubeconfigs with service-account
tokens from the TokenRequest API, the way a DaemonSet's pod gets one."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flannel_bpf.lab.netns import in_netns
from flannel_bpf.lab.peers import peer
from flannel_bpf.lab.proc import stop_process
from flannel_bpf.lab.tls import NEW_EC_KEY

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"


class ControlPlaneError(RuntimeError):
    pass


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {args[0]}: {proc.stderr.strip()}")


@dataclass
class ControlPlane:
    """kube-apiserver on host:port in netns, kube-controller-manager allocating node CIDRs."""

    directory: Path
    netns: str | None
    host: str
    etcd_endpoint: str
    cluster_cidr: str = "10.244.0.0/16"
    node_cidr_mask: int = 24
    # Dual stack: node IPAM hands each Node a podCIDR of each family (/64 for IPv6).
    cluster_cidr_v6: str = ""
    port: int = 6443
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.directory / "admin.kubeconfig"

    @property
    def pki(self) -> Path:
        return self.directory / "pki"

    # -- certificates ------------------------------------------------------------------------

    def make_pki(self) -> None:
        pki = self.pki
        pki.mkdir(parents=True, exist_ok=True)
        if (pki / "ca.pem").exists():
            return
        _openssl("req", "-x509", *NEW_EC_KEY, "-keyout", str(pki / "ca-key.pem"),
                 "-out", str(pki / "ca.pem"), "-days", "2",
                 "-subj", "/CN=flannel-bpf kube CA")  # fmt: skip
        sans = ",".join(
            [f"IP:{self.host}", f"IP:{SERVICE_IP}", "IP:127.0.0.1", "DNS:localhost",
             "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
             "DNS:kubernetes.default.svc.cluster.local"]
        )  # fmt: skip
        self._cert("apiserver", "/CN=kube-apiserver", f"subjectAltName={sans}\n"
                   "extendedKeyUsage=serverAuth")  # fmt: skip
        self._cert("admin", "/O=system:masters/CN=flannel-bpf-admin", "extendedKeyUsage=clientAuth")
        self._cert("controller-manager", "/CN=system:kube-controller-manager",
                   "extendedKeyUsage=clientAuth")  # fmt: skip
        # The service-account token signer (ES256).
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout",
                 "-out", str(pki / "sa-key.pem"))  # fmt: skip
        _openssl("ec", "-in", str(pki / "sa-key.pem"), "-pubout", "-out", str(pki / "sa.pem"))

    def _cert(self, name: str, subject: str, ext: str) -> None:
        pki = self.pki
        (pki / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", *NEW_EC_KEY, "-keyout", str(pki / f"{name}-key.pem"),
                 "-out", str(pki / f"{name}.csr"), "-subj", subject)  # fmt: skip
        _openssl("x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.pem"),
                 "-CAkey", str(pki / "ca-key.pem"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(pki / f"{name}.ext"),
                 "-out", str(pki / f"{name}.pem"))  # fmt: skip

    def kubeconfig(self, path: Path, user: dict[str, str]) -> Path:
        """A kubeconfig for this cluster (JSON, which is YAML) with the given user entry."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "lab", "cluster": {
                "server": self.server, "certificate-authority": str(self.pki / "ca.pem")}}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "user"}}],
            "current-context": "lab",
        }  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        path.chmod(0o600)
        return path

    def _client_kubeconfig(self, name: str) -> Path:
        return self.kubeconfig(
            self.directory / f"{name}.kubeconfig",
            {"client-certificate": str(self.pki / f"{name}.pem"),
             "client-key": str(self.pki / f"{name}-key.pem")},
        )  # fmt: skip

    # -- processes ---------------------------------------------------------------------------

    def apiserver_command(self) -> list[str]:
        pki = self.pki
        return in_netns(self.netns, [
            peer("kubernetes").binary("kube-apiserver"),
            f"--etcd-servers={self.etcd_endpoint}",
            f"--bind-address={self.host}",
            f"--advertise-address={self.host}",
            f"--secure-port={self.port}",
            f"--tls-cert-file={pki / 'apiserver.pem'}",
            f"--tls-private-key-file={pki / 'apiserver-key.pem'}",
            f"--client-ca-file={pki / 'ca.pem'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pem'}",
            f"--service-account-signing-key-file={pki / 'sa-key.pem'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            # No kubelets here: nothing to proxy to, no metrics server, one apiserver.
            "--endpoint-reconciler-type=none",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ])  # fmt: skip

    def _cidr_flags(self) -> list[str]:
        if not self.cluster_cidr_v6:
            mask = 64 if ":" in self.cluster_cidr else self.node_cidr_mask  # IPv6-only: /64s
            return [f"--cluster-cidr={self.cluster_cidr}",
                    f"--node-cidr-mask-size={mask}"]  # fmt: skip
        return [f"--cluster-cidr={self.cluster_cidr},{self.cluster_cidr_v6}",
                f"--node-cidr-mask-size-ipv4={self.node_cidr_mask}",
                "--node-cidr-mask-size-ipv6=64"]  # fmt: skip

    def controller_manager_command(self) -> list[str]:
        return in_netns(self.netns, [
            peer("kubernetes").binary("kube-controller-manager"),
            f"--kubeconfig={self._client_kubeconfig('controller-manager')}",
            "--controllers=nodeipam",
            "--allocate-node-cidrs=true",
            *self._cidr_flags(),
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            # Each controller with its own service account, bound by the bootstrap RBAC policy
            # (system:controller:node-controller may patch Nodes), as kubeadm runs it.
            "--use-service-account-credentials=true",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--v=1",
        ])  # fmt: skip

    def start(self, timeout: float = 90.0, controller_manager: bool = True) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.make_pki()
        self._client_kubeconfig("admin").replace(self.admin_kubeconfig)
        self.start_apiserver(timeout)
        if controller_manager:
            self.start_controller_manager()

    def start_controller_manager(self) -> None:
        self._spawn("kube-controller-manager", self.controller_manager_command())

    def start_apiserver(self, timeout: float = 90.0) -> None:
        self._spawn("kube-apiserver", self.apiserver_command())
        self.wait_ready(timeout)

    def stop_apiserver(self) -> None:
        stop_process(self.processes.pop("kube-apiserver", None), timeout=15)

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.processes[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.processes.get("kube-apiserver")
            if proc is not None and proc.poll() is not None:
                raise ControlPlaneError(
                    f"kube-apiserver exited:\n{self.log_tail('kube-apiserver')}"
                )
            ready = self.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
            if ready.returncode == 0 and ready.stdout.strip() == "ok":
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"kube-apiserver not ready after {timeout:.0f} s: {ready.stdout}"
                    f"{ready.stderr}\n{self.log_tail('kube-apiserver')}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver"):
            stop_process(self.processes.pop(name, None), timeout=15)

    # -- using it ----------------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        command = [
            peer("kubernetes").binary("kubectl"),
            f"--kubeconfig={kubeconfig or self.admin_kubeconfig}",
            *args,
        ]
        proc = subprocess.run(
            in_netns(self.netns, command),
            input=input, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def register_node(self, name: str, internal_ip: str) -> None:
        """A Node as kubelet registers one: its name, labels, the annotation kubelet always sets
        (flanneld v0.28.9 panics on a Node with no annotations at all), the InternalIP and
        Hostname addresses."""
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                    "kubernetes.io/os": "linux"},
                         "annotations": {
                             "volumes.kubernetes.io/controller-managed-attach-detach": "true"}},
            "status": {"addresses": [{"type": "InternalIP", "address": internal_ip},
                                     {"type": "Hostname", "address": name}]},
        }  # fmt: skip
        self.kubectl("create", "-f", "-", input=json.dumps(node))

    def wait_pod_cidr(self, name: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            cidr = self.kubectl(
                "get", "node", name, "-o", "jsonpath={.spec.podCIDR}", check=False
            ).stdout.strip()
            if cidr:
                return cidr
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"node {name} got no podCIDR in {timeout:.0f} s:\n"
                    f"{self.log_tail('kube-controller-manager')}"
                )
            time.sleep(0.2)

    def token(self, service_account: str, namespace: str, hours: int = 24) -> str:
        """A bound token for the service account (TokenRequest, as the kubelet asks for one)."""
        return self.kubectl(
            "create", "token", service_account, "-n", namespace, f"--duration={hours}h"
        ).stdout.strip()

    def service_account_kubeconfig(self, path: Path, service_account: str, namespace: str) -> Path:
        return self.kubeconfig(path, {"token": self.token(service_account, namespace)})
