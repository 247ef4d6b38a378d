"""flanneld's command line and FLANNELD_* environment, as parsed by flags.parse_run_args."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from flannel_bpf.cli.flags import (
    RENEW_MARGIN_ERROR,
    AgentOptions,
    FlagError,
    HelpRequested,
    env_name,
    flag_names,
    go_path_clean,
    parse_go_int,
    parse_run_args,
    run_usage,
)


def parse(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> AgentOptions:
    return parse_run_args(list(argv), environ or {})


def flag_error(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> str:
    with pytest.raises(FlagError) as info:
        parse(argv, environ)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults -------------------------------------------------------------------------------


def test_defaults_are_flanneld_defaults() -> None:
    opts = parse()

    assert opts == AgentOptions()
    assert opts.etcd_endpoints == ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
    assert opts.etcd_prefix == "/coreos.com/network"
    assert opts.subnet_file == "/run/flannel/subnet.env"
    assert opts.subnet_lease_renew_margin == 60
    assert opts.iptables_resync == 5
    assert opts.iptables_forward_rules is True
    assert opts.ip_masq is False
    assert opts.ip_masq_fully_random_disable is False
    assert opts.ip_blackhole_route is False
    assert opts.healthz_ip == "0.0.0.0"
    assert opts.healthz_port == 0
    assert opts.kube_subnet_mgr is False
    assert opts.kube_annotation_prefix == "flannel.alpha.coreos.com"
    assert opts.net_config_path == "/etc/kube-flannel/net-conf.json"
    assert opts.set_node_network_unavailable is True
    assert opts.iface == () and opts.iface_regex == () and opts.iface_can_reach == ""
    assert opts.public_ip == "" and opts.public_ipv6 == ""
    assert opts.verbosity == 0
    assert (opts.log_format, opts.datapath) == ("text", "auto")
    assert opts.metrics_addr == "0.0.0.0:9867" and opts.healthz_port == 0
    assert opts.version is False


def test_options_are_frozen_and_hide_the_password() -> None:
    opts = parse(["--etcd-password=s3cret"])

    assert opts.etcd_password == "s3cret"
    assert "s3cret" not in repr(opts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.ip_masq = True  # type: ignore[misc]


# --- spellings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["-etcd-prefix=/x"],
        ["--etcd-prefix=/x"],
        ["-etcd-prefix", "/x"],
        ["--etcd-prefix", "/x"],
        ["--etcd-prefix=/y", "-etcd-prefix", "/x"],  # the last one wins
    ],
)
def test_single_and_double_dash_with_and_without_equals(argv: list[str]) -> None:
    assert parse(argv).etcd_prefix == "/x"


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        (
            ["--etcd-endpoints=http://a:2379,https://b:2379"],
            "etcd_endpoints",
            ("http://a:2379", "https://b:2379"),
        ),
        (["-etcd-endpoints", "http://a:2379"], "etcd_endpoints", ("http://a:2379",)),
        (
            ["--etcd-endpoints= http://a:2379 ,,http://b:2379,"],
            "etcd_endpoints",
            ("http://a:2379", "http://b:2379"),
        ),
        (["--etcd-keyfile=/k"], "etcd_keyfile", "/k"),
        (["--etcd-certfile=/c"], "etcd_certfile", "/c"),
        (["--etcd-cafile=/ca"], "etcd_cafile", "/ca"),
        (["--etcd-username=u"], "etcd_username", "u"),
        (["--etcd-password", "-starts-with-dash"], "etcd_password", "-starts-with-dash"),
        (["--iface-can-reach=10.1.2.3"], "iface_can_reach", "10.1.2.3"),
        (["--subnet-file=/tmp/s.env"], "subnet_file", "/tmp/s.env"),
        (["--public-ip=198.18.0.1"], "public_ip", "198.18.0.1"),
        (["--public-ipv6=fd00::1"], "public_ipv6", "fd00::1"),
        (["--subnet-lease-renew-margin=1"], "subnet_lease_renew_margin", 1),
        (["--subnet-lease-renew-margin=1439"], "subnet_lease_renew_margin", 1439),
        (["--iptables-resync=30"], "iptables_resync", 30),
        (["--healthz-ip=127.0.0.1"], "healthz_ip", "127.0.0.1"),
        (["--healthz-port=8285"], "healthz_port", 8285),
        (["--healthz-port=65535"], "healthz_port", 65535),
        (["--kube-api-url=https://k"], "kube_api_url", "https://k"),
        (["--kubeconfig-file=/kc"], "kubeconfig_file", "/kc"),
        (["--kube-annotation-prefix=x.io"], "kube_annotation_prefix", "x.io"),
        (["--net-config-path=/n.json"], "net_config_path", "/n.json"),
        (["-v=3"], "verbosity", 3),
        (["-v", "4"], "verbosity", 4),
        (["--v=-1"], "verbosity", -1),
        (["-vmodule=foo=2"], "vmodule", "foo=2"),
        (["-log_backtrace_at=main.go:1"], "log_backtrace_at", "main.go:1"),
        (["--log-format=json"], "log_format", "json"),
        (["--datapath=bpf"], "datapath", "bpf"),
        (["--datapath", "kernel"], "datapath", "kernel"),
        (["--datapath=userspace"], "datapath", "userspace"),
        (["--metrics-addr=:9090"], "metrics_addr", ":9090"),
        (["--etcd-prefix=/coreos.com/network/"], "etcd_prefix", "/coreos.com/network"),
        (["--etcd-prefix=//a//b/../c/."], "etcd_prefix", "/a/c"),
        (["--etcd-prefix=/"], "etcd_prefix", ""),
        (["--etcd-prefix=relative/p/"], "etcd_prefix", "relative/p"),
    ],
)
def test_value_flags(argv: list[str], field: str, expected: Any) -> None:
    assert getattr(parse(argv), field) == expected


@pytest.mark.parametrize(
    ("path", "cleaned"),
    [
        ("", "."),
        ("/", "/"),
        ("//", "/"),
        ("/a/b/", "/a/b"),
        ("a/../..", ".."),
        ("/../a", "/a"),
        ("./a/./b", "a/b"),
        ("/coreos.com/network", "/coreos.com/network"),
    ],
)
def test_go_path_clean(path: str, cleaned: str) -> None:
    assert go_path_clean(path) == cleaned


# --- booleans -------------------------------------------------------------------------------

GO_TRUE = ["1", "t", "T", "TRUE", "true", "True"]
GO_FALSE = ["0", "f", "F", "FALSE", "false", "False"]


@pytest.mark.parametrize("dashes", ["-", "--"])
@pytest.mark.parametrize(
    ("suffix", "expected"),
    [("", True)] + [(f"={v}", True) for v in GO_TRUE] + [(f"={v}", False) for v in GO_FALSE],
)
def test_go_bool_spellings(dashes: str, suffix: str, expected: bool) -> None:
    assert parse([f"{dashes}ip-masq{suffix}"]).ip_masq is expected


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        (["--iptables-forward-rules=false"], "iptables_forward_rules", False),
        (["--set-node-network-unavailable=0"], "set_node_network_unavailable", False),
        (["--ip-masq-fully-random-disable"], "ip_masq_fully_random_disable", True),
        (["--ip-blackhole-route"], "ip_blackhole_route", True),
        (["--kube-subnet-mgr=false"], "kube_subnet_mgr", False),
        (["--version"], "version", True),
        (["-version=f"], "version", False),
        (["--ip-masq", "--ip-masq=false"], "ip_masq", False),
    ],
)
def test_bool_flags(argv: list[str], field: str, expected: bool) -> None:
    assert getattr(parse(argv), field) is expected


def test_bool_flag_does_not_consume_the_next_argument() -> None:
    opts = parse(["--ip-masq", "--iface", "eth1"])
    assert opts.ip_masq is True
    assert opts.iface == ("eth1",)

    message = flag_error(["--ip-masq", "false"])
    assert '"false"' in message
    assert "--ip-masq=false" in message


@pytest.mark.parametrize("value", ["yes", "no", "on", "2", "tRUE", ""])
def test_bad_bool_value(value: str) -> None:
    message = flag_error([f"--ip-masq={value}"])

    assert "--ip-masq" in message
    assert f'"{value}"' in message


# --- integers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("0", 0),
        ("42", 42),
        ("+42", 42),
        ("-42", -42),
        ("0x1F", 31),
        ("0X1f", 31),
        ("010", 8),
        ("0o17", 15),
        ("0b101", 5),
        ("0x_1_f", 31),
        ("0_7", 7),
        ("9223372036854775807", 2**63 - 1),
        ("-9223372036854775808", -(2**63)),
    ],
)
def test_go_int_syntax(text: str, number: int) -> None:
    assert parse_go_int(text) == number


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-",
        "abc",
        "1_000",
        "0x",
        "08",
        "0b2",
        "1.5",
        " 5",
        "5 ",
        "\u0665",  # ARABIC-INDIC DIGIT FIVE: Python int() takes it, Go does not
        "0x__1",
        "0x1_",
        "1e3",
        "9223372036854775808",
    ],
)
def test_go_int_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_int(text)


def test_int_flags_use_go_int_syntax() -> None:
    opts = parse(["--healthz-port=0x1F90", "--subnet-lease-renew-margin", "010"])

    assert (opts.healthz_port, opts.subnet_lease_renew_margin) == (8080, 8)


def test_verbosity_is_decimal_only_like_klog() -> None:
    assert "not an integer" in flag_error(["-v=0x1"])


# --- repeatable flags -----------------------------------------------------------------------


def test_iface_and_iface_regex_repeat_and_keep_order() -> None:
    opts = parse(
        [
            "--iface=eth1",
            "-iface-regex",
            r"^10\.",
            "-iface",
            "10.0.0.9",
            "--iface-regex=^en",
            "--iface",
            "eth0",
        ]
    )

    assert opts.iface == ("eth1", "10.0.0.9", "eth0")
    assert opts.iface_regex == (r"^10\.", "^en")


def test_parses_share_no_state() -> None:
    assert parse(["--iface=eth1"]).iface == ("eth1",)
    assert parse(["--iface=eth2"]).iface == ("eth2",)
    assert parse().iface == ()


# --- environment overlay --------------------------------------------------------------------


def test_env_names() -> None:
    assert env_name("etcd-endpoints") == "FLANNELD_ETCD_ENDPOINTS"
    assert env_name("iface") == "FLANNELD_IFACE"
    assert env_name("v") == "FLANNELD_V"
    assert env_name("ip-masq") == "FLANNELD_IP_MASQ"
    assert env_name("log_backtrace_at") == "FLANNELD_LOG_BACKTRACE_AT"
    for name in flag_names():
        assert env_name(name) == "FLANNELD_" + name.upper().replace("-", "_").replace(".", "_")


@pytest.mark.parametrize(
    ("argv", "environ", "field", "expected"),
    [
        (
            [],
            {"FLANNELD_ETCD_ENDPOINTS": "http://e1:2379,http://e2:2379"},
            "etcd_endpoints",
            ("http://e1:2379", "http://e2:2379"),
        ),
        (
            ["--etcd-endpoints=http://cli:2379"],
            {"FLANNELD_ETCD_ENDPOINTS": "http://env:2379"},
            "etcd_endpoints",
            ("http://cli:2379",),
        ),
        ([], {"FLANNELD_ETCD_PREFIX": "/env/"}, "etcd_prefix", "/env"),
        ([], {"FLANNELD_ETCD_PREFIX": ""}, "etcd_prefix", "/coreos.com/network"),
        ([], {"FLANNELD_IP_MASQ": "true"}, "ip_masq", True),
        (["--ip-masq=false"], {"FLANNELD_IP_MASQ": "true"}, "ip_masq", False),
        ([], {"FLANNELD_IPTABLES_FORWARD_RULES": "false"}, "iptables_forward_rules", False),
        ([], {"FLANNELD_IPTABLES_FORWARD_RULES": ""}, "iptables_forward_rules", True),
        ([], {"FLANNELD_V": "5"}, "verbosity", 5),
        (["-v=1"], {"FLANNELD_V": "5"}, "verbosity", 1),
        ([], {"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30"}, "subnet_lease_renew_margin", 30),
        ([], {"FLANNELD_HEALTHZ_PORT": "8285"}, "healthz_port", 8285),
        ([], {"FLANNELD_PUBLIC_IP": "198.18.0.3"}, "public_ip", "198.18.0.3"),
        ([], {"FLANNELD_IFACE_CAN_REACH": "10.0.0.1"}, "iface_can_reach", "10.0.0.1"),
        ([], {"FLANNELD_DATAPATH": "kernel"}, "datapath", "kernel"),
        ([], {"FLANNELD_LOG_FORMAT": "json"}, "log_format", "json"),
        ([], {"FLANNELD_METRICS_ADDR": ":9090"}, "metrics_addr", ":9090"),
        ([], {"FLANNELD_LOG_BACKTRACE_AT": "x.go:1"}, "log_backtrace_at", "x.go:1"),
        # flanneld's flagSlice.Set appends the whole value: one element, commas and all.
        ([], {"FLANNELD_IFACE": "eth0,eth1"}, "iface", ("eth0,eth1",)),
        ([], {"FLANNELD_IFACE": "eth0"}, "iface", ("eth0",)),
        (["--iface=eth9"], {"FLANNELD_IFACE": "eth0"}, "iface", ("eth9",)),
        ([], {"FLANNELD_IFACE_REGEX": "^en"}, "iface_regex", ("^en",)),
        ([], {"FLANNELD_IFACE": ""}, "iface", ()),
        # --version is handled before the environment in flanneld.
        ([], {"FLANNELD_VERSION": "true"}, "version", False),
        # Only the FLANNELD_ prefix counts.
        ([], {"ETCD_ENDPOINTS": "http://x:1", "flanneld_ip_masq": "true"}, "ip_masq", False),
    ],
)
def test_env_overlay(argv: list[str], environ: dict[str, str], field: str, expected: Any) -> None:
    assert getattr(parse(argv, environ), field) == expected


def test_env_fills_only_flags_not_given() -> None:
    opts = parse(
        ["--etcd-prefix=/cli", "--ip-masq"],
        {
            "FLANNELD_ETCD_PREFIX": "/env",
            "FLANNELD_IP_MASQ": "false",
            "FLANNELD_SUBNET_FILE": "/env/subnet.env",
            "FLANNELD_HEALTHZ_PORT": "",
        },
    )

    assert opts.etcd_prefix == "/cli"
    assert opts.ip_masq is True
    assert opts.subnet_file == "/env/subnet.env"
    assert opts.healthz_port == 0


def test_bad_env_value_is_ignored_when_the_flag_is_on_the_command_line() -> None:
    assert parse(["--healthz-port=1"], {"FLANNELD_HEALTHZ_PORT": "abc"}).healthz_port == 1


@pytest.mark.parametrize(
    ("var", "value", "flag"),
    [
        ("FLANNELD_HEALTHZ_PORT", "abc", "--healthz-port"),
        ("FLANNELD_HEALTHZ_PORT", "70000", "--healthz-port"),
        ("FLANNELD_IP_MASQ", "yes", "--ip-masq"),
        ("FLANNELD_PUBLIC_IP", "fd00::1", "--public-ip"),
        ("FLANNELD_IFACE_REGEX", "(", "--iface-regex"),
        ("FLANNELD_DATAPATH", "xdp", "--datapath"),
        ("FLANNELD_V", "high", "--v"),
    ],
)
def test_bad_env_value(var: str, value: str, flag: str) -> None:
    message = flag_error([], {var: value})

    assert var in message
    assert flag in message
    assert f'"{value}"' in message


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--no-such-flag"], ["not defined", "--no-such-flag"]),
        (["-nosuch=1"], ["not defined", "-nosuch=1"]),
        (["--ip-masquerade"], ["not defined", "--ip-masquerade"]),  # no prefix matching
        (["--ip"], ["not defined", "--ip"]),
        (["--iface"], ["--iface", "missing value"]),
        (["-etcd-endpoints"], ["--etcd-endpoints", "missing value"]),
        (
            ["--subnet-lease-renew-margin=abc"],
            ['flag --subnet-lease-renew-margin: invalid value "abc": not an integer'],
        ),
        (["--iptables-resync", "5s"], ["--iptables-resync", '"5s"', "not an integer"]),
        (["--iptables-resync=0"], ["--iptables-resync", '"0"']),
        (["--healthz-port=65536"], ["--healthz-port", '"65536"', "0 and 65535"]),
        (["--healthz-port=-1"], ["--healthz-port", '"-1"']),
        (["--ip-masq=maybe"], ["--ip-masq", '"maybe"']),
        (["eth0"], ['"eth0"', "unexpected argument"]),
        (["--iface=eth0", "extra"], ['"extra"', "unexpected argument"]),
        (["--", "extra"], ['"extra"', "unexpected argument"]),
        (["-"], ['"-"', "unexpected argument"]),
        (["---iface=eth0"], ["bad flag syntax", "---iface=eth0"]),
        (["-=x"], ["bad flag syntax", "-=x"]),
        (["--iface-regex=(unclosed"], ["--iface-regex", '"(unclosed"', "regular expression"]),
        (["--iface-regex=[z-a]"], ["--iface-regex", '"[z-a]"']),
        (["--public-ip=fd00::1"], ["--public-ip", '"fd00::1"', "IPv4"]),
        (["--public-ip=node1.example"], ["--public-ip", '"node1.example"', "IPv4"]),
        (["--public-ip=10.0.0.256"], ["--public-ip", '"10.0.0.256"']),
        (["--public-ip=10.0.0.1/24"], ["--public-ip", '"10.0.0.1/24"']),
        (["--public-ipv6=10.0.0.1"], ["--public-ipv6", '"10.0.0.1"', "IPv6"]),
        (["--datapath=xdp"], ["--datapath", '"xdp"', "auto, bpf, kernel, userspace"]),
        (["--log-format=logfmt"], ["--log-format", '"logfmt"', "text, json"]),
        (["--etcd-prefix="], ["--etcd-prefix", '""']),
        (["--etcd-endpoints=,"], ["--etcd-endpoints", '","']),
    ],
)
def test_flag_errors(argv: list[str], expected: list[str]) -> None:
    message = flag_error(argv)

    for part in expected:
        assert part in message


def test_iface_regex_error_in_any_position() -> None:
    message = flag_error(["--iface-regex=^ok$", "--iface-regex=*bad"])

    assert '"*bad"' in message


@pytest.mark.parametrize("margin", ["0", "-5", "1440", "100000"])
def test_renew_margin_out_of_range(margin: str) -> None:
    message = flag_error([f"--subnet-lease-renew-margin={margin}"])

    assert message.startswith(RENEW_MARGIN_ERROR)
    assert "--subnet-lease-renew-margin" in message
    assert f'"{int(margin)}"' in message


def test_renew_margin_out_of_range_from_env_names_the_variable() -> None:
    message = flag_error([], {"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "1440"})

    assert message.startswith(RENEW_MARGIN_ERROR)
    assert "FLANNELD_SUBNET_LEASE_RENEW_MARGIN" in message


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--kube-subnet-mgr"], {}),
        (["-kube-subnet-mgr=true"], {}),
        ([], {"FLANNELD_KUBE_SUBNET_MGR": "true"}),
    ],
)
def test_kube_subnet_manager_mode_is_taken(argv: list[str], environ: dict[str, str]) -> None:
    options = parse(argv, environ)

    assert options.kube_subnet_mgr is True
    assert options.kube_annotation_prefix == "flannel.alpha.coreos.com"
    assert options.net_config_path == "/etc/kube-flannel/net-conf.json"


@pytest.mark.parametrize(
    ("argv", "environ", "origin"),
    [
        (["--kube-subnet-mgr", "--kube-annotation-prefix=org"], {}, "--kube-annotation-prefix"),
        (["--kube-subnet-mgr"], {"FLANNELD_KUBE_ANNOTATION_PREFIX": "a/b/c"},
         "FLANNELD_KUBE_ANNOTATION_PREFIX"),
    ],
)  # fmt: skip
def test_a_bad_annotation_prefix_is_a_flag_error(
    argv: list[str], environ: dict[str, str], origin: str
) -> None:
    message = flag_error(argv, environ)

    assert origin in message and "subnet/kube: prefix" in message


def test_kube_flags_without_the_mode_are_accepted() -> None:
    options = parse(["--kube-subnet-mgr=false", "--kube-api-url=", "--kubeconfig-file="])

    assert options.kube_subnet_mgr is False


def test_flag_error_is_a_value_error() -> None:
    assert issubclass(FlagError, ValueError)


# --- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["-h"], ["--h"], ["-help"], ["--help"], ["--help=false"], ["--iface=a", "-h"]]
)
def test_help(argv: list[str]) -> None:
    with pytest.raises(HelpRequested) as info:
        parse(argv)

    assert info.value.usage == run_usage()


def test_error_before_help_wins_like_go() -> None:
    flag_error(["--bogus", "--help"])


def test_usage_lists_every_flag_and_the_environment() -> None:
    usage = run_usage()

    for name in flag_names():
        assert f"  -{name}" in usage
    assert "FLANNELD_" in usage
    assert '(default "http://127.0.0.1:4001,http://127.0.0.1:2379")' in usage
    assert "(default true)" in usage
