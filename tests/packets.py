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


def _rol32(word: int, shift: int) -> int:
    return ((word << shift) | (word >> (32 - shift))) & 0xFFFFFFFF


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    """lookup3's final mix over three words, as bpf/lib/common.h (and the kernel) computes it."""
    mask = 0xFFFFFFFF
    initval = (initval + 0xDEADBEEF + (3 << 2)) & mask
    a, b, c = (a + initval) & mask, (b + initval) & mask, (c + initval) & mask
    c = ((c ^ b) - _rol32(b, 14)) & mask
    a = ((a ^ c) - _rol32(c, 11)) & mask
    b = ((b ^ a) - _rol32(a, 25)) & mask
    c = ((c ^ b) - _rol32(b, 16)) & mask
    a = ((a ^ c) - _rol32(c, 4)) & mask
    b = ((b ^ a) - _rol32(a, 14)) & mask
    c = ((c ^ b) - _rol32(b, 24)) & mask
    return c


def flow_source_port(inner_ip: bytes, local_underlay: str, port_range: tuple[int, int]) -> int:
    """The outer source port our encapsulation gives a packet that carries no flow hash: a hash of
    addresses, protocol and ports (ports only for unfragmented TCP/UDP/SCTP/UDP-Lite), seeded with
    the node's underlay address, folded into the range as udp_flow_src_port() folds it. Words are
    read as the program reads them: network-order bytes loaded little-endian."""

    def word(raw: bytes) -> int:
        return int.from_bytes(raw, "little")

    protocol = inner_ip[9]
    fragment = int.from_bytes(inner_ip[6:8], "big") & 0x3FFF
    ports = word(inner_ip[20:24]) if protocol in (6, 17, 132, 136) and not fragment else 0
    seed = word(socket.inet_aton(local_underlay)) ^ protocol
    hash_ = jhash_3words(word(inner_ip[12:16]), word(inner_ip[16:20]), ports, seed) or 1
    hash_ = (hash_ ^ (hash_ << 16)) & 0xFFFFFFFF
    low, high = port_range
    return ((hash_ * (high - low)) >> 32) + low


ETH_P_IPV6 = 0x86DD


def ipv6(
    src: str,
    dst: str,
    payload: bytes,
    *,
    nexthdr: int = 17,
    hlim: int = 64,
    tclass: int = 0,
    flow: int = 0,
    payload_length: int | None = None,
) -> bytes:
    length = payload_length if payload_length is not None else len(payload)
    first = (6 << 28) | (tclass << 20) | flow
    return (
        struct.pack("!IHBB", first, length, nexthdr, hlim)
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + payload
    )


def flow_source_port6(inner_ip6: bytes, local_underlay: str, port_range: tuple[int, int]) -> int:
    """flow_source_port for an IPv6 packet (bpf/lib/common.h fb_flow_hash6): each address folded
    to one word (the XOR of its four), the next header, ports for TCP/UDP/SCTP/UDP-Lite."""

    def word(raw: bytes) -> int:
        return int.from_bytes(raw, "little")

    def fold(raw: bytes) -> int:
        return word(raw[0:4]) ^ word(raw[4:8]) ^ word(raw[8:12]) ^ word(raw[12:16])

    nexthdr = inner_ip6[6]
    ports = word(inner_ip6[40:44]) if nexthdr in (6, 17, 132, 136) else 0
    seed = word(socket.inet_aton(local_underlay)) ^ nexthdr
    hash_ = jhash_3words(fold(inner_ip6[8:24]), fold(inner_ip6[24:40]), ports, seed) or 1
    hash_ = (hash_ ^ (hash_ << 16)) & 0xFFFFFFFF
    low, high = port_range
    return ((hash_ * (high - low)) >> 32) + low


def pseudo6(src: bytes, dst: bytes, nexthdr: int, length: int) -> bytes:
    """The IPv6 pseudo-header of an upper-layer checksum (RFC 8200 8.1)."""
    return src + dst + struct.pack("!IxxxB", length, nexthdr)


def with_l4_checksum6(packet: bytes, offset: int) -> bytes:
    """An IPv6 packet (fixed header, then TCP, UDP or ICMPv6) with its upper-layer checksum,
    at offset within that segment, filled in."""
    segment = bytearray(packet[40:])
    segment[offset : offset + 2] = b"\0\0"
    check = ip_checksum(pseudo6(packet[8:24], packet[24:40], packet[6], len(segment)) + segment)
    struct.pack_into("!H", segment, offset, check or 0xFFFF)
    return packet[:40] + bytes(segment)


def outer_udp6_checksum_ok(frame: bytes) -> bool:
    """Whether a frame's outer IPv6 UDP checksum (Ethernet, IPv6, UDP at 54) is right: the whole
    datagram with its pseudo-header sums to zero, and the checksum is not 0 (IPv6 forbids it)."""
    datagram = frame[54:]
    total = ip_checksum(pseudo6(frame[22:38], frame[38:54], 17, len(datagram)) + datagram)
    return total == 0 and frame[60:62] != b"\0\0"
