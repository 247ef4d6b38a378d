"""The Vagrant lab driven from this machine: the box, a libvirtd of its own, `vagrant up`, ssh.

libvirtd and virtlogd run inside a network namespace made for them, and so does every `vagrant`
command: libvirt's bridges, dnsmasq and firewall rules live and die in that namespace, and the
host's own interfaces and routes are never touched (vm-lab-notes). libvirt's configuration and
storage are the machine's (/etc/libvirt, /var/lib/libvirt); everything the lab adds there is named
flannel-bpf-* and removed again by name, also what a crashed earlier run left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flannel_bpf.lab.netns import (
    CommandError,
    add_netns,
    delete_netns,
    in_netns,
    netns_exists,
    run,
    stop_netns_processes,
)

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_DIR = ROOT / "vagrant"
CACHE = Path(os.environ.get("FLANNEL_BPF_BOX_CACHE", "/var/cache/flannel-bpf/vagrant"))
PREFIX = "flannel-bpf-"
BOX_NAME = "flannel-bpf/node"
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
# Runtime files the daemons leave behind; removed when the lab made them.
LIBVIRT_RUNTIME = (Path("/run/libvirt"), Path("/run/libvirtd.pid"), Path("/run/virtlogd.pid"))


class VagrantLabError(CommandError):
    """What the lab itself refuses; a failing command raises CommandError (its base)."""


def build_box() -> Path:
    """Builds the box, or finds it in the cache (vagrant/box/build.sh); its directory."""
    proc = subprocess.run(
        ["bash", str(VAGRANT_DIR / "box" / "build.sh")],
        stdout=subprocess.PIPE,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise VagrantLabError("building the box failed (its output is above)")
    return Path(proc.stdout.strip().splitlines()[-1])


def libvirtd_running() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(LIBVIRT_SOCKET))
        except OSError:
            return False
    return True


@dataclass
class Libvirtd:
    """virtlogd and libvirtd in a network namespace of their own."""

    netns: str
    log_dir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    made_runtime: list[Path] = field(default_factory=list)

    def virsh(self, *args: str, timeout: float = 120) -> str:
        return run(
            in_netns(self.netns, ["virsh", "-q", "-c", "qemu:///system", *args]), timeout=timeout
        )

    def start(self, timeout: float = 60) -> None:
        if libvirtd_running():
            raise VagrantLabError(
                f"a libvirtd already answers on {LIBVIRT_SOCKET}; the lab runs its own inside a "
                "network namespace: stop the other one first"
            )
        self.made_runtime = [path for path in LIBVIRT_RUNTIME if not path.exists()]
        add_netns(self.netns)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for daemon in ("virtlogd", "libvirtd"):
            with open(self.log_dir / f"{daemon}.log", "ab") as log:
                self.processes.append(
                    subprocess.Popen(
                        in_netns(self.netns, [f"/usr/sbin/{daemon}"]),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.virsh("version", timeout=10)
                break
            except (CommandError, subprocess.TimeoutExpired) as exc:
                if any(p.poll() is not None for p in self.processes) or (
                    time.monotonic() > deadline
                ):
                    raise VagrantLabError(f"libvirtd did not come up: {exc}") from None
                time.sleep(0.3)

    def remove_lab_objects(self) -> list[str]:
        """Domains, networks and volumes named flannel-bpf-*, and a storage pool no longer used."""
        removed = []
        for domain in self.virsh("list", "--all", "--name").split():
            if domain.startswith(PREFIX):
                with contextlib.suppress(CommandError):
                    self.virsh("destroy", domain)
                self.virsh("undefine", domain, "--nvram", "--remove-all-storage")
                removed.append(f"domain {domain}")
        for network in self.virsh("net-list", "--all", "--name").split():
            if network.startswith(PREFIX):
                with contextlib.suppress(CommandError):
                    self.virsh("net-destroy", network)
                self.virsh("net-undefine", network)
                removed.append(f"network {network}")
        for pool in self.virsh("pool-list", "--all", "--name").split():
            with contextlib.suppress(CommandError):
                self.virsh("pool-refresh", pool)
            volumes = self.virsh("vol-list", pool).splitlines()
            names = [line.split()[0] for line in volumes if line.strip()]
            for volume in names:
                if volume.startswith(PREFIX):
                    self.virsh("vol-delete", volume, "--pool", pool)
                    removed.append(f"volume {volume}")
            if pool == "default" and all(name.startswith(PREFIX) for name in names):
                # vagrant-libvirt defined the default pool for the lab; leave no definition.
                with contextlib.suppress(CommandError):
                    self.virsh("pool-destroy", pool)
                self.virsh("pool-undefine", pool)
                removed.append(f"pool {pool}")
        return removed

    def stop(self) -> None:
        """The daemons and whatever libvirt started in the namespace (dnsmasq, a qemu left by a
        failure), given 15 s to exit; then the namespace itself."""
        if netns_exists(self.netns):
            stop_netns_processes(self.netns, grace=15)
            delete_netns(self.netns)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.processes.clear()
        for path in self.made_runtime:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@dataclass
class VagrantLab:
    """vagrant/Vagrantfile on libvirt, each command inside the libvirtd's namespace."""

    box_dir: Path
    workers: int = 3
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    libvirtd: Libvirtd = field(init=False)
    state_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.state_dir = Path("/run/flannel-bpf") / f"vagrant-{self.run_id}"
        self.libvirtd = Libvirtd(f"fbvm-{self.run_id}", self.state_dir / "logs")

    @property
    def nodes(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.workers + 1)]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "VAGRANT_CWD": str(VAGRANT_DIR),
            "VAGRANT_DOTFILE_PATH": str(self.state_dir / "dotfile"),
            "VAGRANT_HOME": str(CACHE / "home"),
            "VAGRANT_DEFAULT_PROVIDER": "libvirt",
            "VAGRANT_CHECKPOINT_DISABLE": "1",
            "VAGRANT_NO_COLOR": "1",
            "FLANNEL_BPF_BOX_DIR": str(self.box_dir),
            "FLANNEL_BPF_WORKERS": str(self.workers),
        }

    def vagrant(self, *args: str, timeout: float = 900) -> str:
        return run(
            in_netns(self.libvirtd.netns, ["vagrant", *args]), timeout=timeout, env=self.env()
        )

    def add_box(self) -> bool:
        """`vagrant box add` unless this very box (by its cache key) is the one added."""
        stamp = CACHE / "home" / "flannel-bpf-box"
        if stamp.exists() and stamp.read_text() == self.box_dir.name:
            return False
        run(
            [
                "vagrant",
                "box",
                "add",
                "--force",
                "--name",
                BOX_NAME,
                str(self.box_dir / "flannel-bpf-node.box"),
            ],
            timeout=600,
            env=self.env(),
        )
        stamp.write_text(self.box_dir.name)
        return True

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.libvirtd.start()
        self.libvirtd.remove_lab_objects()  # what an interrupted run may have left

    def up(self) -> None:
        self.vagrant("up", "--provider", "libvirt", timeout=1200)
        ssh_config = self.vagrant("ssh-config")
        (self.state_dir / "ssh_config").write_text(ssh_config)

    def ssh(
        self, node: str, command: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """A command on a VM as root, over plain ssh with Vagrant's settings (faster than
        `vagrant ssh`)."""
        proc = subprocess.run(
            in_netns(
                self.libvirtd.netns,
                [
                    "ssh",
                    "-F",
                    str(self.state_dir / "ssh_config"),
                    node,
                    f"sudo sh -c {shlex.quote(command)}",
                ],
            ),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise VagrantLabError(
                f"{node}: {command}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n"
                f"{proc.stderr[-2000:]}"
            )
        return proc

    def interactive_ssh(self, node: str, command: Sequence[str]) -> int:
        """ssh to a VM with the terminal attached: a shell, or a command run as root."""
        remote = [f"sudo sh -c {shlex.quote(shlex.join(command))}"] if command else []
        argv = ["ssh", "-F", str(self.state_dir / "ssh_config"), *(["-t"] if not command else [])]
        return subprocess.run(in_netns(self.libvirtd.netns, [*argv, node, *remote])).returncode

    def host(self, command: Sequence[str], timeout: float = 60) -> str:
        """A command on the host side of the lab's network (the libvirtd's namespace)."""
        return run(in_netns(self.libvirtd.netns, command), timeout=timeout)

    def status_of(self, node: str) -> dict[str, object]:
        info: dict[str, object] = json.loads(
            self.ssh(node, "flannel-bpf status -o json").stdout or "{}"
        )
        return info

    def destroy(self) -> None:
        with contextlib.suppress(CommandError, subprocess.TimeoutExpired):
            self.vagrant("destroy", "-f", timeout=300)

    def stop(self) -> list[str]:
        """Everything the lab made goes: VMs, networks, volumes, daemons, namespace, state."""
        removed: list[str] = []
        if netns_exists(self.libvirtd.netns) and libvirtd_running():
            with contextlib.suppress(CommandError, subprocess.TimeoutExpired):
                removed = self.libvirtd.remove_lab_objects()
        self.libvirtd.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return removed


STATE_FILE = Path("/run/flannel-bpf/vagrant-lab.json")


def save(lab: VagrantLab) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "run_id": lab.run_id,
        "box_dir": str(lab.box_dir),
        "workers": lab.workers,
        "made_runtime": [str(path) for path in lab.libvirtd.made_runtime],
    }
    STATE_FILE.write_text(json.dumps(state, indent=2) + "\n")


def load() -> VagrantLab:
    try:
        state = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        raise VagrantLabError("no Vagrant lab is up (flannel-bpf vagrant up starts one)") from None
    lab = VagrantLab(Path(state["box_dir"]), int(state["workers"]), state["run_id"])
    lab.libvirtd.made_runtime = [Path(path) for path in state["made_runtime"]]
    return lab


def lab_up(workers: int, say: Callable[[str], None]) -> VagrantLab:
    """Builds (or reuses) the box and boots the lab, left running; `lab_down` removes it."""
    if STATE_FILE.exists():
        raise VagrantLabError(
            f"a Vagrant lab is already up ({STATE_FILE}); flannel-bpf vagrant down first"
        )
    timings: list[tuple[str, float]] = []
    with phase("box (build or reuse)", timings, say):
        box_dir = build_box()
    lab = VagrantLab(box_dir, workers)
    try:
        with phase("libvirtd in its own namespace", timings, say):
            lab.start()
        save(lab)
        with phase("vagrant box add", timings, say):
            lab.add_box()
        with phase(f"vagrant up: etcd + {workers} workers", timings, say):
            lab.up()
    except BaseException:
        lab.destroy()
        lab.stop()
        STATE_FILE.unlink(missing_ok=True)
        raise
    return lab


def lab_down() -> list[str]:
    lab = load()
    lab.destroy()
    removed = lab.stop()
    STATE_FILE.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def phase(
    name: str, timings: list[tuple[str, float]], say: Callable[[str], None]
) -> Iterator[None]:
    """Times one phase of the lab's life and says so."""
    started = time.monotonic()
    say(f"{name} ...")
    try:
        yield
    finally:
        took = time.monotonic() - started
        timings.append((name, took))
        say(f"{name}: {took:.1f} s")
