"""Network namespaces and the links between them, driven through iproute2.

The lab and the tests create everything inside namespaces they name themselves, and remove it
again; nothing here touches the root namespace's addresses or routes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from flannel_bpf.lab.proc import alive

NETNS_DIR = Path("/run/netns")


class CommandError(RuntimeError):
    pass


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30,
    env: dict[str, str] | None = None,
) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        # Tools such as vagrant say what went wrong on stdout: its end goes into the message too.
        output = f"\n{proc.stdout[-3000:].rstrip()}" if proc.stdout.strip() else ""
        raise CommandError(
            f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()[-3000:]}{output}"
        )
    return proc.stdout


def in_netns(netns: str | None, cmd: Sequence[str]) -> list[str]:
    """The argv that runs cmd inside netns (or as is, for None)."""
    return ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def add_netns(name: str) -> None:
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def delete_netns(name: str) -> None:
    """Remove a namespace; every link inside it goes with it. Missing is fine."""
    if netns_exists(name):
        run(["ip", "netns", "delete", name], check=False)


def stop_netns_processes(name: str, grace: float = 0.0) -> None:
    """Everything running in the namespace: SIGTERM and up to grace seconds to exit, then
    SIGKILL (at once with no grace)."""
    try:
        pids = [int(pid) for pid in run(["ip", "netns", "pids", name], check=False).split()]
    except (CommandError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL) if grace > 0 else (signal.SIGKILL,):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
        while (pids := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)


def list_netns(prefix: str) -> list[str]:
    if not NETNS_DIR.exists():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def add_veth(
    netns_a: str, name_a: str, netns_b: str, name_b: str, *, mtu: int | None = None
) -> None:
    """A veth pair created directly inside the two namespaces (never visible in the root one)."""
    cmd = ["ip", "-n", netns_a, "link", "add", name_a]
    if mtu:
        cmd += ["mtu", str(mtu)]
    cmd += ["type", "veth", "peer", "name", name_b, "netns", netns_b]
    if mtu:
        cmd += ["mtu", str(mtu)]
    run(cmd)


def add_address(netns: str, dev: str, cidr: str) -> None:
    run(["ip", "-n", netns, "addr", "add", cidr, "dev", dev])


def link_up(netns: str, dev: str) -> None:
    run(["ip", "-n", netns, "link", "set", dev, "up"])


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the calling thread inside netns for the block (sockets made there stay there).

    For tests that need an in-process view of a namespace (BPF_PROG_TEST_RUN's FIB lookups, raw
    sockets); the previous namespace is restored even when the block raises.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, open(NETNS_DIR / netns, "rb") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")


def http_get(
    netns: str, url: str, timeout: float = 10.0, data: bytes | None = None
) -> tuple[int, bytes]:
    """GET (POST with data) url from inside netns: (status, body). OSError if nothing answers."""
    import urllib.error
    import urllib.request

    with entered(netns):
        # The connection is opened here, so its socket belongs to netns for its whole life.
        try:
            with urllib.request.urlopen(url, data, timeout=timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())
