"""Lease keys and values: byte-exact with flanneld, tolerant readers, clear rejections."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flannel_bpf.subnet.lease import (
    LeaseAttrs,
    LeaseFormatError,
    compact_json,
    make_subnet_key,
    parse_subnet_key,
)


@pytest.mark.parametrize(
    ("name", "v4", "v6"),
    [
        ("10.12.13.0-24", "10.12.13.0/24", None),
        ("10.5.72.0-24", "10.5.72.0/24", None),
        ("10.12.13.0-24&fd00:12:13::-56", "10.12.13.0/24", "fd00:12:13::/56"),
        ("10.0.0.0-8", "10.0.0.0/8", None),
    ],
)
def test_subnet_key_round_trip(name: str, v4: str, v6: str | None) -> None:
    key = parse_subnet_key(name)
    assert key.ipv4 == IPv4Network(v4)
    assert key.ipv6 == (IPv6Network(v6) if v6 else None)
    assert make_subnet_key(key.ipv4, key.ipv6) == name


@pytest.mark.parametrize(
    "name",
    # flanneld's pkg/subnet/subnet_test.go rejections, plus what its 5-bit length parse rejects
    [
        "10",
        "10.12.13.0",
        "10.12.13-24",
        "10.12.13.300-24",
        "10.12.13.0-24hi",
        "&2001::-56",
        "10.12.13.0-24&:12:13:-56",
        "10.12.13.0-24&20011::-56",
        "10.12.13.0-24&2001-56",
        "10.12.13.0-24&2001::",
        "10.12.13.0-24&2001::-56hi",
        "10.12.13.0-32",
        "10.12.13.0-24&FD00::-56",
        "x10.12.13.0-24",
        "",
        "10.12.13.1-24",
    ],
)
def test_bad_subnet_keys_are_rejected(name: str) -> None:
    with pytest.raises(LeaseFormatError):
        parse_subnet_key(name)


def test_udp_and_alloc_value_is_byte_exact() -> None:
    # asserted byte for byte in flanneld's registry_test.go
    attrs = LeaseAttrs(public_ip=IPv4Address("1.2.3.4"))
    assert attrs.to_json() == b'{"PublicIP":"1.2.3.4","PublicIPv6":null}'


def test_vxlan_value_is_byte_exact() -> None:
    attrs = LeaseAttrs(
        public_ip=IPv4Address("192.168.64.3"),
        backend_type="vxlan",
        backend_data=b'{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}',
    )
    expected = (
        b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    )
    assert attrs.to_json() == expected
    assert LeaseAttrs.from_json(expected) == attrs


def test_dual_stack_and_host_gw_values() -> None:
    attrs = LeaseAttrs(
        public_ip=IPv4Address("10.0.0.1"),
        public_ipv6=IPv6Address("fd00::1"),
        backend_type="vxlan",
        backend_data=b'{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}',
        backend_v6_data=b'{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:00"}',
    )
    assert attrs.to_json() == (
        b'{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"},'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:00"}}'
    )
    host_gw = LeaseAttrs(public_ip=IPv4Address("10.0.0.2"), backend_type="host-gw")
    assert host_gw.to_json() == b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"host-gw"}'


def test_reader_is_as_lenient_as_go() -> None:
    raw = (
        b'{ "publicip": "10.1.2.3", "BACKENDTYPE": "vxlan", "Unknown": [1, 2],\n'
        b'  "backenddata": { "VNI" : 1, "VtepMAC": "aa:bb:cc:dd:ee:ff" } }'
    )
    attrs = LeaseAttrs.from_json(raw)
    assert attrs.public_ip == IPv4Address("10.1.2.3")
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data == b'{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}'
    assert attrs.public_ipv6 is None
    # a missing PublicIP reads as 0.0.0.0, as in Go
    assert LeaseAttrs.from_json(b"{}").public_ip == IPv4Address("0.0.0.0")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'"x"',
        b"null",
        b'{"PublicIP":null}',
        b'{"PublicIP":""}',
        b'{"PublicIP":"fd00::1"}',
        b'{"PublicIP":7}',
        b'{"PublicIP":"1.2.3.4","PublicIPv6":"x"}',
        b'{"PublicIP":"1.2.3.4","BackendType":5}',
        b"\xff\xfe",
        b'{"PublicIP":"1.2.3.4"',
    ],
)
def test_bad_values_are_rejected(raw: bytes) -> None:
    with pytest.raises(LeaseFormatError):
        LeaseAttrs.from_json(raw)


def test_compact_json_keeps_strings_intact() -> None:
    assert compact_json(b'{ "a" : "x y\\" z" ,\n "b": [1, 2] }') == b'{"a":"x y\\" z","b":[1,2]}'


@given(st.binary(max_size=200))
def test_any_bytes_either_parse_or_raise_format_error(raw: bytes) -> None:
    with contextlib.suppress(LeaseFormatError):
        LeaseAttrs.from_json(raw)


@given(st.text(max_size=60))
def test_any_key_either_parses_or_raises_format_error(name: str) -> None:
    try:
        key = parse_subnet_key(name)
    except LeaseFormatError:
        return
    assert make_subnet_key(key.ipv4, key.ipv6) == name
