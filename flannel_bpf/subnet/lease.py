"""Subnet leases as flanneld stores them in etcd: keys, JSON values and lease events.

Everything here must stay byte-compatible with flanneld (flannel-compat.md sections 1.1, 1.2 and
11): a value another node cannot parse makes every real flanneld drop all of its peers.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

# flanneld's pattern (pkg/subnet/subnet.go), with its unescaped dots kept so that we reject and
# accept exactly the same strings; we match the whole key name rather than only its end because
# anything else under subnets/ is a foreign key, not a lease.
_SUBNET_KEY_RE = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?")
_JSON_WHITESPACE = re.compile(rb"[ \t\r\n]")
# The members kept as raw bytes (lower-cased: Go matches names case-insensitively).
_RAW_MEMBERS = frozenset({"backenddata", "backendv6data"})


class LeaseFormatError(ValueError):
    """A key or value under <prefix>/subnets that is not a flannel lease."""


@dataclass(frozen=True, order=True)
class SubnetKey:
    """The identity of a lease: its IPv4 subnet and, in dual stack, its IPv6 subnet."""

    ipv4: IPv4Network
    ipv6: IPv6Network | None = None

    def __str__(self) -> str:
        return make_subnet_key(self.ipv4, self.ipv6)


def make_subnet_key(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    """The key name flanneld uses: 10.5.72.0-24, or 10.5.72.0-24&fd00:12:13::-56."""
    name = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        name += f"&{ipv6_subnet.network_address.compressed}-{ipv6_subnet.prefixlen}"
    return name


def parse_subnet_key(name: str) -> SubnetKey:
    """Parse a lease key name (the part after <prefix>/subnets/)."""
    match = _SUBNET_KEY_RE.fullmatch(name)
    if match is None:
        raise LeaseFormatError(f"not a subnet key: {name!r}")
    v4, v4_len, v6, v6_len = match.groups()
    try:
        address = IPv4Address(v4)
    except ValueError:
        raise LeaseFormatError(f"bad IPv4 address in subnet key {name!r}") from None
    # flanneld parses the length as a 5-bit (v4) or 7-bit (v6) unsigned integer.
    if int(v4_len) > 31:
        raise LeaseFormatError(f"bad IPv4 prefix length in subnet key {name!r}")
    try:
        subnet = IPv4Network(f"{address}/{v4_len}")
    except ValueError:
        raise LeaseFormatError(f"host bits set in subnet key {name!r}") from None
    ipv6_subnet = None
    if v6 is not None:
        if int(v6_len) > 127:
            raise LeaseFormatError(f"bad IPv6 prefix length in subnet key {name!r}")
        try:
            ipv6_subnet = IPv6Network(f"{IPv6Address(v6)}/{v6_len}")
        except ValueError:
            raise LeaseFormatError(f"bad IPv6 subnet in subnet key {name!r}") from None
    return SubnetKey(subnet, ipv6_subnet)


def compact_json(raw: bytes) -> bytes:
    """Go's json.Compact: drop insignificant whitespace, keep everything else byte for byte.

    Go re-emits a json.RawMessage compacted but otherwise untouched (number spelling, key order),
    so BackendData read from a peer is kept as these exact bytes.
    """
    if _JSON_WHITESPACE.search(raw) is None:
        return raw  # what every flanneld writes: nothing to drop, no byte loop
    out = bytearray()
    in_string = escaped = False
    for byte in raw:
        if in_string:
            out.append(byte)
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte in b" \t\r\n":
            continue
        else:
            out.append(byte)
            if byte == 0x22:
                in_string = True
    return bytes(out)


def _go_field(obj: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    """Go encoding/json field matching: names compare case-insensitively, the last one wins."""
    found, value = False, None
    lowered = name.lower()
    for key, candidate in obj.items():
        if key.lower() == lowered:
            found, value = True, candidate
    return found, value


def _raw_fields(data: bytes, wanted: frozenset[str]) -> dict[str, bytes]:
    """The top-level members of a JSON object whose lower-cased names are in wanted, each value
    as its compacted raw bytes (the others are only stepped over)."""
    decoder = json.JSONDecoder()
    text = data.decode("utf-8")
    idx = _skip_ws(text, 0)
    if idx >= len(text) or text[idx] != "{":
        raise LeaseFormatError("lease value is not a JSON object")
    idx = _skip_ws(text, idx + 1)
    fields: dict[str, bytes] = {}
    if idx < len(text) and text[idx] == "}":
        return fields
    while True:
        key, idx = decoder.raw_decode(text, idx)
        if not isinstance(key, str):
            raise LeaseFormatError("lease value has a non-string member name")
        idx = _skip_ws(text, idx)
        if idx >= len(text) or text[idx] != ":":
            raise LeaseFormatError("lease value is not valid JSON")
        start = _skip_ws(text, idx + 1)
        _, idx = decoder.raw_decode(text, start)
        if key.lower() in wanted:
            fields[key] = compact_json(text[start:idx].encode())
        idx = _skip_ws(text, idx)
        if idx < len(text) and text[idx] == ",":
            idx = _skip_ws(text, idx + 1)
            continue
        if idx < len(text) and text[idx] == "}":
            return fields
        raise LeaseFormatError("lease value is not valid JSON")


def _skip_ws(text: str, idx: int) -> int:
    while idx < len(text) and text[idx] in " \t\r\n":
        idx += 1
    return idx


@dataclass(frozen=True)
class LeaseAttrs:
    """flanneld's LeaseAttrs: what a node tells its peers about itself."""

    public_ip: IPv4Address
    public_ipv6: IPv6Address | None = None
    backend_type: str = ""
    backend_data: bytes = b""  # compact raw JSON, b"" when absent
    backend_v6_data: bytes = b""

    def to_json(self) -> bytes:
        """The exact bytes flanneld's json.Marshal(LeaseAttrs) produces."""
        parts = [
            f'"PublicIP":"{self.public_ip}"',
            '"PublicIPv6":' + (f'"{self.public_ipv6.compressed}"' if self.public_ipv6 else "null"),
        ]
        if self.backend_type:
            parts.append('"BackendType":' + json.dumps(self.backend_type))
        body = ",".join(parts).encode()
        if self.backend_data:
            body += b',"BackendData":' + compact_json(self.backend_data)
        if self.backend_v6_data:
            body += b',"BackendV6Data":' + compact_json(self.backend_v6_data)
        return b"{" + body + b"}"

    def backend_json(self) -> Any:
        """BackendData decoded, or None."""
        return json.loads(self.backend_data) if self.backend_data else None

    @classmethod
    def from_json(cls, data: bytes) -> LeaseAttrs:
        """Decode a lease value the way flanneld does (case-insensitive names, unknown ignored)."""
        try:
            decoded = json.loads(data)
            raw = _raw_fields(data, _RAW_MEMBERS)
        except (UnicodeDecodeError, ValueError) as exc:
            if isinstance(exc, LeaseFormatError):
                raise
            raise LeaseFormatError(f"lease value is not valid JSON: {exc}") from None
        if not isinstance(decoded, dict):
            raise LeaseFormatError("lease value is not a JSON object")

        found, public_ip = _go_field(decoded, "PublicIP")
        if not found:
            address = IPv4Address(0)
        elif not isinstance(public_ip, str):
            raise LeaseFormatError(f"PublicIP is not an IPv4 address string: {public_ip!r}")
        else:
            try:
                address = IPv4Address(public_ip)
            except ValueError:
                raise LeaseFormatError(f"PublicIP is not an IPv4 address: {public_ip!r}") from None

        address_v6 = None
        found, public_ipv6 = _go_field(decoded, "PublicIPv6")
        if found and public_ipv6 is not None:
            if not isinstance(public_ipv6, str):
                raise LeaseFormatError(f"PublicIPv6 is not an address string: {public_ipv6!r}")
            try:
                address_v6 = IPv6Address(public_ipv6)
            except ValueError:
                raise LeaseFormatError(
                    f"PublicIPv6 is not an IPv6 address: {public_ipv6!r}"
                ) from None

        found, backend_type = _go_field(decoded, "BackendType")
        if found and backend_type is not None and not isinstance(backend_type, str):
            raise LeaseFormatError(f"BackendType is not a string: {backend_type!r}")

        _, backend_data = _go_field(raw, "BackendData")
        _, backend_v6_data = _go_field(raw, "BackendV6Data")
        return cls(
            public_ip=address,
            public_ipv6=address_v6,
            backend_type=backend_type or "",
            backend_data=backend_data or b"",
            backend_v6_data=backend_v6_data or b"",
        )


@dataclass(frozen=True)
class Lease:
    """A subnet held by a host: the etcd key's subnet(s) plus the value's attributes."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    ipv6_subnet: IPv6Network | None = None
    # Unix time the etcd lease runs out; None for a reservation (a key with no etcd lease).
    expiration: float | None = None
    lease_id: int = 0
    mod_revision: int = field(default=0, compare=False)

    @property
    def key(self) -> SubnetKey:
        return SubnetKey(self.subnet, self.ipv6_subnet)

    @property
    def key_name(self) -> str:
        return make_subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def identity(self) -> IPv4Network | IPv6Network:
        """What tells this lease from its peers': its IPv4 subnet, or for an IPv6-only lease
        (IPv4 part 0.0.0.0/0, as flanneld's empty IP4Net) its IPv6 subnet."""
        if self.subnet.prefixlen or self.ipv6_subnet is None:
            return self.subnet
        return self.ipv6_subnet


class LeaseEventType(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class LeaseEvent:
    type: LeaseEventType
    lease: Lease
