"""What the project can leave on a machine: namespaces, root links, BPF programs, pins, processes.

conftest.py snapshots this before the session and asserts after it that nothing new remains, so a
test that leaks fails the run (the check is a teardown error naming each leftover).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flannel_bpf.datapath.loader import DEFAULT_BPFFS

# Processes the project or its tests start.
PROCESS_MARKERS = (
    "flannel_bpf",
    "flannel-bpf",
    "/usr/bin/etcd ",
    "/usr/bin/prometheus ",
    "iperf3",
    "qperf",
    "tcpdump",
    # the Vagrant lab's libvirt and its VMs
    "/usr/sbin/libvirtd",
    "/usr/sbin/virtlogd",
    "qemu-system",
    "libvirt/network",  # dnsmasq serving a libvirt network
)
# An agent's files at their default paths: tests give every agent its own, so these belong to a
# real agent on the machine and must not appear (or be overwritten) because of a test.
AGENT_DEFAULT_FILES = (Path("/run/flannel-bpf/status.json"), Path("/run/flannel/subnet.env"))
# Where libvirt keeps what the Vagrant lab defines and stores (domains, networks, pools, images),
# and its runtime directory, which exists only while a libvirtd runs.
LIBVIRT_PATHS = (
    Path("/etc/libvirt/qemu"),
    Path("/etc/libvirt/qemu/networks"),
    Path("/etc/libvirt/storage"),
    Path("/var/lib/libvirt/images"),
    Path("/run"),
)
# bpffs entries that are the kernel's, not ours.
KERNEL_PINS = {"maps.debug", "progs.debug"}


@dataclass(frozen=True)
class Snapshot:
    namespaces: frozenset[str]
    root_links: frozenset[str]
    programs: frozenset[str]  # "id name" of every program named like ours (fb_*)
    pins: frozenset[str]
    processes: frozenset[str]  # "pid cmdline"
    libvirt: frozenset[str]  # files libvirt keeps for domains, networks, pools, images
    agent_files: frozenset[str]  # an agent's default status and subnet files, with their mtime

    def minus(self, before: Snapshot) -> dict[str, list[str]]:
        found = {
            "namespaces": self.namespaces - before.namespaces,
            "root namespace links": self.root_links - before.root_links,
            "BPF programs": self.programs - before.programs,
            "pins": self.pins - before.pins,
            "processes": self.processes - before.processes,
            "libvirt files": self.libvirt - before.libvirt,
            "agent files at default paths": self.agent_files - before.agent_files,
        }
        return {kind: sorted(items) for kind, items in found.items() if items}


def _namespaces() -> frozenset[str]:
    netns = Path("/run/netns")
    return frozenset(p.name for p in netns.iterdir()) if netns.is_dir() else frozenset()


def _root_links() -> frozenset[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return frozenset(link["ifname"] for link in json.loads(out.stdout))


def _programs() -> frozenset[str]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    if out.returncode != 0:
        return frozenset()
    return frozenset(
        f"{p['id']} {p.get('name', '')}"
        for p in json.loads(out.stdout or "[]")
        if str(p.get("name", "")).startswith("fb_")
    )


def _pins(root: Path = DEFAULT_BPFFS) -> frozenset[str]:
    if not root.is_dir():
        return frozenset()
    return frozenset(str(p.relative_to(root)) for p in root.rglob("*") if p.name not in KERNEL_PINS)


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _processes() -> frozenset[str]:
    mine = _ancestors()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(marker in cmdline for marker in PROCESS_MARKERS):
            found.add(f"{entry.name} {cmdline.strip()}")
    return frozenset(found)


def _libvirt() -> frozenset[str]:
    found = set()
    for directory in LIBVIRT_PATHS:
        if directory.is_dir():
            for entry in directory.iterdir():
                if directory.name != "run" or entry.name.startswith(("libvirt", "virtlogd")):
                    found.add(str(entry))
    return frozenset(found)


def _agent_files() -> frozenset[str]:
    return frozenset(
        f"{path} (modified {path.stat().st_mtime_ns})"
        for path in AGENT_DEFAULT_FILES
        if path.exists()
    )


def snapshot() -> Snapshot:
    return Snapshot(
        _namespaces(),
        _root_links(),
        _programs(),
        _pins(),
        _processes(),
        _libvirt(),
        _agent_files(),
    )
