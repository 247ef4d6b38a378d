"""Facts of flannel's VXLAN wire format that the kernel, BPF and userspace data paths share."""

from __future__ import annotations

import os
from typing import Final

# Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14): flanneld subtracts exactly this.
VXLAN_OVERHEAD: Final = 50
# vxlan.ko's udp_port default: what flanneld's "Port": 0 ends up on the wire as.
DEFAULT_VXLAN_PORT: Final = 8472


def random_mac() -> str:
    """mac.NewHardwareAddr: random, locally administered, unicast."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] | 0x02) & 0xFE
    return format_mac(raw)


def parse_mac(text: str) -> str:
    """Go's net.ParseMAC for 48-bit addresses (colon, hyphen or dot form), as lower-case a:b:..

    Longer EUI-64 / InfiniBand forms are refused: a vxlan FDB entry cannot hold them anyway.
    """
    hexdigits = "0123456789abcdefABCDEF"
    if len(text) == 17 and text[2] in ":-":
        sep = text[2]
        groups = text.split(sep)
        if len(groups) == 6 and all(len(g) == 2 and all(c in hexdigits for c in g) for g in groups):
            return ":".join(g.lower() for g in groups)
    elif len(text) == 14 and text[4] == ".":
        groups = text.split(".")
        if len(groups) == 3 and all(len(g) == 4 and all(c in hexdigits for c in g) for g in groups):
            flat = "".join(groups).lower()
            return ":".join(flat[i : i + 2] for i in range(0, 12, 2))
    raise ValueError(f"invalid MAC address: {_shown(text)}")


def mac_to_bytes(mac: str) -> bytes:
    """The 6 bytes of a colon- or hyphen-separated MAC (what leases and ``ip link`` show).

    ValueError for anything else: a header built from a misread MAC would be dropped by the peer
    without a trace, so it is refused up front.
    """
    groups = mac.replace("-", ":").split(":")
    if len(groups) != 6 or any(len(g) != 2 for g in groups):
        raise ValueError(f"invalid MAC address: {_shown(mac)}")
    try:
        raw = bytes.fromhex("".join(groups))
    except ValueError:
        raise ValueError(f"invalid MAC address: {_shown(mac)}") from None
    if len(raw) != 6:  # fromhex skips blanks, so " a:bb:.." would come out short
        raise ValueError(f"invalid MAC address: {_shown(mac)}")
    return raw


def format_mac(raw: bytes | bytearray) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _shown(value: str, limit: int = 40) -> str:
    """A bad value as an error message quotes it: bounded, so a huge one cannot flood the log."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
