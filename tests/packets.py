"""Frame builders for the BPF program tests: plain bytes, no scapy."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from flannel_bpf.backends.udp import ip_checksum

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def eth(dst: str, src: str, proto: int = ETH_P_IP) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", proto)


def ipv4(
    src: str,
    dst: str,
    payload: bytes,
    *,
    proto: int = 17,
    ident: int = 0x4242,
    ttl: int = 64,
    tos: int = 0,
    frag: int = 0,
    options: bytes = b"",
    total_length: int | None = None,
) -> bytes:
    ihl = 5 + len(options) // 4
    length = total_length if total_length is not None else ihl * 4 + len(payload)
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            tos,
            length,
            ident,
            frag,
            ttl,
            proto,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
        + options
    )
    struct.pack_into("!H", header, 10, ip_checksum(header))
    return bytes(header) + payload


def udp(sport: int, dport: int, payload: bytes, check: int = 0) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), check) + payload


def vxlan(vni: int, flags: int = 0x08000000) -> bytes:
    return struct.pack("!II", flags, vni << 8)


@dataclass(frozen=True)
class OuterFields:
    """The fields of an encapsulated frame that legitimately differ between two encapsulators."""

    ip_id: int
    ip_check: int
    udp_source: int
    udp_check: int


def outer_fields(frame: bytes) -> OuterFields:
    ip_id, ip_check = struct.unpack_from("!H", frame, 18)[0], struct.unpack_from("!H", frame, 24)[0]
    source, check = struct.unpack_from("!H", frame, 34)[0], struct.unpack_from("!H", frame, 40)[0]
    return OuterFields(ip_id, ip_check, source, check)


def masked(frame: bytes, *, source_port: bool) -> bytes:
    """The frame with IP ID, IP checksum, UDP checksum (and optionally source port) zeroed."""
    out = bytearray(frame)
    for offset in (18, 24, 40) + ((34,) if source_port else ()):
        out[offset : offset + 2] = b"\0\0"
    return bytes(out)


def header_checksum_ok(frame: bytes, offset: int = 14) -> bool:
    return ip_checksum(frame[offset : offset + 20]) == 0
