"""subnet.env: flanneld's variables and order, atomic 0644 writes, tolerant reading."""

from __future__ import annotations

import os
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from flannel_bpf.subnet.subnet_env import SubnetFile, read_previous_subnets, write_subnet_file


def test_render_matches_flanneld_sample(tmp_path: Path) -> None:
    path = tmp_path / "run" / "flannel" / "subnet.env"
    old_umask = os.umask(0o077)
    try:
        write_subnet_file(
            path,
            SubnetFile(
                IPv4Network("10.1.0.0/16"), IPv4Network("10.1.74.0/24"), None, None, 1472, False
            ),
        )
    finally:
        os.umask(old_umask)
    # dist/sample_subnet.env
    assert path.read_text() == (
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\n"
        "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
    )
    assert path.stat().st_mode & 0o777 == 0o644  # whatever the umask
    assert path.parent.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in path.parent.iterdir()] == ["subnet.env"]  # no temp file left


def test_dual_stack_order() -> None:
    text = SubnetFile(
        IPv4Network("10.5.0.0/16"),
        IPv4Network("10.5.72.0/24"),
        IPv6Network("2001:cafe:42::/56"),
        IPv6Network("2001:cafe:42::/64"),
        1450,
        True,
    ).render()
    assert text.splitlines() == [
        "FLANNEL_NETWORK=10.5.0.0/16",
        "FLANNEL_SUBNET=10.5.72.1/24",
        "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56",
        "FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64",
        "FLANNEL_MTU=1450",
        "FLANNEL_IPMASQ=true",
    ]


@pytest.mark.parametrize(
    ("content", "subnet"),
    [
        ("FLANNEL_SUBNET=10.5.72.1/24\n", "10.5.72.0/24"),  # host bits masked
        ("FLANNEL_SUBNET=bogus,10.5.72.1/24\n", "10.5.72.0/24"),  # invalid entries skipped
        ("FLANNEL_SUBNET=bogus,nonsense\n", None),  # only invalid: absent
        ("FLANNEL_SUBNET=10.5.72.1/24,10.5.73.1/24\n", None),  # more than one: absent
        ('export FLANNEL_SUBNET="10.5.72.1/24"\n# comment\n', "10.5.72.0/24"),
        ("\x00\xff garbage without equals\n", None),
        ("", None),
    ],
)
def test_previous_subnet_parsing(tmp_path: Path, content: str, subnet: str | None) -> None:
    path = tmp_path / "subnet.env"
    path.write_text(content)
    previous = read_previous_subnets(path)
    assert previous.subnet == (IPv4Network(subnet) if subnet else None)


def test_missing_or_unreadable_file_is_no_previous_subnet(tmp_path: Path) -> None:
    assert read_previous_subnets(tmp_path / "absent").subnet is None
    assert read_previous_subnets(tmp_path).subnet is None  # a directory
