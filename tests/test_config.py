"""Tests for flannel_bpf.subnet.config: flanneld's network config decoding, defaults and checks."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannel_bpf.subnet.config import (
    BackendConfig,
    ConfigError,
    NetworkConfig,
    NoStackError,
    get_ci,
    parse_network_config,
)

V6_ONLY = '"EnableIPv4": false, "EnableIPv6": true'


def cfg(body: str) -> str:
    return "{" + body + "}"


# --------------------------------------------------------------------------------------------
# Valid configs: (json, {field: expected}); expected values are compared as strings.

VALID: list[tuple[str, dict[str, Any]]] = [
    # flanneld's own unit tests (pkg/subnet/config_test.go).
    (
        '{ "network": "10.3.0.0/16" }',
        {
            "network": "10.3.0.0/16",
            "subnet_len": 24,
            "subnet_min": "10.3.1.0",
            "subnet_max": "10.3.255.0",
        },
    ),
    (
        '{ "Network": "10.3.0.0/16", "SubnetMin": "10.3.5.0", "SubnetMax": "10.3.8.0",'
        ' "SubnetLen": 28 }',
        {"subnet_len": 28, "subnet_min": "10.3.5.0", "subnet_max": "10.3.8.0"},
    ),
    (
        '{ "enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false }',
        {
            "enable_ipv4": False,
            "enable_ipv6": True,
            "network": None,
            "ipv6_network": "fc00::/48",
            "ipv6_subnet_len": 64,
            "ipv6_subnet_min": "fc00:0:0:1::",
            "ipv6_subnet_max": "fc00:0:0:ffff::",
        },
    ),
    (
        '{ "EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::",'
        ' "IPv6SubnetMax": "fc00:0:0:f::", "IPv6SubnetLen": 124, "enableIPv4": false }',
        {
            "ipv6_subnet_len": 124,
            "ipv6_subnet_min": "fc00:0:0:1::",
            "ipv6_subnet_max": "fc00:0:0:f::",
        },
    ),
    # SubnetLen derivation: 24 for /22 and larger, prefix + 2 for /23 .. /28.
    (cfg('"Network": "10.0.0.0/8"'), {"subnet_len": 24, "subnet_max": "10.255.255.0"}),
    (cfg('"Network": "10.0.0.0/22"'), {"subnet_len": 24, "subnet_min": "10.0.1.0"}),
    (
        cfg('"Network": "10.0.0.0/23"'),
        {"subnet_len": 25, "subnet_min": "10.0.0.128", "subnet_max": "10.0.1.128"},
    ),
    (cfg('"Network": "10.0.0.0/24"'), {"subnet_len": 26, "subnet_max": "10.0.0.192"}),
    (cfg('"Network": "10.0.0.0/26"'), {"subnet_len": 28, "subnet_min": "10.0.0.16"}),
    (
        cfg('"Network": "10.0.0.0/28"'),
        {"subnet_len": 30, "subnet_min": "10.0.0.4", "subnet_max": "10.0.0.12"},
    ),
    (cfg('"Network": "0.0.0.0/1"'), {"subnet_len": 24, "subnet_min": "0.0.1.0"}),
    # The last subnet of the address space: Go's uint32 wraps, the result must not.
    (cfg('"Network": "255.255.0.0/16"'), {"subnet_max": "255.255.255.0"}),
    # SubnetLen 0 means "derive"; explicit lengths from prefix + 2 up to 30.
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": 0'), {"subnet_len": 24}),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": 18'), {"subnet_len": 18}),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetLen": 30'),
        {"subnet_len": 30, "subnet_min": "10.0.0.4", "subnet_max": "10.0.255.252"},
    ),
    (cfg('"Network": "10.0.0.0/8", "SubnetLen": 20'), {"subnet_max": "10.255.240.0"}),
    # Host bits of Network are masked off.
    (cfg('"Network": "10.5.1.0/16"'), {"network": "10.5.0.0/16", "subnet_min": "10.5.1.0"}),
    # Go's CIDR parser takes leading zeros in the prefix length.
    (cfg('"Network": "10.0.0.0/016"'), {"network": "10.0.0.0/16"}),
    (cfg('"Network": "10.0.0.0/00000000000008"'), {"network": "10.0.0.0/8"}),
    # 0.0.0.0 / :: stand for "unset" and give the defaults.
    (cfg('"Network": "10.0.0.0/16", "SubnetMin": "0.0.0.0"'), {"subnet_min": "10.0.1.0"}),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetMax": "::"'),
        {"ipv6_subnet_max": "fc00:0:0:ffff::"},
    ),
    # SubnetMin may be the network address itself, and there is no SubnetMin <= SubnetMax check.
    (cfg('"Network": "10.0.0.0/16", "SubnetMin": "10.0.0.0"'), {"subnet_min": "10.0.0.0"}),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetMin": "10.0.9.0", "SubnetMax": "10.0.2.0"'),
        {"subnet_min": "10.0.9.0", "subnet_max": "10.0.2.0"},
    ),
    # flanneld's ParseIP4 is ParseIP(s).To4(), so IPv4-mapped IPv6 text is an IPv4 address.
    (
        cfg('"Network": "10.0.0.0/16", "SubnetMin": "::ffff:10.0.7.0"'),
        {"subnet_min": "10.0.7.0"},
    ),
    # IPv6 derivation: 64 for /62 and larger, prefix + 2 for /63 .. /124.
    (cfg(V6_ONLY + ', "IPv6Network": "fc00::/62"'), {"ipv6_subnet_len": 64}),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/63"'),
        {
            "ipv6_subnet_len": 65,
            "ipv6_subnet_min": "fc00::8000:0:0:0",
            "ipv6_subnet_max": "fc00:0:0:1:8000::",
        },
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/124"'),
        {"ipv6_subnet_len": 126, "ipv6_subnet_min": "fc00::4", "ipv6_subnet_max": "fc00::c"},
    ),
    (cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetLen": 50'), {"ipv6_subnet_len": 50}),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00:0:0:1::5/48"'),
        {"ipv6_network": "fc00::/48"},
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "ffff:ffff:ffff::/48"'),
        {"ipv6_subnet_max": "ffff:ffff:ffff:ffff::"},
    ),
    # Dual stack.
    (
        cfg('"Network": "10.0.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:12::/56"'),
        {
            "enable_ipv4": True,
            "enable_ipv6": True,
            "subnet_len": 24,
            "ipv6_subnet_len": 64,
            "ipv6_subnet_min": "fd00:12:0:1::",
            "ipv6_subnet_max": "fd00:12:0:ff::",
        },
    ),
    # A disabled family's keys are decoded but otherwise ignored.
    (
        cfg('"Network": "10.0.0.0/16", "IPv6Network": "fc00::/127", "IPv6SubnetLen": 3'),
        {"enable_ipv6": False, "ipv6_network": None, "ipv6_subnet_len": 0},
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "SubnetLen": 31, "Network": "10.0.0.0/30"'),
        {"network": None, "subnet_len": 0, "subnet_min": None, "subnet_max": None},
    ),
    # Defaults of the flags.
    (
        cfg('"Network": "10.0.0.0/16"'),
        {"enable_ipv4": True, "enable_ipv6": False, "enable_nftables": False},
    ),
    (cfg('"Network": "10.0.0.0/16", "EnableNFTables": true'), {"enable_nftables": True}),
    (cfg('"Network": "10.0.0.0/16", "enablenftables": false'), {"enable_nftables": False}),
    # Case-insensitive keys (Go folds with ToUpper(ToLower(r)), so these Unicode letters match).
    (
        cfg('"NETWORK": "10.9.0.0/16", "subnetlen": 26'),
        {"network": "10.9.0.0/16", "subnet_len": 26},
    ),
    (cfg('"nEtWoRk": "10.9.0.0/16", "SUBNETMIN": "10.9.2.0"'), {"subnet_min": "10.9.2.0"}),
    (cfg('"Network": "10.0.0.0/16", "\u017fubnetLen": 26'), {"subnet_len": 26}),
    (
        cfg('"enableIPv4": false, "enable\u0131pv6": true, "ipv6network": "fc00::/48"'),
        {"enable_ipv6": True},
    ),
    # Several keys for one field: applied in document order, the last one wins ...
    (cfg('"Network": "10.1.0.0/16", "network": "10.2.0.0/16"'), {"network": "10.2.0.0/16"}),
    (cfg('"Network": "10.1.0.0/16", "Network": "10.2.0.0/16"'), {"network": "10.2.0.0/16"}),
    # ... but null leaves a bool or uint field alone.
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": 26, "subnetLen": null'), {"subnet_len": 26}),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": null'), {"subnet_len": 24}),
    (cfg('"Network": "10.0.0.0/16", "EnableIPv4": null'), {"enable_ipv4": True}),
    (cfg('"Network": "10.0.0.0/16", "EnableNFTables": null'), {"enable_nftables": False}),
    # IPv6SubnetMin/Max are pointers in Go: null resets them to "unset".
    (
        cfg(
            V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:5::",'
            ' "ipv6subnetmin": null'
        ),
        {"ipv6_subnet_min": "fc00:0:0:1::"},
    ),
    # Unknown keys are ignored, whatever their values; BackendType is json:"-" in flanneld.
    (
        cfg(
            '"Network": "10.0.0.0/16", "Foo": {"x": [1, 2.5, null]}, "Networks": 12,'
            ' "BackendType": "vxlan", "Subnet Len": "x", "big": 1e999'
        ),
        {"subnet_len": 24, "backend": BackendConfig("udp")},
    ),
    # Surrounding whitespace is fine; invalid UTF-8 inside a string becomes U+FFFD, like Go.
    ('\n\t {"Network": "10.0.0.0/16"}  \r\n', {"network": "10.0.0.0/16"}),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid(text: str, expected: dict[str, Any]) -> None:
    config = parse_network_config(text)
    for name, want in expected.items():
        got = getattr(config, name)
        if isinstance(want, str):
            assert str(got) == want, name
        else:
            assert got == want, name
    _check_invariants(config)


def test_bytes_and_str_are_equivalent() -> None:
    text = '{"Network": "10.3.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7}}'
    assert parse_network_config(text) == parse_network_config(text.encode())
    assert parse_network_config(bytearray(text.encode())) == parse_network_config(text)


def test_invalid_utf8_inside_a_string_is_replaced() -> None:
    config = parse_network_config(b'{"Network": "10.0.0.0/16", "Note": "\xff\xfe"}')
    assert str(config.network) == "10.0.0.0/16"


def test_result_types() -> None:
    config = parse_network_config(
        cfg('"Network": "10.0.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00::/48"')
    )
    assert isinstance(config.network, IPv4Network)
    assert isinstance(config.subnet_min, IPv4Address)
    assert isinstance(config.subnet_max, IPv4Address)
    assert isinstance(config.ipv6_network, IPv6Network)
    assert isinstance(config.ipv6_subnet_min, IPv6Address)
    assert isinstance(config.ipv6_subnet_max, IPv6Address)
    assert type(config.subnet_len) is int
    assert config.subnet_size() == 256
    assert config.ipv6_subnet_size() == 2**64
    # Frozen and hashable, so callers can compare configs to notice changes.
    assert hash(config) == hash(parse_network_config(config_text_roundtrip(config)))
    with pytest.raises(AttributeError):
        config.subnet_len = 25  # type: ignore[misc]


def config_text_roundtrip(config: NetworkConfig) -> str:
    return json.dumps(
        {
            "Network": str(config.network),
            "EnableIPv6": config.enable_ipv6,
            "IPv6Network": str(config.ipv6_network),
        }
    )


@pytest.mark.parametrize(
    ("subnet_len", "size"), [(24, 256), (16, 65536), (30, 4), (28, 16), (25, 128)]
)
def test_subnet_size(subnet_len: int, size: int) -> None:
    config = parse_network_config(cfg(f'"Network": "10.0.0.0/8", "SubnetLen": {subnet_len}'))
    assert config.subnet_size() == size


# --------------------------------------------------------------------------------------------
# Backend


BACKENDS: list[tuple[str | None, str, dict[str, Any]]] = [
    # (Backend JSON or None for absent, type, options)
    (None, "udp", {}),
    ("{}", "", {}),
    ("null", "", {}),
    ('{"Type": null}', "", {"Type": None}),
    ('{"Type": ""}', "", {"Type": ""}),
    ('{"Type": "vxlan"}', "vxlan", {"Type": "vxlan"}),
    ('{"Type": "VXLAN"}', "vxlan", {"Type": "VXLAN"}),
    ('{"type": "Host-GW"}', "host-gw", {"type": "Host-GW"}),
    ('{"TYPE": "wireguard", "PSK": "x"}', "wireguard", {"TYPE": "wireguard", "PSK": "x"}),
    # Not a known backend: that is decided when the backend is built, not here.
    ('{"Type": "Bogus"}', "bogus", {"Type": "Bogus"}),
    # Several Type keys: the last non-null one wins, as in Go.
    ('{"type": "vxlan", "Type": "udp"}', "udp", {"type": "vxlan", "Type": "udp"}),
    ('{"Type": "vxlan", "type": null}', "vxlan", {"Type": "vxlan", "type": None}),
    # Go's strings.ToLower maps U+0130 to a plain "i".
    ('{"Type": "\u0130PSEC"}', "ipsec", {"Type": "\u0130PSEC"}),
    (
        '{"Type": "vxlan", "VNI": 4096, "Port": 4789, "GBP": true, "Nested": {"a": [1]}}',
        "vxlan",
        {"Type": "vxlan", "VNI": 4096, "Port": 4789, "GBP": True, "Nested": {"a": [1]}},
    ),
]


@pytest.mark.parametrize(("backend", "backend_type", "options"), BACKENDS)
def test_backend(backend: str | None, backend_type: str, options: dict[str, Any]) -> None:
    body = '"Network": "10.0.0.0/16"'
    if backend is not None:
        body += f', "Backend": {backend}'
    config = parse_network_config(cfg(body))
    assert config.backend.type == backend_type
    assert dict(config.backend.options) == options


@pytest.mark.parametrize(
    ("backend", "key", "default", "expected"),
    [
        ('{"Type": "vxlan", "VNI": 4}', "VNI", 1, 4),
        ('{"Type": "vxlan", "vni": 4}', "VNI", 1, 4),
        ('{"Type": "vxlan", "Vni": 4}', "vNI", None, 4),
        ('{"Type": "vxlan"}', "VNI", 1, 1),
        ('{"Type": "vxlan"}', "VNI", None, None),
        # null keeps Go's field at its default value.
        ('{"Type": "vxlan", "VNI": null}', "VNI", 1, 1),
        ('{"Type": "vxlan", "VNI": 5, "vni": null}', "VNI", 1, 5),
        # Last occurrence wins, whichever spelling.
        ('{"Type": "vxlan", "VNI": 5, "vni": 6}', "VNI", 1, 6),
        ('{"Type": "vxlan", "vni": 6, "VNI": 5}', "VNI", 1, 5),
        ('{"Type": "vxlan", "VNI": 5, "vni": 6, "VNI": 7}', "VNI", 1, 7),
        ('{"Type": "vxlan", "DirectRouting": true}', "directrouting", False, True),
        ('{"Type": "vxlan", "Port": 0}', "Port", 8472, 0),
    ],
)
def test_backend_get(backend: str, key: str, default: Any, expected: Any) -> None:
    config = parse_network_config(cfg(f'"Network": "10.0.0.0/16", "Backend": {backend}'))
    assert config.backend.get(key, default) == expected
    assert get_ci(config.backend.options, key, default) == expected


@pytest.mark.parametrize(
    ("obj", "key", "expected"),
    [
        ({"Port": 1}, "Port", 1),
        ({"port": 1}, "Port", 1),
        ({"PORT": 1}, "port", 1),
        ({"Port": 1, "port": 2}, "Port", 2),
        ({"port": 2, "Port": 1}, "Port", 1),
        ({"Ports": 1}, "Port", "d"),
        ({}, "Port", "d"),
        ({"Port": None}, "Port", "d"),
        ({"\u017fcope": 3}, "Scope", 3),
        ({"\u212aey": 3}, "Key", 3),
        ({1: 2}, "Port", "d"),
    ],
)
def test_get_ci(obj: dict[Any, Any], key: str, expected: Any) -> None:
    assert get_ci(obj, key, "d") == expected


def test_backend_options_are_read_only() -> None:
    config = parse_network_config(
        cfg('"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "VNI": 4}')
    )
    with pytest.raises(TypeError):
        config.backend.options["VNI"] = 5  # type: ignore[index]
    assert json.loads(json.dumps(dict(config.backend.options))) == {"Type": "vxlan", "VNI": 4}


def test_backend_config_defaults() -> None:
    assert BackendConfig("udp") == BackendConfig("udp", {})
    assert BackendConfig("vxlan").get("VNI", 1) == 1
    assert hash(BackendConfig("vxlan")) == hash(BackendConfig("vxlan", {"VNI": 1}))


# --------------------------------------------------------------------------------------------
# Errors: (json, substrings the message must contain)

ERRORS: list[tuple[str, list[str]]] = [
    # IPv4 checks (CheckNetworkConfig).
    ("{}", ["please define a correct Network parameter in the flannel config", "missing"]),
    ("null", ["please define a correct Network parameter in the flannel config"]),
    (
        cfg('"Network": "0.0.0.0/0"'),
        ["please define a correct Network parameter in the flannel config", "0.0.0.0/0"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetLen": 31'),
        ["SubnetLen must be less than /31", "SubnetLen=31"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetLen": 32'),
        ["SubnetLen must be less than /31", "SubnetLen=32"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetLen": 18446744073709551615'),
        ["SubnetLen must be less than /31", "SubnetLen=18446744073709551615"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetLen": 17'),
        ["network must be able to accommodate at least four subnets", "SubnetLen=17", "/16"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetLen": 8'),
        ["network must be able to accommodate at least four subnets", "SubnetLen=8"],
    ),
    (
        cfg('"Network": "10.0.0.0/29"'),
        ["network is too small. Minimum useful network prefix is /28", "/29"],
    ),
    (
        cfg('"Network": "10.0.0.0/32"'),
        ["network is too small. Minimum useful network prefix is /28", "/32"],
    ),
    (
        cfg('"Network": "10.3.0.0/16", "SubnetMin": "10.4.1.0"'),
        ["SubnetMin is not in the range of the Network", "SubnetMin=10.4.1.0", "10.3.0.0/16"],
    ),
    (
        cfg('"Network": "10.3.0.0/16", "SubnetMax": "10.2.255.0"'),
        ["SubnetMax is not in the range of the Network", "SubnetMax=10.2.255.0"],
    ),
    (
        cfg('"Network": "10.3.0.0/16", "SubnetMin": "10.3.1.1"'),
        ["SubnetMin is not on a SubnetLen boundary: 10.3.1.1", "SubnetLen=24"],
    ),
    (
        cfg('"Network": "10.3.0.0/16", "SubnetMax": "10.3.8.128"'),
        ["SubnetMax is not on a SubnetLen boundary: 10.3.8.128", "SubnetMax=10.3.8.128"],
    ),
    (
        cfg('"Network": "10.3.0.0/16", "SubnetLen": 28, "SubnetMax": "10.3.8.8"'),
        ["SubnetMax is not on a SubnetLen boundary: 10.3.8.8", "SubnetLen=28"],
    ),
    # The range check comes before the alignment check.
    (
        cfg('"Network": "10.3.0.0/16", "SubnetMin": "10.4.0.1"'),
        ["SubnetMin is not in the range of the Network"],
    ),
    # IPv6 checks.
    (
        cfg('"EnableIPv6": true, "Network": "10.0.0.0/16"'),
        ["please define a correct IPv6Network parameter in the flannel config", "missing"],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "::/0"'),
        ["please define a correct IPv6Network parameter in the flannel config", "::/0"],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetLen": 127'),
        ["SubnetLen must be less than /127", "IPv6SubnetLen=127"],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetLen": 49'),
        ["network must be able to accommodate at least four subnets", "IPv6SubnetLen=49"],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/125"'),
        ["IPv6Network is too small. Minimum useful network prefix is /124", "/125"],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc01::"'),
        ["IPv6SubnetMin is not in the range of the IPv6Network", "IPv6SubnetMin=fc01::"],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetMax": "fbff::"'),
        ["IPv6SubnetMax is not in the range of the IPv6Network", "IPv6SubnetMax=fbff::"],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::1"'),
        ["IPv6SubnetMin is not on a SubnetLen boundary: fc00:0:0:1::1", "IPv6SubnetLen=64"],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetMax": "fc00:0:0:2:1::"'),
        ["IPv6SubnetMax is not on a SubnetLen boundary: fc00:0:0:2:1::"],
    ),
    # Stack selection.
    (cfg('"EnableIPv4": false'), ["none defined stack", "EnableIPv4=false"]),
    # Network / IPv6Network values.
    (cfg('"Network": "10.0.0.0/33"'), ['Network: invalid IPv4 CIDR format: "10.0.0.0/33"']),
    (cfg('"Network": "fc00::/48"'), ['Network: invalid IPv4 CIDR format: "fc00::/48"']),
    (cfg('"Network": "10.0.0.0"'), ['Network: invalid IPv4 CIDR format: "10.0.0.0"']),
    (cfg('"Network": "10.0.0.0/255.255.0.0"'), ["Network: invalid IPv4 CIDR format"]),
    (cfg('"Network": "010.0.0.0/8"'), ["Network: invalid IPv4 CIDR format"]),
    (cfg('"Network": "10.0.0.0/+8"'), ["Network: invalid IPv4 CIDR format"]),
    (cfg('"Network": "10.0.0.0/"'), ["Network: invalid IPv4 CIDR format"]),
    (cfg('"Network": "10.0.0.0/0333"'), ["Network: invalid IPv4 CIDR format"]),
    (cfg('"Network": " 10.0.0.0/8"'), ["Network: invalid IPv4 CIDR format"]),
    (cfg('"Network": "10.0.0.0/\u0668"'), ["Network: invalid IPv4 CIDR format"]),
    (cfg('"Network": ""'), ['Network: invalid IPv4 CIDR format: ""']),
    (cfg('"Network": 10'), ["Network: invalid IPv4 CIDR format: 10"]),
    (cfg('"Network": null'), ["Network: invalid IPv4 CIDR format: null"]),
    (cfg('"Network": ["10.0.0.0/8"]'), ["Network: invalid IPv4 CIDR format"]),
    # Decoding errors win even for a disabled family, as in flanneld.
    (
        cfg('"EnableIPv4": false, "Network": "bogus"'),
        ['Network: invalid IPv4 CIDR format: "bogus"'],
    ),
    # Every key for a field is decoded, not only the last.
    (
        cfg('"Network": "bogus", "network": "10.0.0.0/16"'),
        ['Network: invalid IPv4 CIDR format: "bogus"'],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "10.0.0.0/16"'),
        ['IPv6Network: invalid IPv6 CIDR format: "10.0.0.0/16"'],
    ),
    (cfg(V6_ONLY + ', "IPv6Network": "fc00::/129"'), ["IPv6Network: invalid IPv6 CIDR format"]),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fe80::%eth0/64"'),
        ["IPv6Network: invalid IPv6 CIDR format"],
    ),
    (cfg(V6_ONLY + ', "IPv6Network": null'), ["IPv6Network: invalid IPv6 CIDR format: null"]),
    # SubnetMin / SubnetMax values.
    (
        cfg('"Network": "10.0.0.0/16", "SubnetMin": "10.0.1"'),
        ["SubnetMin: Invalid IP address format", '"10.0.1"'],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetMax": "fc00::"'),
        ["SubnetMax: Invalid IP address format", '"fc00::"'],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetMin": 167772416'),
        ["SubnetMin: Invalid IP address format", "167772416"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetMin": null'),
        ["SubnetMin: Invalid IP address format", "null"],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetMin": "zzz"'),
        ["IPv6SubnetMin: Invalid IP address format", '"zzz"'],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetMax": false'),
        ["IPv6SubnetMax: Invalid IP address format", "false"],
    ),
    # IPv4 text is an IPv4-mapped address for flanneld's ParseIP6: outside any sane network.
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetMin": "10.0.0.0"'),
        ["IPv6SubnetMin is not in the range of the IPv6Network"],
    ),
    # uint fields: SubnetLen and IPv6SubnetLen.
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": "24"'), ["SubnetLen", 'string "24"']),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": -1'), ["SubnetLen", "negative", "-1"]),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": -0'), ["SubnetLen", "negative", "-0"]),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": 24.5'), ["SubnetLen", "24.5"]),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": 24.0'), ["SubnetLen", "24.0"]),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": 2.4e1'), ["SubnetLen", "24.0"]),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": 1e999'), ["SubnetLen", "too large"]),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": true'), ["SubnetLen", "boolean true"]),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": [24]'), ["SubnetLen", "array"]),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": {}'), ["SubnetLen", "object"]),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetLen": 18446744073709551616'),
        ["SubnetLen", "18446744073709551616", "out of range"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetLen": ' + "9" * 5000),
        ["SubnetLen", "too large"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "SubnetLen": -' + "9" * 5000),
        ["SubnetLen", "negative"],
    ),
    (cfg('"Network": "10.0.0.0/16", "SubnetLen": -2.5'), ["SubnetLen", "negative", "-2.5"]),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetLen": "64"'),
        ["IPv6SubnetLen", 'string "64"'],
    ),
    (
        cfg(V6_ONLY + ', "IPv6Network": "fc00::/48", "IPv6SubnetLen": -64'),
        ["IPv6SubnetLen", "negative"],
    ),
    # bool fields.
    (cfg('"Network": "10.0.0.0/16", "EnableIPv4": "true"'), ["EnableIPv4", 'string "true"']),
    (cfg('"Network": "10.0.0.0/16", "EnableIPv6": 1'), ["EnableIPv6", "number 1"]),
    (cfg('"Network": "10.0.0.0/16", "enableNFTables": "yes"'), ["EnableNFTables", '"yes"']),
    # Backend.
    (
        cfg('"Network": "10.0.0.0/16", "Backend": "vxlan"'),
        ["error decoding Backend property of config", 'Backend="vxlan"', "string"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "Backend": ["vxlan"]'),
        ["error decoding Backend property of config", "array"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "Backend": 1'),
        ["error decoding Backend property of config", "number"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "Backend": true'),
        ["error decoding Backend property of config", "boolean"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "Backend": {"Type": 1}'),
        ["error decoding Backend property of config", "Backend.Type=1"],
    ),
    (
        cfg('"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "type": ["udp"]}'),
        ["error decoding Backend property of config", 'Backend.Type=["udp"]'],
    ),
    # Backend errors come before CheckNetworkConfig, as in flanneld.
    (cfg('"Backend": "x"'), ["error decoding Backend property of config"]),
    # Not a JSON object / not JSON.
    ("", ["invalid JSON", "line 1 column 1"]),
    ("   ", ["invalid JSON"]),
    ('{"Network": "10.0.0.0/16"', ["invalid JSON", "line 1"]),
    ('{"Network": "10.0.0.0/16",\n "SubnetLen": }', ["invalid JSON", "line 2 column"]),
    ('{"Network": "10.0.0.0/16"} x', ["invalid JSON", "Extra data"]),
    ("{'Network': '10.0.0.0/16'}", ["invalid JSON"]),
    ('{"Network": "10.0.0.0/16", "SubnetLen": NaN}', ["invalid JSON", "NaN"]),
    ('{"Network": "10.0.0.0/16", "x": Infinity}', ["invalid JSON", "Infinity"]),
    ('{"Network": "10.0.0.0/16", "x": -Infinity}', ["invalid JSON", "Infinity"]),
    ('{"Network": "10.0.0.0/16", "x": 01}', ["invalid JSON"]),
    ('{"Network": "10.0.0.0/16", "x": "a\tb"}', ["invalid JSON"]),
    ('\ufeff{"Network": "10.0.0.0/16"}', ["invalid JSON"]),
    ("[" * 100_000, ["invalid JSON"]),
    ("[" * 100_000 + "]" * 100_000, ["invalid JSON", "nested too deeply"]),
    ('["10.0.0.0/16"]', ["must be a JSON object", "array"]),
    ('"10.0.0.0/16"', ["must be a JSON object", "string"]),
    ("24", ["must be a JSON object", "number 24"]),
    ("true", ["must be a JSON object", "boolean"]),
    # Long values are shortened in the message.
    (cfg('"Network": "' + "x" * 10_000 + '"'), ["Network: invalid IPv4 CIDR format", "..."]),
]


@pytest.mark.parametrize(("text", "substrings"), ERRORS)
def test_error(text: str, substrings: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_network_config(text)
    message = str(info.value)
    for part in substrings:
        assert part in message
    assert len(message) < 400


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe\x00\x00",
        b"\x80",
        b'{"Network": "10.0.0.0/16"\xff}',
        "\ud800".encode("utf-8", "surrogatepass"),
        b"\x00",
        b'{"Network": "\xc3\x28"}',
    ],
)
def test_error_bytes(data: bytes) -> None:
    with pytest.raises(ConfigError):
        parse_network_config(data)


def test_error_names_value_without_breaking_logging() -> None:
    # A lone surrogate must not end up raw in the message, where encoding it would fail.
    with pytest.raises(ConfigError) as info:
        parse_network_config('{"Network": "\\ud800"}')
    str(info.value).encode("utf-8")


def test_wrong_argument_type() -> None:
    with pytest.raises(ConfigError):
        parse_network_config(42)  # type: ignore[arg-type]


def test_none_defined_stack_is_distinguishable() -> None:
    for text in ('{"EnableIPv4": false}', '{"EnableIPv4": false, "EnableIPv6": false}'):
        with pytest.raises(NoStackError, match="none defined stack"):
            parse_network_config(text)
    # Any other problem is an ordinary ConfigError.
    with pytest.raises(ConfigError) as info:
        parse_network_config("{}")
    assert not isinstance(info.value, NoStackError)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------------------------
# Lease compatibility (flanneld's isSubnetConfigCompat / isIPv6SubnetConfigCompat)

# The config of flanneld's pkg/subnet/etcd/subnet_test.go.
SUBNET_TEST_CONFIG = '{"Network": "10.3.0.0/16", "SubnetMin": "10.3.1.0", "SubnetMax": "10.3.25.0"}'


@pytest.mark.parametrize(
    ("subnet", "compatible"),
    [
        ("10.3.1.0/24", True),
        ("10.3.6.0/24", True),
        ("10.3.25.0/24", True),
        ("10.3.0.0/24", False),
        ("10.3.26.0/24", False),
        ("10.3.31.0/24", False),
        ("10.4.1.0/24", False),
        ("10.3.5.0/25", False),
        ("10.3.4.0/23", False),
        ("10.3.5.0/32", False),
    ],
)
def test_is_compatible_v4(subnet: str, compatible: bool) -> None:
    config = parse_network_config(SUBNET_TEST_CONFIG)
    assert config.is_compatible_v4(IPv4Network(subnet)) is compatible
    # A v4-only config wants leases without an IPv6 subnet.
    assert config.is_compatible_v6(None) is True
    assert config.is_compatible_v6(IPv6Network("fc00:0:0:1::/64")) is False


def test_is_compatible_v4_does_not_check_alignment() -> None:
    # The grid starts at SubnetMin 10.3.0.16 with /28 subnets; 10.3.0.48/28 is on it, but
    # flanneld would accept any /28 within the range, aligned to the grid or not.
    config = parse_network_config(
        '{"Network": "10.3.0.0/24", "SubnetLen": 28, "SubnetMin": "10.3.0.16",'
        ' "SubnetMax": "10.3.0.96"}'
    )
    assert config.is_compatible_v4(IPv4Network("10.3.0.48/28"))
    assert config.is_compatible_v4(IPv4Network("10.3.0.96/28"))
    assert not config.is_compatible_v4(IPv4Network("10.3.0.112/28"))


def test_is_compatible_v4_with_ipv4_disabled() -> None:
    config = parse_network_config(cfg(V6_ONLY + ', "IPv6Network": "fc00::/48"'))
    # flanneld compares against its zero values: only the empty subnet passes.
    assert config.is_compatible_v4(IPv4Network("0.0.0.0/0"))
    assert not config.is_compatible_v4(IPv4Network("10.0.0.0/24"))


@pytest.mark.parametrize(
    ("subnet", "compatible"),
    [
        (None, False),
        ("::/0", False),
        ("fc00:0:0:1::/64", True),
        ("fc00:0:0:8::/64", True),
        ("fc00:0:0:f::/64", True),
        ("fc00::/64", False),
        ("fc00:0:0:10::/64", False),
        ("fc00:0:0:2::/65", False),
        ("fc00:0:0:2::/63", False),
        ("fd00:0:0:2::/64", False),
    ],
)
def test_is_compatible_v6(subnet: str | None, compatible: bool) -> None:
    config = parse_network_config(
        cfg(
            '"Network": "10.0.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00::/48",'
            ' "IPv6SubnetMax": "fc00:0:0:f::"'
        )
    )
    net = None if subnet is None else IPv6Network(subnet)
    assert config.is_compatible_v6(net) is compatible


def test_is_compatible_v6_disabled_accepts_only_no_subnet() -> None:
    config = parse_network_config('{"Network": "10.0.0.0/16"}')
    assert config.is_compatible_v6(None)
    assert config.is_compatible_v6(IPv6Network("::/0"))
    assert not config.is_compatible_v6(IPv6Network("fc00::/64"))


# --------------------------------------------------------------------------------------------
# Properties


def _check_invariants(config: NetworkConfig) -> None:
    assert config.enable_ipv4 or config.enable_ipv6
    assert config.backend.type == config.backend.type.lower()
    if config.enable_ipv4:
        net, lo, hi = config.network, config.subnet_min, config.subnet_max
        assert net is not None and lo is not None and hi is not None
        assert net.prefixlen + 2 <= config.subnet_len <= 30
        assert lo in net and hi in net
        assert int(lo) % config.subnet_size() == 0
        assert int(hi) % config.subnet_size() == 0
        # Every subnet of the range lies inside the Network.
        assert int(hi) + config.subnet_size() - 1 <= int(net.broadcast_address)
    else:
        assert config.network is None and config.subnet_min is None
    if config.enable_ipv6:
        net6, lo6, hi6 = config.ipv6_network, config.ipv6_subnet_min, config.ipv6_subnet_max
        assert net6 is not None and lo6 is not None and hi6 is not None
        assert net6.prefixlen + 2 <= config.ipv6_subnet_len <= 126
        assert lo6 in net6 and hi6 in net6
        assert int(lo6) % config.ipv6_subnet_size() == 0
        assert int(hi6) % config.ipv6_subnet_size() == 0
    else:
        assert config.ipv6_network is None and config.ipv6_subnet_min is None


def _parse_or_error(data: bytes | str) -> None:
    try:
        config = parse_network_config(data)
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(config, NetworkConfig)
    _check_invariants(config)


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

_field_names = st.sampled_from(
    [
        "Network",
        "SubnetLen",
        "SubnetMin",
        "SubnetMax",
        "EnableIPv4",
        "EnableIPv6",
        "IPv6Network",
        "IPv6SubnetLen",
        "IPv6SubnetMin",
        "IPv6SubnetMax",
        "EnableNFTables",
        "Backend",
        "Type",
        "other",
    ]
)
_keys = st.tuples(_field_names, st.booleans(), st.booleans()).map(
    lambda t: t[0].lower() if t[1] else (t[0].upper() if t[2] else t[0])
)
_ipv4 = st.integers(min_value=0, max_value=2**32 - 1).map(lambda i: str(IPv4Address(i)))
_ipv6 = st.integers(min_value=0, max_value=2**128 - 1).map(lambda i: str(IPv6Address(i)))
_plausible_values = (
    _json_scalars
    | st.builds(lambda a, p: f"{a}/{p}", _ipv4, st.integers(min_value=0, max_value=34))
    | st.builds(lambda a, p: f"{a}/{p}", _ipv6, st.integers(min_value=0, max_value=130))
    | _ipv4
    | _ipv6
    | st.integers(min_value=0, max_value=130)
    | st.dictionaries(st.sampled_from(["Type", "type", "VNI"]), _json_scalars, max_size=3)
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_json_values)
def test_property_any_json_value(value: Any) -> None:
    _parse_or_error(json.dumps(value))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_property_any_bytes(data: bytes) -> None:
    _parse_or_error(data)


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_property_any_text(text: str) -> None:
    _parse_or_error(text)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_keys, _plausible_values), max_size=10))
def test_property_config_like_objects(pairs: list[tuple[str, Any]]) -> None:
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"
    _parse_or_error(text)


def _maybe_addr_in(net: IPv4Network | IPv6Network) -> st.SearchStrategy[str | None]:
    first = int(net.network_address)
    last = int(net.broadcast_address)
    cls = IPv4Address if net.version == 4 else IPv6Address
    near = st.integers(
        min_value=max(0, first - 16), max_value=min(last + 16, 2**net.max_prefixlen - 1)
    )
    return st.none() | near.map(lambda i: str(cls(i)))


@st.composite
def _ipv4_configs(draw: st.DrawFn) -> dict[str, Any]:
    prefix = draw(st.integers(min_value=0, max_value=30))
    net = IPv4Network((draw(st.integers(min_value=0, max_value=2**32 - 1)), prefix), strict=False)
    conf: dict[str, Any] = {"Network": f"{net.network_address}/{prefix}"}
    subnet_len = draw(st.none() | st.integers(min_value=0, max_value=32))
    if subnet_len is not None:
        conf["SubnetLen"] = subnet_len
    for key in ("SubnetMin", "SubnetMax"):
        addr = draw(_maybe_addr_in(net))
        if addr is not None:
            conf[key] = addr
    return conf


@st.composite
def _ipv6_configs(draw: st.DrawFn) -> dict[str, Any]:
    prefix = draw(st.integers(min_value=0, max_value=127))
    net = IPv6Network((draw(st.integers(min_value=0, max_value=2**128 - 1)), prefix), strict=False)
    conf: dict[str, Any] = {
        "EnableIPv4": False,
        "EnableIPv6": True,
        "IPv6Network": f"{net.network_address}/{prefix}",
    }
    subnet_len = draw(st.none() | st.integers(min_value=0, max_value=128))
    if subnet_len is not None:
        conf["IPv6SubnetLen"] = subnet_len
    for key in ("IPv6SubnetMin", "IPv6SubnetMax"):
        addr = draw(_maybe_addr_in(net))
        if addr is not None:
            conf[key] = addr
    return conf


@settings(max_examples=500)
@given(_ipv4_configs())
def test_property_ipv4_ranges(conf: dict[str, Any]) -> None:
    try:
        config = parse_network_config(json.dumps(conf))
    except ConfigError:
        return
    _check_invariants(config)
    if "SubnetMin" not in conf or IPv4Address(conf["SubnetMin"]) == IPv4Address(0):
        assert config.network is not None and config.subnet_min is not None
        assert int(config.subnet_min) == int(config.network.network_address) + config.subnet_size()


@settings(max_examples=500)
@given(_ipv6_configs())
def test_property_ipv6_ranges(conf: dict[str, Any]) -> None:
    try:
        config = parse_network_config(json.dumps(conf))
    except ConfigError:
        return
    _check_invariants(config)


@settings(max_examples=200)
@given(st.integers(min_value=1, max_value=28), st.integers(min_value=0, max_value=2**32 - 1))
def test_property_derived_ipv4_defaults_always_valid(prefix: int, addr: int) -> None:
    net = IPv4Network((addr, prefix), strict=False)
    config = parse_network_config(json.dumps({"Network": f"{IPv4Address(addr)}/{prefix}"}))
    assert config.network == net
    assert config.subnet_len == (24 if prefix <= 22 else prefix + 2)
    _check_invariants(config)
