"""The network config JSON stored at ``<prefix>/config``, parsed and checked as flanneld does.

flanneld v0.28.9 decodes the value with Go ``encoding/json`` into ``subnet.Config``
(``pkg/subnet/config.go``) and then applies ``CheckNetworkConfig``. This module reproduces both
steps, including the Go decoder's quirks that decide whether a config is accepted:

* keys match field names case-insensitively (Go folds with ``ToUpper(ToLower(r))`` per rune),
  unknown keys are ignored, and when several keys map to one field they are applied in document
  order, so the last one wins;
* ``null`` leaves bool and uint fields untouched, resets the pointer fields ``IPv6SubnetMin`` and
  ``IPv6SubnetMax`` to unset, but is handed to the custom decoders of ``Network``,
  ``IPv6Network``, ``SubnetMin`` and ``SubnetMax``, which reject it;
* uint fields take only JSON integers (no fraction, no exponent, no sign) up to 2**64-1;
* ``Backend`` is kept raw: absent gives the type ``udp``, anything else must decode into
  ``struct{ Type string }``, so ``{}`` and ``null`` give the type ``""``.

Error messages keep flanneld's text as a substring and add the key and the offending value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "BackendConfig",
    "ConfigError",
    "NetworkConfig",
    "NoStackError",
    "get_ci",
    "parse_network_config",
]


class ConfigError(ValueError):
    """The network config is unusable; the message is meant for the operator."""


class NoStackError(ConfigError):
    """Both EnableIPv4 and EnableIPv6 are false.

    flanneld treats this differently from the other config errors: they make it poll the config
    again every second, while this one (checked in main.go after the config is accepted) makes it
    exit with status 1. The separate class lets the caller do the same.
    """


_UINT_MAX: Final = 2**64 - 1
# Longer values are cut in messages, so a megabyte of junk cannot flood the log.
_SHOW_LIMIT: Final = 80
# CPython refuses int() on more digits than this (sys.int_info.default_max_str_digits is 4300);
# Go's decoder accepts such literals anywhere a field does not need them.
_MAX_INT_DIGITS: Final = 4000
_EMPTY_OPTIONS: Final[Mapping[str, Any]] = MappingProxyType({})


class _NegativeZero(int):
    """JSON ``-0``: equal to 0, but Go's ParseUint rejects it, so uint fields must see it."""

    def __new__(cls) -> _NegativeZero:
        return super().__new__(cls, 0)

    def __repr__(self) -> str:
        return "-0"


# --------------------------------------------------------------------------------------------
# Go encoding/json helpers


def _go_lower_rune(ch: str) -> str:
    # Go's unicode.ToLower is a one-rune mapping; Python's str.lower() is the full mapping, which
    # expands only U+0130 (whose simple lowercase is "i").
    if ch == "\u0130":
        return "i"
    low = ch.lower()
    return low if len(low) == 1 else ch


def _go_fold(name: str) -> str:
    """The key Go's decoder compares field names by (``foldName`` in encoding/json)."""
    if name.isascii():
        return name.upper()
    out = []
    for ch in name:
        low = _go_lower_rune(ch)
        up = low.upper()
        out.append(up if len(up) == 1 else low)
    return "".join(out)


def _go_lower(text: str) -> str:
    """Go's ``strings.ToLower``: per-rune simple mapping."""
    if text.isascii():
        return text.lower()
    return "".join(_go_lower_rune(ch) for ch in text)


def _ci_matches(pairs: Iterable[tuple[Any, Any]], key: str) -> list[Any]:
    """Values of all keys Go would decode into the field ``key``, in document order."""
    want = _go_fold(key)
    return [v for k, v in pairs if isinstance(k, str) and (k == key or _go_fold(k) == want)]


def get_ci(obj: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """Look ``key`` up the way Go's json decoder fills a scalar struct field named ``key``.

    Every key that equals ``key`` or case-folds to it is applied in iteration (document) order,
    so the last one wins; a JSON ``null`` leaves the field as it was, so it is skipped here and
    ``default`` comes back when nothing else matched. The objects built by
    :func:`parse_network_config` iterate in the order of each key's last occurrence, which makes
    this agree with Go even for repeated keys.
    """
    found = default
    for value in _ci_matches(obj.items(), key):
        if value is not None:
            found = value
    return found


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _show(value: Any) -> str:
    """The value as (possibly shortened) JSON, for an error message."""
    if isinstance(value, _NegativeZero):
        text = "-0"
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = repr(value)
    if len(text) > _SHOW_LIMIT:
        text = text[:_SHOW_LIMIT] + "..."
    # Lone surrogates (from "\ud800" escapes) would make the log handler's encoder fail.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _parse_int(text: str) -> int | float:
    if text == "-0":
        return _NegativeZero()
    if len(text) > _MAX_INT_DIGITS:
        return -math.inf if text.startswith("-") else math.inf
    return int(text)


def _reject_constant(text: str) -> Any:
    raise ValueError(f"{text} is not valid JSON")


def _load_json(text: str) -> tuple[Any, list[tuple[str, Any]] | None]:
    """Decode ``text``; also return the top-level object's key/value pairs in document order.

    Objects become dicts whose iteration order is that of each key's last occurrence, so
    :func:`get_ci` sees repeated keys the way Go applies them.
    """
    last_pairs: list[list[tuple[str, Any]]] = []

    def object_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Objects are completed innermost first, so the top level one is the last seen.
        last_pairs[:] = [pairs]
        obj: dict[str, Any] = {}
        for k, v in pairs:
            obj.pop(k, None)
            obj[k] = v
        return obj

    try:
        value = json.loads(
            text,
            object_pairs_hook=object_hook,
            parse_int=_parse_int,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"invalid JSON in network config at line {exc.lineno} column {exc.colno}"
            f" (offset {exc.pos}): {exc.msg}"
        ) from None
    except RecursionError:
        raise ConfigError("invalid JSON in network config: nested too deeply") from None
    except ValueError as exc:
        raise ConfigError(f"invalid JSON in network config: {exc}") from None
    top_pairs = last_pairs[0] if isinstance(value, dict) and last_pairs else None
    return value, top_pairs


# --------------------------------------------------------------------------------------------
# Address parsing with Go's net.ParseCIDR / net.ParseIP rules (Python's ipaddress is laxer:
# it takes "10.0.0.0" without a prefix, "10.0.0.0/255.255.0.0" and IPv6 zones).


def _split_cidr(text: str, bits: int) -> tuple[str, int] | None:
    addr, sep, plen_text = text.partition("/")
    # Go's dtoi: ASCII digits only, leading zeros allowed, no sign.
    if not sep or not plen_text or not (plen_text.isascii() and plen_text.isdigit()):
        return None
    if len(plen_text.lstrip("0")) > 3:
        return None
    plen = int(plen_text)
    if plen > bits or "%" in addr:
        return None
    return addr, plen


def _parse_ipv4_cidr(text: str) -> IPv4Network | None:
    split = _split_cidr(text, 32)
    if split is None:
        return None
    try:
        return IPv4Network((IPv4Address(split[0]), split[1]), strict=False)
    except ValueError:
        return None


def _parse_ipv6_cidr(text: str) -> IPv6Network | None:
    # Go would also take an IPv4 CIDR here and turn it into a meaningless IPv4-mapped network;
    # rejecting it is the useful choice and cannot break a config that works with flanneld.
    split = _split_cidr(text, 128)
    if split is None:
        return None
    try:
        return IPv6Network((IPv6Address(split[0]), split[1]), strict=False)
    except ValueError:
        return None


def _parse_ipv4_addr(text: str) -> IPv4Address | None:
    if "%" in text:
        return None
    try:
        return IPv4Address(text)
    except ValueError:
        pass
    # flanneld's ParseIP4 is net.ParseIP(s).To4(), which also accepts IPv4-mapped IPv6 text.
    try:
        mapped = IPv6Address(text).ipv4_mapped
    except ValueError:
        return None
    return mapped


def _parse_ipv6_addr(text: str) -> IPv6Address | None:
    if "%" in text:
        return None
    try:
        return IPv6Address(text)
    except ValueError:
        pass
    # flanneld's ParseIP6 is net.ParseIP(s).To16(): IPv4 text becomes ::ffff:a.b.c.d.
    try:
        return IPv6Address(f"::ffff:{IPv4Address(text)}")
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Decoding (flanneld's ParseConfig)


@dataclass
class _Raw:
    """Field values after decoding, before CheckNetworkConfig; Go's zero values as defaults."""

    enable_ipv4: bool = True
    enable_ipv6: bool = False
    enable_nftables: bool = False
    network: IPv4Network | None = None
    ipv6_network: IPv6Network | None = None
    subnet_min: IPv4Address | None = None
    subnet_max: IPv4Address | None = None
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None
    subnet_len: int = 0
    ipv6_subnet_len: int = 0
    backend_present: bool = False
    backend: Any = None


def _decode_bool(name: str, value: Any, current: bool) -> bool:
    if value is None:
        return current
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{name}: expected true or false, got {_kind(value)} {_show(value)}")


def _decode_uint(name: str, value: Any, current: int) -> int:
    if value is None:
        return current
    if isinstance(value, int) and not isinstance(value, bool):
        if isinstance(value, _NegativeZero) or value < 0:
            raise ConfigError(f"{name}: must not be negative, got {_show(value)}")
        if value > _UINT_MAX:
            raise ConfigError(f"{name}: number {_show(value)} is out of range")
        return int(value)
    if isinstance(value, float):
        if value < 0:
            raise ConfigError(f"{name}: must not be negative, got {_show(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{name}: number is too large (out of range for an unsigned integer)")
        if abs(value) > _UINT_MAX:
            raise ConfigError(f"{name}: number {_show(value)} is out of range")
        raise ConfigError(
            f"{name}: expected a whole number without fraction or exponent, got {_show(value)}"
        )
    raise ConfigError(f"{name}: expected an unsigned integer, got {_kind(value)} {_show(value)}")


def _decode_network(name: str, value: Any) -> IPv4Network:
    net = _parse_ipv4_cidr(value) if isinstance(value, str) else None
    if net is None:
        raise ConfigError(f"{name}: invalid IPv4 CIDR format: {_show(value)}")
    return net


def _decode_ipv6_network(name: str, value: Any) -> IPv6Network:
    net = _parse_ipv6_cidr(value) if isinstance(value, str) else None
    if net is None:
        raise ConfigError(f"{name}: invalid IPv6 CIDR format: {_show(value)}")
    return net


def _decode_ipv4_addr(name: str, value: Any) -> IPv4Address:
    addr = _parse_ipv4_addr(value) if isinstance(value, str) else None
    if addr is None:
        raise ConfigError(f"{name}: Invalid IP address format: expected IPv4, got {_show(value)}")
    return addr


def _decode_ipv6_addr(name: str, value: Any) -> IPv6Address | None:
    if value is None:
        return None
    addr = _parse_ipv6_addr(value) if isinstance(value, str) else None
    if addr is None:
        raise ConfigError(f"{name}: Invalid IP address format: expected IPv6, got {_show(value)}")
    return addr


_FIELD_NAMES: Final = (
    "EnableIPv4",
    "EnableIPv6",
    "EnableNFTables",
    "Network",
    "IPv6Network",
    "SubnetMin",
    "SubnetMax",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "SubnetLen",
    "IPv6SubnetLen",
    "Backend",
)
_FIELDS_BY_FOLD: Final[Mapping[str, str]] = MappingProxyType({_go_fold(n): n for n in _FIELD_NAMES})


def _apply(raw: _Raw, name: str, value: Any) -> None:
    match name:
        case "EnableIPv4":
            raw.enable_ipv4 = _decode_bool(name, value, raw.enable_ipv4)
        case "EnableIPv6":
            raw.enable_ipv6 = _decode_bool(name, value, raw.enable_ipv6)
        case "EnableNFTables":
            raw.enable_nftables = _decode_bool(name, value, raw.enable_nftables)
        case "Network":
            raw.network = _decode_network(name, value)
        case "IPv6Network":
            raw.ipv6_network = _decode_ipv6_network(name, value)
        case "SubnetMin":
            raw.subnet_min = _decode_ipv4_addr(name, value)
        case "SubnetMax":
            raw.subnet_max = _decode_ipv4_addr(name, value)
        case "IPv6SubnetMin":
            raw.ipv6_subnet_min = _decode_ipv6_addr(name, value)
        case "IPv6SubnetMax":
            raw.ipv6_subnet_max = _decode_ipv6_addr(name, value)
        case "SubnetLen":
            raw.subnet_len = _decode_uint(name, value, raw.subnet_len)
        case "IPv6SubnetLen":
            raw.ipv6_subnet_len = _decode_uint(name, value, raw.ipv6_subnet_len)
        case "Backend":
            raw.backend_present = True
            raw.backend = value


def _decode(pairs: Iterable[tuple[str, Any]]) -> _Raw:
    raw = _Raw()
    for key, value in pairs:
        name = _FIELDS_BY_FOLD.get(_go_fold(key))
        if name is not None:
            _apply(raw, name, value)
    return raw


def _backend_config(raw: _Raw) -> BackendConfig:
    """flanneld's parseBackendType, plus the lower-casing its backend manager applies."""
    if not raw.backend_present:
        # The documentation promises vxlan here, but the code has always returned udp.
        return BackendConfig(type="udp", options=_EMPTY_OPTIONS)
    value = raw.backend
    prefix = "error decoding Backend property of config"
    if value is None:
        # Go hands the literal "null" to json.RawMessage, so Backend is not empty and decoding
        # it leaves Type as "": flanneld then fails with "unknown backend type: ".
        return BackendConfig(type="", options=_EMPTY_OPTIONS)
    if not isinstance(value, dict):
        raise ConfigError(
            f"{prefix}: json: cannot unmarshal {_kind(value)} into Go value of type"
            f" struct {{ Type string }} (Backend={_show(value)})"
        )
    backend_type = ""
    for t in _ci_matches(value.items(), "Type"):
        if t is None:
            continue
        if not isinstance(t, str):
            raise ConfigError(
                f"{prefix}: json: cannot unmarshal {_kind(t)} into Go struct field .Type of"
                f" type string (Backend.Type={_show(t)})"
            )
        backend_type = t
    return BackendConfig(type=_go_lower(backend_type), options=MappingProxyType(value))


# --------------------------------------------------------------------------------------------
# Checks and defaults (flanneld's CheckNetworkConfig)


def _derive_subnet_len(
    configured: int, prefix: int, *, v6: bool, max_len: int, smallest: int, default: int
) -> int:
    """SubnetLen validation and default, shared by both families.

    ``smallest`` is the longest network prefix that still leaves four subnets; networks at least
    two bits shorter than ``default`` get ``default``-sized subnets, smaller ones are split in four.
    """
    len_key = "IPv6SubnetLen" if v6 else "SubnetLen"
    net_key = "IPv6Network" if v6 else "Network"
    if configured > 0:
        if configured > max_len:
            raise ConfigError(
                f"SubnetLen must be less than /{max_len + 1} ({len_key}={configured})"
            )
        if configured < prefix + 2:
            raise ConfigError(
                "network must be able to accommodate at least four subnets"
                f" ({len_key}={configured} with {net_key} prefix /{prefix};"
                f" {len_key} must be at least {prefix + 2})"
            )
        return configured
    if prefix > smallest:
        too_small = "IPv6Network is too small" if v6 else "network is too small"
        raise ConfigError(
            f"{too_small}. Minimum useful network prefix is /{smallest}"
            f" ({net_key} prefix /{prefix})"
        )
    if prefix <= default - 2:
        return default
    return prefix + 2


_Net = IPv4Network | IPv6Network
_Addr = IPv4Address | IPv6Address


def _range_and_alignment(
    net: _Net,
    subnet_len: int,
    explicit: tuple[_Addr | None, _Addr | None],
    *,
    v6: bool,
) -> tuple[int, int]:
    """SubnetMin/SubnetMax defaults, range and alignment checks; returns them as integers."""
    prefix = "IPv6" if v6 else ""
    net_key = f"{prefix}Network"
    size = 1 << (net.max_prefixlen - subnet_len)
    first = int(net.network_address)
    # Skipping the first subnet is flanneld's: its network address would clash with the Network's.
    defaults = (first + size, first + net.num_addresses - size)
    bounds: list[int] = []
    for which, given, derived in zip(("Min", "Max"), explicit, defaults, strict=True):
        key = f"{prefix}Subnet{which}"
        # The unspecified address means "unset", as flanneld tests against IP4(0) / IsEmpty.
        if given is None or int(given) == 0:
            bounds.append(derived)
        elif given in net:
            bounds.append(int(given))
        else:
            raise ConfigError(
                f"{key} is not in the range of the {net_key} ({key}={given}, {net_key}={net})"
            )
    for which, value in zip(("Min", "Max"), bounds, strict=True):
        if value % size:
            key = f"{prefix}Subnet{which}"
            addr = IPv6Address(value) if v6 else IPv4Address(value)
            raise ConfigError(
                f"{key} is not on a SubnetLen boundary: {addr}"
                f" ({key}={addr}, {prefix}SubnetLen={subnet_len})"
            )
    # flanneld has no SubnetMin <= SubnetMax check: an inverted range is accepted and only
    # shows up later as "out of subnets" when allocating. Keep it that way.
    return bounds[0], bounds[1]


def _check_ipv4(raw: _Raw) -> tuple[IPv4Network, int, IPv4Address, IPv4Address]:
    net = raw.network
    if net is None or (int(net.network_address) == 0 and net.prefixlen == 0):
        given = "Network is missing" if net is None else f"Network={net}"
        raise ConfigError(
            f"please define a correct Network parameter in the flannel config ({given})"
        )
    subnet_len = _derive_subnet_len(
        raw.subnet_len, net.prefixlen, v6=False, max_len=30, smallest=28, default=24
    )
    lo, hi = _range_and_alignment(net, subnet_len, (raw.subnet_min, raw.subnet_max), v6=False)
    return net, subnet_len, IPv4Address(lo), IPv4Address(hi)


def _check_ipv6(raw: _Raw) -> tuple[IPv6Network, int, IPv6Address, IPv6Address]:
    net = raw.ipv6_network
    if net is None or (int(net.network_address) == 0 and net.prefixlen == 0):
        given = "IPv6Network is missing" if net is None else f"IPv6Network={net}"
        raise ConfigError(
            f"please define a correct IPv6Network parameter in the flannel config ({given})"
        )
    subnet_len = _derive_subnet_len(
        raw.ipv6_subnet_len, net.prefixlen, v6=True, max_len=126, smallest=124, default=64
    )
    lo, hi = _range_and_alignment(
        net, subnet_len, (raw.ipv6_subnet_min, raw.ipv6_subnet_max), v6=True
    )
    return net, subnet_len, IPv6Address(lo), IPv6Address(hi)


# --------------------------------------------------------------------------------------------
# Public types


@dataclass(frozen=True)
class BackendConfig:
    """The ``Backend`` object of the config.

    ``type`` is ``Backend.Type`` lower-cased; whether it names a known backend is decided when the
    backend is built (flanneld: ``unknown backend type: <type>``).
    """

    type: str
    # Read-only view of the object as given. Not hashed: mappings are not hashable.
    options: Mapping[str, Any] = field(default_factory=lambda: _EMPTY_OPTIONS, hash=False)

    def get(self, key: str, default: Any = None) -> Any:
        """A backend option, looked up as Go's json decoder would (see :func:`get_ci`)."""
        return get_ci(self.options, key, default)


@dataclass(frozen=True)
class NetworkConfig:
    """A config that passed flanneld's checks, with every default filled in.

    The fields of a disabled address family are ``None`` (and its subnet length 0): flanneld
    ignores them, and so must every user of this object.
    """

    enable_ipv4: bool
    enable_ipv6: bool
    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Address | None
    subnet_max: IPv4Address | None
    ipv6_network: IPv6Network | None
    ipv6_subnet_len: int
    ipv6_subnet_min: IPv6Address | None
    ipv6_subnet_max: IPv6Address | None
    enable_nftables: bool
    backend: BackendConfig

    def subnet_size(self) -> int:
        """Addresses per IPv4 lease; meaningful only when IPv4 is enabled."""
        return 1 << (32 - self.subnet_len)

    def ipv6_subnet_size(self) -> int:
        """Addresses per IPv6 lease; meaningful only when IPv6 is enabled."""
        return 1 << (128 - self.ipv6_subnet_len)

    def is_compatible_v4(self, subnet: IPv4Network) -> bool:
        """flanneld's isSubnetConfigCompat: in SubnetMin..SubnetMax with the right prefix.

        Alignment is deliberately not checked. With IPv4 disabled flanneld compares against its
        zero values, so only ``0.0.0.0/0`` would pass; that is reproduced.
        """
        lo = int(self.subnet_min) if self.subnet_min is not None else 0
        hi = int(self.subnet_max) if self.subnet_max is not None else 0
        ip = int(subnet.network_address)
        return lo <= ip <= hi and subnet.prefixlen == self.subnet_len

    def is_compatible_v6(self, subnet: IPv6Network | None) -> bool:
        """flanneld's isIPv6SubnetConfigCompat.

        ``None`` (or ``::/0``, Go's empty IP6Net) means the lease has no IPv6 subnet, which is
        what a lease must have when IPv6 is disabled and must not have when it is enabled.
        """
        empty = subnet is None or (int(subnet.network_address) == 0 and subnet.prefixlen == 0)
        if not self.enable_ipv6:
            return empty
        if subnet is None or empty or self.ipv6_subnet_min is None or self.ipv6_subnet_max is None:
            return False
        return (
            self.ipv6_subnet_min <= subnet.network_address <= self.ipv6_subnet_max
            and subnet.prefixlen == self.ipv6_subnet_len
        )


def parse_network_config(data: bytes | bytearray | memoryview | str) -> NetworkConfig:
    """Parse and check the value of ``<prefix>/config``; raises only :class:`ConfigError`.

    :class:`NoStackError` (a ConfigError) means both address families are disabled, which
    flanneld treats as fatal rather than waiting for a better config.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        # Go's decoder keeps invalid UTF-8 inside strings as U+FFFD and rejects it elsewhere;
        # decoding with "replace" gives the same outcome.
        text = bytes(data).decode("utf-8", "replace")
    elif isinstance(data, str):
        text = data
    else:
        raise ConfigError(f"network config must be bytes or str, not {type(data).__name__}")

    value, pairs = _load_json(text)
    if value is None:
        # Go decodes a top-level null into the untouched defaults.
        pairs = []
    elif pairs is None:
        raise ConfigError(
            f"network config must be a JSON object, got {_kind(value)} {_show(value)}"
        )
    raw = _decode(pairs)
    backend = _backend_config(raw)

    network = ipv6_network = None
    subnet_min = subnet_max = None
    ipv6_subnet_min = ipv6_subnet_max = None
    subnet_len = ipv6_subnet_len = 0
    if raw.enable_ipv4:
        network, subnet_len, subnet_min, subnet_max = _check_ipv4(raw)
    if raw.enable_ipv6:
        ipv6_network, ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max = _check_ipv6(raw)
    if not raw.enable_ipv4 and not raw.enable_ipv6:
        raise NoStackError("none defined stack (EnableIPv4=false and EnableIPv6=false)")

    return NetworkConfig(
        enable_ipv4=raw.enable_ipv4,
        enable_ipv6=raw.enable_ipv6,
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        ipv6_network=ipv6_network,
        ipv6_subnet_len=ipv6_subnet_len,
        ipv6_subnet_min=ipv6_subnet_min,
        ipv6_subnet_max=ipv6_subnet_max,
        enable_nftables=raw.enable_nftables,
        backend=backend,
    )
