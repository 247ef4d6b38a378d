"""Compile, load, attach and drive the BPF data path (bpf/), and take it down again.

The life cycle, as an operator sees it:

- ``BPFDatapath.load()`` compiles bpf/ with bcc, opens this agent instance's pinned maps (checking
  their layout, recreating any that changed shape), loads the programs through bpf(2) (XDP with
  frags, which bcc 0.26 cannot ask for), writes fb_config and attaches: encapsulation at tc egress
  of the flannel device (flannel.<VNI> for VXLAN, flannel0 for the udp format), decapsulation at
  native XDP on the uplink or, where that cannot work, at tc ingress. Programs already attached
  by an earlier run are replaced in place, so traffic never sees a gap.
- ``sync_remotes()`` makes fb_remotes equal the lease set (mark and sweep); ``set_remote()`` and
  ``delete_remote()`` apply single lease events.
- A normal stop leaves everything attached and pinned: the data path outlives the agent.
  ``cleanup()`` (``flannel-bpf cleanup``) detaches and unpins it all.

Everything here is blocking (compiling takes about a second): the agent calls it from a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import socket
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.datapath import bpf_sys
from flannel_bpf.datapath.bpf_maps import (
    ALL_MAPS,
    FB_CFG_CHECK_SOURCES,
    LAYOUT_VERSION,
    DatapathConfig,
    LayoutMismatch,
    PinnedMaps,
    Remote,
    check_layout,
)

log = logging.getLogger(__name__)


def _bundled_sources() -> Path:
    """bpf/ of a source checkout, or its copy inside an installed package (flannel_bpf/bpf)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "bpf"
    return installed if (installed / "tc_encap.c").is_file() else package.parent / "bpf"


BPF_SOURCE_DIR: Final = Path(os.environ.get("FLANNEL_BPF_SOURCE_DIR", _bundled_sources()))
DEFAULT_BPFFS: Final = Path("/run/flannel-bpf/bpffs")
OUR_PREFIX: Final = "fb_"


@dataclass(frozen=True)
class WireFormat:
    """One of flannel's wire formats: the entry program for each hook (names = functions)."""

    name: str
    encap: str  # tc egress on the flannel device
    xdp_decap: str  # XDP on the uplink
    tc_decap: str  # tc ingress on the uplink

    @property
    def programs(self) -> tuple[str, str, str]:
        return (self.encap, self.xdp_decap, self.tc_decap)


VXLAN: Final = WireFormat("vxlan", "fb_tc_encap", "fb_xdp_decap", "fb_tc_decap")
UDP: Final = WireFormat("udp", "fb_tc_udp_encap", "fb_xdp_udp_decap", "fb_tc_udp_decap")
WIRE_FORMATS: Final = {w.name: w for w in (VXLAN, UDP)}
# One file per entry program; all compile as one unit sharing the maps.
ENTRY_FILES: Final = (
    "tc_encap.c",
    "xdp_decap.c",
    "tc_decap.c",
    "tc_udp_encap.c",
    "xdp_udp_decap.c",
    "tc_udp_decap.c",
    "tc_pod.c",
)
# Host routing (vxlan only): tc ingress and egress of each pod's veth on the host side.
POD_EGRESS: Final = "fb_tc_pod_egress"
POD_DELIVER: Final = "fb_tc_pod_deliver"

# tc: a fixed priority and handle, so a restart replaces our filter instead of adding another.
TC_PRIO: Final = 1
TC_HANDLE: Final = 0xFB
TC_EGRESS: Final = 0xFFFFFFF3
TC_INGRESS: Final = 0xFFFFFFF2
ETH_P_ALL: Final = 0x0003

# linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST: Final = 1 << 0
XDP_FLAGS_SKB_MODE: Final = 1 << 1
XDP_FLAGS_DRV_MODE: Final = 1 << 2

# linux/ethtool.h, linux/sockios.h
SIOCETHTOOL: Final = 0x8946
ETHTOOL_GDRVINFO: Final = 0x00000003
ETHTOOL_GGRO: Final = 0x0000002B
ETHTOOL_SGRO: Final = 0x0000002C

DECAP_MODES: Final = ("auto", "xdp", "tc", "xdp-generic")


class LoaderError(Exception):
    """The BPF data path cannot be set up; the message says why, for the fallback log line."""


# --------------------------------------------------------------------------------------------
# Source and build environment


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def program_source(source_dir: Path = BPF_SOURCE_DIR) -> str:
    """The entry programs as one translation unit, local headers inlined.

    bcc only rewrites map accesses written in its main file, so headers cannot stay separate
    files; ``#line`` keeps compiler and verifier messages pointing at the real file and line.
    """
    search = (source_dir, source_dir / "include", source_dir / "lib")
    seen: set[Path] = set()
    out: list[str] = []

    def emit(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        rel = path.relative_to(source_dir.resolve())
        out.append(f'#line 1 "{rel}"')
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = _INCLUDE.match(line)
            if match is None:
                out.append(line)
                continue
            target = next((d / match[1] for d in search if (d / match[1]).is_file()), None)
            if target is None:
                raise LoaderError(f"{rel}:{number}: cannot find included file {match[1]!r}")
            emit(target)
            out.append(f'#line {number + 1} "{rel}"')

    for entry in ENTRY_FILES:
        emit(source_dir / entry)
    return "\n".join(out) + "\n"


def kernel_headers_problem() -> str | None:
    """Why bcc would fail to find kernel headers, or None. Checked first for a clear message."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        path = Path(os.environ["BCC_KERNEL_SOURCE"])
        return None if path.is_dir() else f"BCC_KERNEL_SOURCE={path} does not exist"
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        return (
            f"no kernel headers at {build} (run `make setup`: it installs linux-headers-amd64 "
            f"and links them there)"
        )
    return None


def ensure_bpffs(root: Path = DEFAULT_BPFFS) -> None:
    """Mount a bpf filesystem at root unless one is there (the pins must live on bpffs)."""
    if bpf_sys.is_bpffs(root):
        return
    root.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpffs", os.fsencode(str(root)), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise LoaderError(f"cannot mount bpffs at {root}: {os.strerror(err)}")
    log.info("mounted bpffs at %s", root)


def netns_tag() -> str:
    """'host' in the initial network namespace, else 'netns-<inode>' of ours."""
    own = os.stat("/proc/self/ns/net").st_ino
    try:
        init = os.stat("/proc/1/ns/net").st_ino
    except OSError:
        init = -1
    return "host" if own == init else f"netns-{own}"


def pin_dir_for(device: str, root: Path = DEFAULT_BPFFS) -> Path:
    """This agent instance's pins: per network namespace and VTEP device, per layout version."""
    # bpffs refuses names with dots (flannel.1): keep the pin path readable without them.
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", device)
    return root / netns_tag() / safe / f"v{LAYOUT_VERSION}"


# --------------------------------------------------------------------------------------------
# Compiling and loading


@dataclass
class Programs:
    """Loaded program fds; closed once attached (the attachment keeps them alive)."""

    encap: int
    xdp_decap: int
    tc_decap: int

    def close(self) -> None:
        for fd in (self.encap, self.xdp_decap, self.tc_decap):
            if fd >= 0:
                os.close(fd)
        self.encap = self.xdp_decap = self.tc_decap = -1


@dataclass
class PodPrograms:
    """Host routing's programs, kept open while the agent runs: pods come and go."""

    egress: int
    deliver: int

    def close(self) -> None:
        for fd in (self.egress, self.deliver):
            if fd >= 0:
                os.close(fd)
        self.egress = self.deliver = -1


def prepare_pins(pin_dir: Path) -> list[str]:
    """Remove pins whose map no longer has our layout; returns what was removed and why."""
    removed = []
    for spec in ALL_MAPS:
        path = pin_dir / spec.name
        try:
            fd = bpf_sys.obj_get(path)
        except FileNotFoundError:
            continue
        try:
            check_layout(fd, spec)
        except LayoutMismatch as exc:
            log.warning("pinned map %s has another layout (%s); recreating it", path, exc)
            path.unlink()
            removed.append(str(exc))
        finally:
            os.close(fd)
    return removed


def ensure_maps(pin_dir: Path) -> None:
    """Create and pin whichever of this instance's maps does not exist yet (layouts as declared
    in bpf/lib/maps.h, mirrored by ALL_MAPS)."""
    pin_dir.mkdir(parents=True, exist_ok=True)
    for spec in ALL_MAPS:
        path = pin_dir / spec.name
        if path.exists():
            continue
        fd = bpf_sys.map_create(
            spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, spec.name
        )
        try:
            bpf_sys.obj_pin(fd, path)
        finally:
            os.close(fd)


def _built(source_dir: Path) -> Any:
    from flannel_bpf.datapath.bpf_build import BuildError, objects

    every_program = (*(name for w in WIRE_FORMATS.values() for name in w.programs), POD_EGRESS,
                     POD_DELIVER)  # fmt: skip
    try:
        return objects(program_source(source_dir), every_program)
    except BuildError as exc:
        raise LoaderError(str(exc)) from None


def _load(pin_dir: Path, source_dir: Path, wanted: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Load each program of ``wanted`` (name -> program type, load flags) from one build, bound
    to this instance's pinned maps (created when missing), opened once for all of them. On any
    refusal nothing stays loaded."""
    from flannel_bpf.datapath.bpf_build import BuildError

    built = _built(source_dir)
    ensure_maps(pin_dir)
    map_fds: dict[str, int] = {}
    fds: dict[str, int] = {}
    try:
        for spec in ALL_MAPS:
            map_fds[spec.name] = bpf_sys.obj_get(pin_dir / spec.name)
        for name, (prog_type, flags) in wanted.items():
            fds[name] = bpf_sys.prog_load(
                prog_type, built.bytecode(name, map_fds), name, prog_flags=flags
            )
    except (bpf_sys.BPFError, BuildError) as exc:
        for fd in fds.values():
            os.close(fd)
        raise LoaderError(f"the kernel refused a program: {exc}") from None
    finally:
        for fd in map_fds.values():
            os.close(fd)  # the loaded programs hold their own references
    return fds


_TC = (bpf_sys.BPF_PROG_TYPE_SCHED_CLS, 0)


def compile_pod_programs(pin_dir: Path, source_dir: Path = BPF_SOURCE_DIR) -> PodPrograms:
    """Host routing's two programs, bound to the instance's maps."""
    fds = _load(pin_dir, source_dir, {POD_EGRESS: _TC, POD_DELIVER: _TC})
    return PodPrograms(fds[POD_EGRESS], fds[POD_DELIVER])


def compile_programs(
    pin_dir: Path, wire: WireFormat = VXLAN, source_dir: Path = BPF_SOURCE_DIR
) -> Programs:
    """Load ``wire``'s programs bound to this instance's pinned maps (created when missing).

    The bytecode comes from flannel_bpf.datapath.bpf_build: compiled by bcc in a child process
    and cached, so neither bcc nor LLVM is ever loaded into the agent.
    """
    # Frags: jumbo underlays and multi-buffer NICs reach the XDP program instead of failing.
    xdp = (bpf_sys.BPF_PROG_TYPE_XDP, bpf_sys.BPF_F_XDP_HAS_FRAGS)
    fds = _load(pin_dir, source_dir, {wire.encap: _TC, wire.tc_decap: _TC, wire.xdp_decap: xdp})
    return Programs(fds[wire.encap], fds[wire.xdp_decap], fds[wire.tc_decap])


# --------------------------------------------------------------------------------------------
# Attaching


def _link(ipr: Any, ifindex: int) -> Any:
    links = ipr.link("get", index=ifindex)
    return links[0]


def xdp_program(ipr: Any, ifindex: int) -> tuple[str | None, int]:
    """The XDP attachment of a device: (mode 'xdp'/'xdpgeneric'/..., program id) or (None, 0)."""
    xdp = _link(ipr, ifindex).get_attr("IFLA_XDP")
    if xdp is None:
        return None, 0
    mode = xdp.get_attr("IFLA_XDP_ATTACHED")
    prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
    return (mode if prog_id else None), int(prog_id)


def _ours(prog_id: int) -> bool:
    info = bpf_sys.prog_info_by_id(prog_id) if prog_id else None
    return info is not None and info.name.startswith(OUR_PREFIX)


def attach_xdp(ipr: Any, ifindex: int, fd: int, flags: int) -> None:
    ipr.link("set", index=ifindex, xdp={"attrs": [["IFLA_XDP_FD", fd], ["IFLA_XDP_FLAGS", flags]]})


def detach_xdp(ipr: Any, ifindex: int, flags: int = 0) -> None:
    ipr.link("set", index=ifindex, xdp={"attrs": [["IFLA_XDP_FD", -1], ["IFLA_XDP_FLAGS", flags]]})


def ensure_clsact(ipr: Any, ifindex: int) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def tc_filter(ipr: Any, ifindex: int, parent: int) -> str | None:
    """The program name in our filter slot (prio and handle) on a hook; None when empty."""
    try:
        filters = ipr.get_filters(index=ifindex, parent=parent)
    except NetlinkError:
        return None
    for msg in filters:
        if msg.get_attr("TCA_KIND") != "bpf" or int(msg["handle"]) != TC_HANDLE:
            continue
        if (int(msg["info"]) >> 16) != TC_PRIO:
            continue
        options = msg.get_attr("TCA_OPTIONS")
        name = options.get_attr("TCA_BPF_NAME") if options is not None else None
        return str(name or "")
    return None


def attach_tc(ipr: Any, ifindex: int, parent: int, fd: int, name: str) -> None:
    """Create or atomically replace our filter (fixed prio and handle), direct action."""
    ensure_clsact(ipr, ifindex)
    ipr.tc(
        "replace-filter",
        "bpf",
        ifindex,
        TC_HANDLE,
        parent=parent,
        prio=TC_PRIO,
        protocol=ETH_P_ALL,
        fd=fd,
        name=name,
        classid=1,
        direct_action=True,
    )


def detach_tc(ipr: Any, ifindex: int, parent: int) -> bool:
    if tc_filter(ipr, ifindex, parent) is None:
        return False
    try:
        ipr.tc(
            "del-filter",
            "bpf",
            ifindex,
            TC_HANDLE,
            parent=parent,
            prio=TC_PRIO,
            protocol=ETH_P_ALL,
        )
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL):
            raise
        return False
    return True


def set_gro(ifname: str, enabled: bool) -> bool:
    """ethtool -K <dev> gro on|off; returns whether GRO was on before."""
    value = (ctypes.c_uint32 * 2)(ETHTOOL_GGRO, 0)
    ifreq = struct.pack("16sQ8x", ifname.encode(), ctypes.addressof(value))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
        before = bool(value[1])
        if before != enabled:
            value[0], value[1] = ETHTOOL_SGRO, int(enabled)
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    return before


def driver_name(ifname: str) -> str:
    """The device's driver as ethtool -i reports it ('' when the device will not say)."""
    # struct ethtool_drvinfo: cmd, then driver[32] first among its strings; 196 bytes in all.
    buf = bytearray(struct.pack("I", ETHTOOL_GDRVINFO) + bytes(192))
    holder = (ctypes.c_char * len(buf)).from_buffer(buf)
    ifreq = struct.pack("16sQ8x", ifname.encode(), ctypes.addressof(holder))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    except OSError:
        return ""
    return bytes(buf[4:36]).split(b"\0", 1)[0].decode(errors="replace")


def rp_filter(ifname: str) -> int:
    """The effective reverse-path filter for a device: max(all, device), as the kernel uses."""
    base = Path("/proc/sys/net/ipv4/conf")
    values = []
    for name in ("all", ifname):
        try:
            values.append(int((base / name / "rp_filter").read_text()))
        except (OSError, ValueError):
            values.append(0)
    return max(values)


def local_port_range() -> tuple[int, int]:
    """The namespace's ephemeral range: where vxlan.ko picks outer source ports."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def default_ttl() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_default_ttl").read_text())
    except (OSError, ValueError):
        return 64


def ipv6_hop_limit(device: str) -> int:
    """The hop limit the kernel gives IPv6 packets out of device (ip6_dst_hoplimit without a
    route metric), which vxlan.ko's flannel-v6 puts on its frames."""
    try:
        return int(Path(f"/proc/sys/net/ipv6/conf/{device}/hop_limit").read_text())
    except (OSError, ValueError):
        return 64


# --------------------------------------------------------------------------------------------
# The data path


@dataclass(frozen=True)
class Device:
    name: str
    index: int
    mac: str


@dataclass
class AttachState:
    """What load() did: for logs, status and the lab."""

    decap: str = ""  # "xdp", "xdp-generic" or "tc"
    decap_reason: str = ""  # why not native XDP, when it is not
    replaced: list[str] = field(default_factory=list)


class BPFDatapath:
    """One agent instance's BPF data path: its pins, its programs, its maps."""

    def __init__(
        self,
        *,
        vtep: Device | None,
        uplink: Device,
        config: DatapathConfig,
        pin_dir: Path,
        bpffs_root: Path = DEFAULT_BPFFS,
        decap_mode: str = "auto",
        wire: WireFormat = VXLAN,
        pod_bridge: str = "",
        vtep6: Device | None = None,
    ) -> None:
        if decap_mode not in DECAP_MODES:
            raise LoaderError(f"unknown decapsulation mode {decap_mode!r}")
        if pod_bridge and (wire is not VXLAN or decap_mode in ("xdp", "xdp-generic")):
            # XDP runs before there is an skb to hand to a pod (bpf_redirect_peer is tc's).
            raise LoaderError("host routing needs the vxlan format and tc decapsulation "
                              f"(--bpf-decap auto or tc, not {decap_mode})")  # fmt: skip
        if vtep is None and vtep6 is None:
            raise LoaderError("no VTEP to encapsulate at")
        self.vtep = vtep  # flannel.<VNI>, or None in an IPv6-only network
        self.vtep6 = vtep6  # flannel-v6.<VNI>: IPv6 pod packets, encapsulated by the same program
        self.uplink = uplink
        self.config = config
        self.pin_dir = pin_dir
        self.bpffs_root = bpffs_root
        self.decap_mode = decap_mode
        self.wire = wire
        self.state = AttachState()
        self.maps: PinnedMaps | None = None
        # Host routing: the pods' bridge, its programs (open for pods yet to come), the ports
        # (ifindex -> name) that carry them.
        self.pod_bridge = pod_bridge
        self.pod_programs: PodPrograms | None = None
        self.pod_ports: dict[int, str] = {}
        # What fb_remotes and fb_senders hold, as we wrote them: fb_senders counts, per underlay
        # address, the remotes naming it, so a peer's last lease going takes its address along.
        self._remotes: dict[IPv4Network | IPv6Network, Remote] = {}
        self._senders: Counter[IPv4Address | IPv6Address] = Counter()

    # -- setup ---------------------------------------------------------------------------------

    def load(self) -> AttachState:
        ensure_bpffs(self.bpffs_root)
        prepare_pins(self.pin_dir)
        programs = compile_programs(self.pin_dir, self.wire)
        try:
            try:
                self.maps = PinnedMaps(self.pin_dir)
            except (OSError, LayoutMismatch) as exc:
                raise LoaderError(f"cannot open the pinned maps in {self.pin_dir}: {exc}") from None
            previous = self.maps.read_config()
            # Config first: programs attached from here on must never run unconfigured.
            self.maps.write_config(self.config)
            if self.pod_bridge:
                self.pod_programs = compile_pod_programs(self.pin_dir)
            with IPRoute() as ipr:
                self._attach_decap(ipr, programs)
                self._attach_encap(ipr, programs)
                for old, new in (
                    (previous.vtep_ifindex if previous else 0, self.config.vtep_ifindex),
                    (previous.vtep6_ifindex if previous else 0, self.config.vtep6_ifindex),
                ):
                    if old and old != new:
                        # A family turned off (or its VTEP made anew): our program leaves the
                        # old device.
                        detach_ours([old])
                if self.pod_programs is not None:
                    self._attach_pod_ports(ipr)
                else:
                    self._detach_pod_ports(ipr)
        except NetlinkError as exc:
            self.close()
            raise LoaderError(f"attaching failed: {exc}") from None
        except BaseException:
            self.close()
            raise
        finally:
            programs.close()
        return self.state

    def _attach_encap(self, ipr: Any, programs: Programs) -> None:
        for vtep in (self.vtep, self.vtep6):
            if vtep is None:
                continue
            current = tc_filter(ipr, vtep.index, TC_EGRESS)
            attach_tc(ipr, vtep.index, TC_EGRESS, programs.encap, self.wire.encap)
            if current is not None:
                self.state.replaced.append(f"tc egress {vtep.name}")

    def _attach_decap(self, ipr: Any, programs: Programs) -> None:
        uplink = self.uplink
        mode, prog_id = xdp_program(ipr, uplink.index)
        foreign = mode is not None and not _ours(prog_id)
        strict = rp_filter(uplink.name) == 1
        want = self.decap_mode
        reason = ""
        if want == "auto":
            if self.pod_bridge:
                want, reason = "tc", "host routing hands packets to pods from tc"
            elif strict:
                want, reason = "tc", f"rp_filter is strict (1) on {uplink.name}"
            elif foreign:
                want, reason = "tc", f"another XDP program (id {prog_id}) is attached"
            elif driver_name(uplink.name) == "veth":
                # Measured (docs/benchmarks.md): native XDP on a veth forces TSO off on its peer,
                # so every sender segments in software; tc ingress leaves TSO alone.
                want, reason = (
                    "tc",
                    f"{uplink.name} is a veth: native XDP would turn TSO off on its peer",
                )
            else:
                want = "xdp"
        elif want in ("xdp", "xdp-generic") and foreign:
            raise LoaderError(
                f"another XDP program (id {prog_id}) is attached to {uplink.name}; not replacing it"
            )

        if want in ("xdp", "xdp-generic") and strict:
            log.warning(
                "rp_filter is strict on %s: XDP-decapsulated packets will fail the reverse-path "
                "check; use --bpf-decap=auto or tc, or rp_filter 0/2",
                uplink.name,
            )
        if want in ("xdp", "xdp-generic"):
            flags = XDP_FLAGS_DRV_MODE if want == "xdp" else XDP_FLAGS_SKB_MODE
            if mode is not None and mode != ("xdp" if want == "xdp" else "xdpgeneric"):
                # The other mode's program of ours would keep running beside the new one.
                detach_xdp(
                    ipr,
                    uplink.index,
                    XDP_FLAGS_SKB_MODE if mode == "xdpgeneric" else XDP_FLAGS_DRV_MODE,
                )
                mode = None
            try:
                attach_xdp(ipr, uplink.index, programs.xdp_decap, flags)
            except NetlinkError as exc:
                if self.decap_mode != "auto":
                    raise LoaderError(
                        f"cannot attach {want} to {uplink.name}: {os.strerror(exc.code)}"
                    ) from None
                want, reason = (
                    "tc",
                    f"native XDP cannot attach to {uplink.name}: {os.strerror(exc.code)}",
                )
            else:
                if mode is not None:
                    self.state.replaced.append(f"xdp {uplink.name}")
                if want == "xdp" and not set_gro(uplink.name, True):
                    log.info("enabled GRO on %s for XDP decapsulation", uplink.name)
                if detach_tc(ipr, uplink.index, TC_INGRESS):
                    log.info("removed the tc-ingress decapsulation left on %s", uplink.name)
                self.state.decap = want
                self.state.decap_reason = reason
                return

        # tc ingress: either chosen, or where XDP could not go.
        current = tc_filter(ipr, uplink.index, TC_INGRESS)
        attach_tc(ipr, uplink.index, TC_INGRESS, programs.tc_decap, self.wire.tc_decap)
        if current is not None:
            self.state.replaced.append(f"tc ingress {uplink.name}")
        if mode is not None and not foreign:
            detach_xdp(
                ipr,
                uplink.index,
                XDP_FLAGS_SKB_MODE if mode == "xdpgeneric" else XDP_FLAGS_DRV_MODE,
            )
            log.info("removed the XDP decapsulation left on %s", uplink.name)
        self.state.decap = "tc"
        self.state.decap_reason = reason

    # -- host routing: the pods' veths -----------------------------------------------------------

    def _bridge_ports(self, ipr: Any) -> dict[int, str] | None:
        """The veths on the pods' bridge (None: no such bridge yet, e.g. before the first pod)."""
        found = ipr.link_lookup(ifname=self.pod_bridge)
        if not found:
            return None
        ports = {}
        for link in ipr.get_links():
            if link.get_attr("IFLA_MASTER") == found[0]:
                info = link.get_attr("IFLA_LINKINFO")
                if info is not None and info.get_attr("IFLA_INFO_KIND") == "veth":
                    ports[int(link["index"])] = str(link.get_attr("IFLA_IFNAME"))
        return ports

    def _attach_pod_ports(self, ipr: Any) -> list[str]:
        """Attach the pod programs to every veth of the bridge not carrying them yet; forget the
        pods of veths gone. Returns the names attached."""
        assert self.pod_programs is not None
        ports = self._bridge_ports(ipr) or {}
        attached = []
        for index, name in ports.items():
            if index in self.pod_ports:
                continue
            try:
                attach_tc(ipr, index, TC_INGRESS, self.pod_programs.egress, POD_EGRESS)
                attach_tc(ipr, index, TC_EGRESS, self.pod_programs.deliver, POD_DELIVER)
            except NetlinkError as exc:
                if exc.code in (errno.ENODEV, errno.ENOENT):
                    continue  # the pod went while we attached
                raise
            self.pod_ports[index] = name
            attached.append(name)
        gone = [index for index in self.pod_ports if index not in ports]
        for index in gone:
            del self.pod_ports[index]
            if self.maps is not None:
                self.maps.forget_endpoints(index)
        return attached

    def _detach_pod_ports(self, ipr: Any) -> None:
        """Host routing off: remove our pod programs from the bridge's veths (if any)."""
        bridge = self.pod_bridge or "cni0"
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            return
        for link in ipr.get_links():
            if link.get_attr("IFLA_MASTER") == found[0]:
                index = int(link["index"])
                detach_tc(ipr, index, TC_INGRESS)
                detach_tc(ipr, index, TC_EGRESS)
        if self.maps is not None:
            self.maps.forget_endpoints()
            self.maps.forget_flows()

    def refresh_pod_ports(self) -> list[str]:
        """New pods' veths get the programs (host routing's periodic check)."""
        if self.pod_programs is None:
            return []
        with IPRoute() as ipr:
            return self._attach_pod_ports(ipr)

    def status(self) -> dict[str, str]:
        """Where it runs and why, for the status file."""
        return {
            "pin_dir": str(self.pin_dir),
            "decap": self.state.decap,
            "decap_reason": self.state.decap_reason,
            "uplink": self.uplink.name,
            "anti_spoofing": "on" if self.config.flags & FB_CFG_CHECK_SOURCES else "off",
            "host_routing": "bpf" if self.pod_bridge else "kernel",
            **({"pod_bridge": self.pod_bridge} if self.pod_bridge else {}),
        }

    def close(self) -> None:
        """Release our fds. The data path stays attached and pinned."""
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        if self.pod_programs is not None:
            self.pod_programs.close()
            self.pod_programs = None

    # -- remotes -------------------------------------------------------------------------------

    def _require_maps(self) -> PinnedMaps:
        if self.maps is None:
            raise LoaderError("the BPF data path is not loaded")
        return self.maps

    def set_remote(self, remote: Remote) -> None:
        maps = self._require_maps()
        maps.set_remote(remote)
        previous = self._remotes.get(remote.subnet)
        self._remotes[remote.subnet] = remote
        old = _senders_of(previous) if previous is not None else []
        new = _senders_of(remote)
        for address in new:
            if address not in old:
                self._count_sender(maps, address, +1)
        for address in old:
            if address not in new:
                self._count_sender(maps, address, -1)

    def delete_remote(self, subnet: IPv4Network | IPv6Network) -> bool:
        maps = self._require_maps()
        deleted = maps.delete_remote(subnet)
        previous = self._remotes.pop(subnet, None)
        for address in _senders_of(previous) if previous is not None else []:
            self._count_sender(maps, address, -1)
        return deleted

    def _count_sender(
        self, maps: PinnedMaps, address: IPv4Address | IPv6Address, change: int
    ) -> None:
        self._senders[address] += change
        if self._senders[address] > 0:
            maps.set_sender(address, self._senders[address])
        else:
            del self._senders[address]
            maps.delete_sender(address)

    def ipv6_carriers(self) -> set[IPv4Address]:
        """The IPv4 VTEPs fb_remotes6 sends IPv6 subnets to (not skipped ones, nor those sent
        over the IPv6 underlay)."""
        return {
            remote.vtep_ip
            for remote in self._remotes.values()
            if remote.subnet.version == 6 and not remote.flags
        }

    def sync_remotes(self, wanted: Iterable[Remote]) -> tuple[int, int]:
        """Mark and sweep: fb_remotes becomes exactly ``wanted`` (and fb_senders their
        addresses). Returns (written, removed) remotes."""
        maps = self._require_maps()
        desired = {r.subnet: r for r in wanted}
        present = {r.subnet: r for r in maps.remotes()}
        removed = 0
        for subnet in present.keys() - desired.keys():
            if maps.delete_remote(subnet):
                removed += 1
        written = 0
        for subnet, remote in desired.items():
            if present.get(subnet) != remote:
                maps.set_remote(remote)
                written += 1
        senders = Counter(a for r in desired.values() for a in _senders_of(r))
        for address in maps.senders().keys() - senders.keys():
            maps.delete_sender(address)
        for address, leases in senders.items():
            maps.set_sender(address, leases)
        self._remotes, self._senders = desired, senders
        return written, removed


def _senders_of(remote: Remote) -> list[IPv4Address | IPv6Address]:
    """The underlay addresses a remote's frames come from: its IPv4 VTEP (none for an IPv6
    subnet of a peer without IPv4) and, for an IPv6 subnet, its PublicIPv6."""
    found: list[IPv4Address | IPv6Address] = []
    if not remote.vtep_ip.is_unspecified:
        found.append(remote.vtep_ip)
    if remote.vtep_ip6 is not None:
        found.append(remote.vtep_ip6)
    return found


def attached(vtep_index: int, uplink_index: int, vtep6_index: int = 0) -> dict[str, str]:
    """What runs where now, for status: hook -> program name (and XDP mode); tc_encap6 is the
    encapsulation at flannel-v6.<VNI>."""
    found: dict[str, str] = {}
    with IPRoute() as ipr:
        encap = tc_filter(ipr, vtep_index, TC_EGRESS) if vtep_index else None
        if encap:
            found["tc_encap"] = encap
        encap6 = tc_filter(ipr, vtep6_index, TC_EGRESS) if vtep6_index else None
        if encap6:
            found["tc_encap6"] = encap6
        decap = tc_filter(ipr, uplink_index, TC_INGRESS)
        if decap:
            found["tc_decap"] = decap
        mode, prog_id = xdp_program(ipr, uplink_index)
        if mode is not None:
            info = bpf_sys.prog_info_by_id(prog_id)
            found[mode] = info.name if info else f"id {prog_id}"
    return found


def _devices_of(pin_dir: Path) -> list[int]:
    """The uplink and VTEP ifindexes the instance recorded in its fb_config, if readable."""
    try:
        with PinnedMaps(pin_dir) as maps:
            cfg = maps.read_config()
    except (OSError, LayoutMismatch):
        return []
    return (
        [i for i in (cfg.uplink_ifindex, cfg.vtep_ifindex, cfg.vtep6_ifindex) if i] if cfg else []
    )


def detach_ours(ifindexes: Iterable[int]) -> list[str]:
    """Detach every program of ours (by name) from these devices; returns what it did."""
    done: list[str] = []
    with IPRoute() as ipr:
        for index in ifindexes:
            try:
                name = _link(ipr, index).get_attr("IFLA_IFNAME")
            except (NetlinkError, IndexError):
                continue
            mode, prog_id = xdp_program(ipr, index)
            if mode is not None and _ours(prog_id):
                flags = XDP_FLAGS_SKB_MODE if mode == "xdpgeneric" else XDP_FLAGS_DRV_MODE
                detach_xdp(ipr, index, flags)
                done.append(f"detached XDP from {name}")
            for parent, hook in ((TC_EGRESS, "egress"), (TC_INGRESS, "ingress")):
                current = tc_filter(ipr, index, parent)
                if current is not None and current.startswith(OUR_PREFIX):
                    detach_tc(ipr, index, parent)
                    done.append(f"detached tc {hook} from {name}")
    return done


def unpin(pin_dir: Path) -> list[str]:
    """Remove an instance's pins and its now empty directories up to the netns level."""
    done: list[str] = []
    if not pin_dir.is_dir():
        return done
    for pin in sorted(pin_dir.iterdir()):
        pin.unlink()
        done.append(f"unpinned {pin}")
    for directory in (pin_dir, pin_dir.parent, pin_dir.parent.parent):
        try:
            directory.rmdir()
        except OSError:
            break
    return done


def _pod_ports() -> list[int]:
    """Devices carrying host routing's programs (pods' veths), whichever bridge they are on."""
    found = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            index = int(link["index"])
            names = (tc_filter(ipr, index, TC_INGRESS), tc_filter(ipr, index, TC_EGRESS))
            if any(name and name.startswith(("fb_tc_pod", POD_EGRESS)) for name in names):
                found.append(index)
    return found


def cleanup(pin_dir: Path) -> list[str]:
    """Take one instance's data path down: detach (devices from its fb_config, and pods' veths
    carrying host routing's programs), then unpin."""
    return detach_ours([*_devices_of(pin_dir), *_pod_ports()]) + unpin(pin_dir)


def instance_dirs(root: Path = DEFAULT_BPFFS) -> list[Path]:
    """Every agent instance's pin directory in this network namespace (all layout versions)."""
    base = root / netns_tag()
    if not base.is_dir():
        return []
    return sorted(d for inst in base.iterdir() if inst.is_dir() for d in inst.glob("v*"))


def live_netns_inodes() -> set[int]:
    """Inodes of every network namespace in use by a process or named in /run/netns."""
    inodes: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                inodes.add(os.stat(entry / "ns" / "net").st_ino)
            except OSError:
                continue
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        for entry in netns_dir.iterdir():
            try:
                inodes.add(entry.stat().st_ino)
            except OSError:
                continue
    return inodes


def remove_orphans(root: Path = DEFAULT_BPFFS) -> list[str]:
    """Unpin the maps of network namespaces that no longer exist (their programs died with them)."""
    if not root.is_dir():
        return []
    live = live_netns_inodes()
    done: list[str] = []
    for netns_dir in sorted(root.glob("netns-*")):
        try:
            inode = int(netns_dir.name.removeprefix("netns-"))
        except ValueError:
            continue
        if inode in live:
            continue
        for pin_dir in sorted(netns_dir.glob("*/v*")):
            done += unpin(pin_dir)
        for leftover in (*netns_dir.glob("*"), netns_dir):
            with contextlib.suppress(OSError):
                leftover.rmdir()
    return done
