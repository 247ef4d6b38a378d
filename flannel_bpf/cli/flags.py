"""flanneld's command line for `flannel-bpf run` (flannel-compat.md section 6).

flanneld parses its flags with Go's `flag` package and then fills every flag that was not given
on the command line from `FLANNELD_<NAME>` (coreos/pkg flagutil.SetFlagsFromEnv). Existing
systemd units, /etc/sysconfig files and scripts rely on the exact spellings, so this module
reimplements those rules instead of using argparse, whose conventions differ in ways that would
break them (single-dash long flags, `-flag=false` booleans, no prefix abbreviation, values that
start with a dash).

Rules kept from Go's `flag` package:

* `-name` and `--name` are the same flag; a value is given as `-name=value` or `-name value`.
  A non-boolean flag without `=` always takes the next argument, even one starting with `-`.
* A boolean flag never takes the next argument: `--ip-masq`, `--ip-masq=false`,
  `-ip-masq=0`; values are Go's strconv.ParseBool set (1 t T TRUE true True / 0 f F FALSE false
  False).
* Integers use strconv.ParseInt base 0: `0x1f`, `0o17`, `017` (octal) and `0b101` are accepted,
  as are `_` separators after a base prefix; `-v` is decimal only (klog).
* Parsing stops at `--`. A scalar flag given twice keeps the last value; `--iface` and
  `--iface-regex` accumulate in order.
* `-h`, `-help`, `--h`, `--help` raise `HelpRequested` carrying the usage text (flanneld prints
  it and exits 0; the caller decides).

Deliberate differences from flanneld, all of them turning a silent misconfiguration into an
error: stray positional arguments (flanneld ignores everything after the first one), bad
environment values (flanneld logs and carries on with the default), an invalid `--iface-regex`
(flanneld only notices when it looks for the interface), a `--public-ip` that is not IPv4, a
`--public-ipv6` that is not IPv6, `--healthz-port` outside 0..65535, `--iptables-resync` below 1
(flanneld would spin), an empty `--etcd-prefix` and an `--etcd-endpoints` list with no endpoint.

Environment overlay, exactly as flagutil: for every flag not set on the command line,
`FLANNELD_<NAME>` (upper-case, `-` and `.` become `_`) is applied through the same setter as a
command-line value; empty values are ignored. For the repeatable flags that setter appends the
*whole* value as one element (flanneld's flagSlice.Set), so `FLANNELD_IFACE=eth0,eth1` names a
single interface called "eth0,eth1", just as it does for flanneld; give several values on the
command line instead. `FLANNELD_VERSION` is ignored because flanneld handles `--version` before
it reads the environment.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

ENV_PREFIX = "FLANNELD"
# Documented in docs/metrics.md; Prometheus' own conventions put exporters in the 9xxx range.
DEFAULT_METRICS_ADDR = "0.0.0.0:9867"
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
# Where agents keep their status files unless told otherwise; FLANNEL_BPF_STATUS_DIR moves it
# (tests, and hosts whose /run is laid out differently).
DEFAULT_STATUS_DIR = "/run/flannel-bpf"
STATUS_DIR_ENV = "FLANNEL_BPF_STATUS_DIR"
DEFAULT_STATUS_FILE = f"{DEFAULT_STATUS_DIR}/status.json"

DATAPATHS = ("auto", "bpf", "kernel", "userspace")
BPF_DECAP_MODES = ("auto", "xdp", "tc", "xdp-generic")
HOST_ROUTING_MODES = ("kernel", "bpf")
LOG_FORMATS = ("text", "json")

# flanneld's own wording, kept so that existing log searches and runbooks still match.
RENEW_MARGIN_ERROR = "Invalid subnet-lease-renew-margin option, out of acceptable range"
RENEW_MARGIN_MIN = 1
RENEW_MARGIN_MAX = 24 * 60 - 1


class FlagError(ValueError):
    """A bad command line or environment; the message is one operator-facing line."""


class HelpRequested(Exception):
    """`-h`/`--help` was given; `usage` is the text to print (flanneld prints it, exits 0).

    Not a FlagError: asking for help is not a mistake and must not exit non-zero.
    """

    def __init__(self, usage: str) -> None:
        super().__init__(usage)
        self.usage = usage


@dataclass(frozen=True)
class AgentOptions:
    """Everything `flannel-bpf run` was told; the defaults are flanneld's."""

    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
    # Go path.Clean'ed, without a trailing slash: keys are f"{etcd_prefix}/config" etc., which
    # equals flanneld's path.Join(prefix, "config") (a prefix of "/" becomes "").
    etcd_prefix: str = "/coreos.com/network"
    etcd_keyfile: str = ""
    etcd_certfile: str = ""
    etcd_cafile: str = ""
    etcd_username: str = ""
    etcd_password: str = field(default="", repr=False)
    iface: tuple[str, ...] = ()
    iface_regex: tuple[str, ...] = ()
    iface_can_reach: str = ""
    subnet_file: str = "/run/flannel/subnet.env"
    public_ip: str = ""
    public_ipv6: str = ""
    subnet_lease_renew_margin: int = 60
    ip_masq: bool = False
    ip_masq_fully_random_disable: bool = False
    iptables_resync: int = 5
    iptables_forward_rules: bool = True
    ip_blackhole_route: bool = False
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    kube_subnet_mgr: bool = False
    kube_api_url: str = ""
    kubeconfig_file: str = ""
    kube_annotation_prefix: str = "flannel.alpha.coreos.com"
    net_config_path: str = "/etc/kube-flannel/net-conf.json"
    set_node_network_unavailable: bool = True
    version: bool = False
    verbosity: int = 0
    # Accepted because flanneld copies them from klog and units pass them; not used.
    vmodule: str = ""
    log_backtrace_at: str = ""
    log_format: str = "text"
    datapath: str = "auto"
    bpf_decap: str = "auto"
    bpffs: str = "/run/flannel-bpf/bpffs"
    anti_spoofing: bool = False
    host_routing: str = "kernel"
    pod_bridge: str = "cni0"
    status_file: str = DEFAULT_STATUS_FILE  # parse_run_args derives it from the subnet file
    metrics_addr: str = DEFAULT_METRICS_ADDR


class _Kind(Enum):
    STRING = "string"
    BOOL = "bool"
    INT = "int"
    LEVEL = "level"  # klog's -v: decimal int32
    LIST = "value"  # flanneld's flagSlice


@dataclass(frozen=True)
class _Flag:
    name: str
    kind: _Kind
    default: str | bool | int
    usage: str
    # Normalises a string value or raises ValueError whose text is the reason shown to the
    # operator; type parsing (int, bool) happens before it.
    check: Callable[[str], str] | None = None
    int_range: tuple[int, int] | None = None
    from_env: bool = True

    @property
    def env_name(self) -> str:
        return f"{ENV_PREFIX}_{self.name.replace('-', '_').replace('.', '_').upper()}"


def _check_public_ip(value: str) -> str:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError("not an IPv4 address") from None
    return value


def _check_public_ipv6(value: str) -> str:
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        raise ValueError("not an IPv6 address") from None
    return value


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    return value


def _check_listen_address(value: str) -> str:
    from flannel_bpf.observe.http_endpoint import EndpointError, parse_listen_address

    if value:
        try:
            parse_listen_address(value, "")
        except EndpointError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return check


def _check_endpoints(value: str) -> str:
    if not _split_endpoints(value):
        raise ValueError("no etcd endpoint in the list")
    return value


def _split_endpoints(value: str) -> tuple[str, ...]:
    # flanneld does a bare strings.Split; empty items and blanks around commas can only be
    # typos, and an empty endpoint would just make every etcd call fail later.
    return tuple(item.strip() for item in value.split(",") if item.strip())


def go_path_clean(path: str) -> str:
    """Go's path.Clean (lexical: no filesystem access)."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(segment)
    cleaned = ("/" if rooted else "") + "/".join(parts)
    return cleaned or "."


def _check_etcd_prefix(value: str) -> str:
    cleaned = go_path_clean(value)
    if cleaned == ".":
        # path.Join(".", "config") is the relative key "config"; nothing sane uses that.
        raise ValueError("empty etcd prefix")
    return "" if cleaned == "/" else cleaned


_FLAGS: tuple[_Flag, ...] = (
    _Flag(
        "etcd-endpoints",
        _Kind.STRING,
        "http://127.0.0.1:4001,http://127.0.0.1:2379",
        "a comma-delimited list of etcd endpoints",
        check=_check_endpoints,
    ),
    _Flag(
        "etcd-prefix",
        _Kind.STRING,
        "/coreos.com/network",
        "etcd prefix",
        check=_check_etcd_prefix,
    ),
    _Flag("etcd-keyfile", _Kind.STRING, "", "SSL key file used to secure etcd communication"),
    _Flag(
        "etcd-certfile",
        _Kind.STRING,
        "",
        "SSL certification file used to secure etcd communication",
    ),
    _Flag(
        "etcd-cafile",
        _Kind.STRING,
        "",
        "SSL Certificate Authority file used to secure etcd communication",
    ),
    _Flag("etcd-username", _Kind.STRING, "", "username for BasicAuth to etcd"),
    _Flag("etcd-password", _Kind.STRING, "", "password for BasicAuth to etcd"),
    _Flag(
        "iface",
        _Kind.LIST,
        "",
        "interface to use (IP or name) for inter-host communication. Can be specified multiple "
        "times to check each option in order. Returns the first match found.",
    ),
    _Flag(
        "iface-regex",
        _Kind.LIST,
        "",
        "regex expression to match the first interface to use (IP or name) for inter-host "
        "communication. Can be specified multiple times to check each regex in order. Returns "
        "the first match found. Regexes are checked after specific interfaces specified by the "
        "iface option have already been checked.",
        check=_check_regex,
    ),
    _Flag(
        "iface-can-reach",
        _Kind.STRING,
        "",
        "detect interface to use (IP or name) for inter-host communication based on which will "
        "be used for provided IP. This is exactly the interface to use of command "
        "'ip route get <ip-address>'",
    ),
    _Flag(
        "subnet-file",
        _Kind.STRING,
        DEFAULT_SUBNET_FILE,
        "filename where env variables (subnet, MTU, ... ) will be written to",
    ),
    _Flag(
        "public-ip",
        _Kind.STRING,
        "",
        "IP accessible by other nodes for inter-host communication",
        check=_check_public_ip,
    ),
    _Flag(
        "public-ipv6",
        _Kind.STRING,
        "",
        "IPv6 accessible by other nodes for inter-host communication",
        check=_check_public_ipv6,
    ),
    _Flag(
        "subnet-lease-renew-margin",
        _Kind.INT,
        60,
        "subnet lease renewal margin, in minutes, ranging from 1 to 1439",
    ),
    _Flag(
        "ip-masq",
        _Kind.BOOL,
        False,
        "setup IP masquerade rule for traffic destined outside of overlay network",
    ),
    _Flag(
        "ip-masq-fully-random-disable",
        _Kind.BOOL,
        False,
        "disable the --random-fully flag of the masquerade rules",
    ),
    _Flag(
        "kube-subnet-mgr",
        _Kind.BOOL,
        False,
        "contact the Kubernetes API for subnet assignment instead of etcd.",
    ),
    _Flag(
        "kube-api-url",
        _Kind.STRING,
        "",
        "Kubernetes API server URL. Does not need to be specified if flannel is running in a pod.",
    ),
    _Flag(
        "kube-annotation-prefix",
        _Kind.STRING,
        "flannel.alpha.coreos.com",
        'Kubernetes annotation prefix. Can contain single slash "/", otherwise it will be '
        "appended at the end.",
    ),
    _Flag(
        "kubeconfig-file",
        _Kind.STRING,
        "",
        "kubeconfig file location. Does not need to be specified if flannel is running in a pod.",
    ),
    _Flag("version", _Kind.BOOL, False, "print version and exit", from_env=False),
    _Flag("healthz-ip", _Kind.STRING, "0.0.0.0", "the IP address for healthz server to listen"),
    _Flag(
        "healthz-port",
        _Kind.INT,
        0,
        "the port for healthz server to listen(0 to disable)",
        int_range=(0, 65535),
    ),
    _Flag(
        "iptables-resync",
        _Kind.INT,
        5,
        "resync period for iptables rules, in seconds",
        int_range=(1, 2**31 - 1),
    ),
    _Flag(
        "iptables-forward-rules",
        _Kind.BOOL,
        True,
        "add default accept rules to FORWARD chain in iptables",
    ),
    _Flag(
        "ip-blackhole-route",
        _Kind.BOOL,
        False,
        "add a blackhole route for the local subnet, refreshed every iptables-resync period",
    ),
    _Flag(
        "net-config-path",
        _Kind.STRING,
        "/etc/kube-flannel/net-conf.json",
        "path to the network configuration file",
    ),
    _Flag(
        "set-node-network-unavailable",
        _Kind.BOOL,
        True,
        "set NodeNetworkUnavailable after ready",
    ),
    _Flag("v", _Kind.LEVEL, 0, "number for the log level verbosity"),
    _Flag("vmodule", _Kind.STRING, "", "accepted for flanneld compatibility; ignored"),
    _Flag("log_backtrace_at", _Kind.STRING, "", "accepted for flanneld compatibility; ignored"),
    _Flag(
        "log-format",
        _Kind.STRING,
        "text",
        "log line format: text (key=value) or json (flannel-bpf)",
        check=_one_of(LOG_FORMATS),
    ),
    _Flag(
        "datapath",
        _Kind.STRING,
        "auto",
        "data path: auto, bpf, kernel (vxlan) or userspace; auto tries them in that order "
        "(flannel-bpf)",
        check=_one_of(DATAPATHS),
    ),
    _Flag(
        "bpf-decap",
        _Kind.STRING,
        "auto",
        "BPF decapsulation hook: auto (native XDP on NICs, tc ingress on veths, under strict "
        "rp_filter or beside another XDP program), xdp, tc, or xdp-generic "
        "(tests only) (flannel-bpf)",
        check=_one_of(BPF_DECAP_MODES),
    ),
    _Flag(
        "bpffs",
        _Kind.STRING,
        "/run/flannel-bpf/bpffs",
        "bpf filesystem for the pinned maps, mounted when missing (flannel-bpf)",
    ),
    _Flag(
        "anti-spoofing",
        _Kind.BOOL,
        False,
        "decapsulate only from underlay addresses holding a lease, and only inner sources inside "
        "that lease's subnet; the rest is dropped and counted (BPF data path) (flannel-bpf)",
    ),
    _Flag(
        "host-routing",
        _Kind.STRING,
        "kernel",
        "pod-to-pod overlay traffic through the host stack (kernel), or, for flows the host "
        "stack has validated (conntrack ESTABLISHED, no NAT), straight between the pod's veth "
        "and the uplink in BPF (bpf: vxlan with the BPF data path, tc decapsulation) "
        "(flannel-bpf)",
        check=_one_of(HOST_ROUTING_MODES),
    ),
    _Flag(
        "pod-bridge",
        _Kind.STRING,
        "cni0",
        "the bridge the pods' veths are attached to (the flannel CNI plugin's cni0); with "
        "--host-routing=bpf its ports get the pod programs (flannel-bpf)",
    ),
    _Flag(
        "status-file",
        _Kind.STRING,
        "",
        "where the agent records its state for `flannel-bpf status`; by default one file per "
        f"subnet file: {DEFAULT_STATUS_FILE} for {DEFAULT_SUBNET_FILE}, else "
        f"{DEFAULT_STATUS_DIR}/status-<subnet file path>.json (flannel-bpf)",
    ),
    _Flag(
        "metrics-addr",
        _Kind.STRING,
        DEFAULT_METRICS_ADDR,
        "host:port serving /metrics, /healthz and /readyz, empty to disable (flannel-bpf)",
        check=_check_listen_address,
    ),
)

_BY_NAME: Mapping[str, _Flag] = {f.name: f for f in _FLAGS}

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1

_DIGITS: Mapping[int, str] = {16: "0-9a-fA-F", 10: "0-9", 8: "0-7", 2: "01"}


def parse_go_bool(value: str) -> bool:
    """strconv.ParseBool."""
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise ValueError("not a boolean (use true or false)")


def parse_go_int(value: str) -> int:
    """strconv.ParseInt(value, 0, 64), the parser behind Go's flag.IntVar."""
    body = value
    sign = 1
    if body[:1] in ("+", "-"):
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    prefixed = True
    lower = body[:2].lower()
    if lower in ("0x", "0b", "0o"):
        base = {"0x": 16, "0b": 2, "0o": 8}[lower]
        digits = body[2:]
    elif body.startswith("0") and len(body) > 1:
        base, digits = 8, body[1:]
    else:
        base, digits, prefixed = 10, body, False
    # Go allows `_` only with a base prefix and only between digits (a leading one follows the
    # prefix); the character class also keeps out the non-ASCII digits Python's int() accepts.
    digit = f"[{_DIGITS[base]}]"
    pattern = rf"_?{digit}+(?:_{digit}+)*" if prefixed else rf"{digit}+"
    if not re.fullmatch(pattern, digits, re.ASCII):
        raise ValueError("not an integer")
    number = sign * int(digits.replace("_", ""), base)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise ValueError("integer out of range")
    return number


def _parse_level(value: str) -> int:
    # klog's Level.Set: strconv.ParseInt(value, 10, 32).
    if not re.fullmatch(r"[+-]?[0-9]+", value, re.ASCII):
        raise ValueError("not an integer")
    number = int(value)
    if not _INT32_MIN <= number <= _INT32_MAX:
        raise ValueError("integer out of range")
    return number


@dataclass
class _State:
    """Values being collected during one parse; never shared between calls."""

    strings: dict[str, str] = field(default_factory=dict)
    bools: dict[str, bool] = field(default_factory=dict)
    ints: dict[str, int] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)
    # Where each value came from, for error messages about cross-checks done after parsing.
    origin: dict[str, str] = field(default_factory=dict)

    def set(self, flag: _Flag, value: str, origin: str) -> None:
        """Go's flag.Value.Set: parse, validate, store. Raises FlagError."""
        try:
            if flag.kind is _Kind.BOOL:
                self.bools[flag.name] = parse_go_bool(value)
            elif flag.kind in (_Kind.INT, _Kind.LEVEL):
                number = parse_go_int(value) if flag.kind is _Kind.INT else _parse_level(value)
                if flag.int_range is not None:
                    low, high = flag.int_range
                    if not low <= number <= high:
                        raise ValueError(f"must be between {low} and {high}")
                self.ints[flag.name] = number
            else:
                checked = flag.check(value) if flag.check is not None else value
                if flag.kind is _Kind.LIST:
                    # Validated on the raw value so the element is exactly what was given.
                    self.lists.setdefault(flag.name, []).append(value)
                else:
                    self.strings[flag.name] = checked
        except ValueError as exc:
            raise FlagError(f'{origin}: invalid value "{value}": {exc}') from None
        self.origin[flag.name] = origin

    def string(self, name: str) -> str:
        if name in self.strings:
            return self.strings[name]
        default = _BY_NAME[name].default
        assert isinstance(default, str)
        return default

    def boolean(self, name: str) -> bool:
        if name in self.bools:
            return self.bools[name]
        default = _BY_NAME[name].default
        assert isinstance(default, bool)
        return default

    def integer(self, name: str) -> int:
        if name in self.ints:
            return self.ints[name]
        default = _BY_NAME[name].default
        assert isinstance(default, int) and not isinstance(default, bool)
        return default

    def strs(self, name: str) -> tuple[str, ...]:
        return tuple(self.lists.get(name, ()))


def _flag_origin(flag: _Flag) -> str:
    return f"flag --{flag.name}"


def _env_origin(flag: _Flag) -> str:
    return f"environment variable {flag.env_name} (flag --{flag.name})"


def _parse_command_line(argv: Sequence[str], state: _State) -> None:
    """Go's FlagSet.Parse, except that positional arguments are an error."""
    index = 0
    previous_bool: str | None = None
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            if index < len(argv):
                raise FlagError(f'unexpected argument "{argv[index]}": run takes no arguments')
            return
        if len(arg) < 2 or not arg.startswith("-"):
            hint = ""
            if previous_bool is not None:
                hint = f"; boolean flags take their value after '=', e.g. --{previous_bool}={arg}"
            raise FlagError(f'unexpected argument "{arg}": run takes no arguments{hint}')
        dashes = 2 if arg.startswith("--") else 1
        name = arg[dashes:]
        if not name or name[0] in "-=":
            raise FlagError(f'bad flag syntax: "{arg}"')
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        flag = _BY_NAME.get(name)
        if flag is None:
            if name in ("h", "help"):
                raise HelpRequested(run_usage())
            raise FlagError(f'flag provided but not defined: "{arg}" (see --help)')
        previous_bool = None
        if flag.kind is _Kind.BOOL:
            if value is None:
                value = "true"
                previous_bool = flag.name
        elif value is None:
            if index >= len(argv):
                raise FlagError(f"flag --{flag.name}: missing value (flag needs an argument)")
            value = argv[index]
            index += 1
        state.set(flag, value, _flag_origin(flag))


def _apply_environment(environ: Mapping[str, str], given: set[str], state: _State) -> None:
    """flagutil.SetFlagsFromEnv: only flags not on the command line, non-empty values."""
    for flag in sorted(_FLAGS, key=lambda f: f.name):  # VisitAll order, for a stable error
        if flag.name in given or not flag.from_env:
            continue
        value = environ.get(flag.env_name, "")
        if value != "":
            state.set(flag, value, _env_origin(flag))


def parse_run_args(argv: Sequence[str], environ: Mapping[str, str]) -> AgentOptions:
    """Parse `flannel-bpf run` arguments (without the program and subcommand names).

    Raises FlagError for anything wrong and HelpRequested for -h/--help.
    """
    state = _State()
    _parse_command_line(argv, state)
    _apply_environment(environ, set(state.origin), state)

    margin = state.integer("subnet-lease-renew-margin")
    if not RENEW_MARGIN_MIN <= margin <= RENEW_MARGIN_MAX:
        origin = state.origin.get("subnet-lease-renew-margin", "flag --subnet-lease-renew-margin")
        raise FlagError(
            f'{RENEW_MARGIN_ERROR}: {origin}: invalid value "{margin}" '
            f"(minutes, {RENEW_MARGIN_MIN}..{RENEW_MARGIN_MAX})"
        )
    if state.boolean("kube-subnet-mgr"):
        from flannel_bpf.subnet.kube.annotations import AnnotationPrefixError, normalize_prefix

        try:
            normalize_prefix(state.string("kube-annotation-prefix"))
        except AnnotationPrefixError as exc:
            origin = state.origin.get("kube-annotation-prefix", "flag --kube-annotation-prefix")
            raise FlagError(f"{origin}: {exc}") from None

    return AgentOptions(
        etcd_endpoints=_split_endpoints(state.string("etcd-endpoints")),
        etcd_prefix=state.string("etcd-prefix"),
        etcd_keyfile=state.string("etcd-keyfile"),
        etcd_certfile=state.string("etcd-certfile"),
        etcd_cafile=state.string("etcd-cafile"),
        etcd_username=state.string("etcd-username"),
        etcd_password=state.string("etcd-password"),
        iface=state.strs("iface"),
        iface_regex=state.strs("iface-regex"),
        iface_can_reach=state.string("iface-can-reach"),
        subnet_file=state.string("subnet-file"),
        public_ip=state.string("public-ip"),
        public_ipv6=state.string("public-ipv6"),
        subnet_lease_renew_margin=margin,
        ip_masq=state.boolean("ip-masq"),
        ip_masq_fully_random_disable=state.boolean("ip-masq-fully-random-disable"),
        iptables_resync=state.integer("iptables-resync"),
        iptables_forward_rules=state.boolean("iptables-forward-rules"),
        ip_blackhole_route=state.boolean("ip-blackhole-route"),
        healthz_ip=state.string("healthz-ip"),
        healthz_port=state.integer("healthz-port"),
        kube_subnet_mgr=state.boolean("kube-subnet-mgr"),
        kube_api_url=state.string("kube-api-url"),
        kubeconfig_file=state.string("kubeconfig-file"),
        kube_annotation_prefix=state.string("kube-annotation-prefix"),
        net_config_path=state.string("net-config-path"),
        set_node_network_unavailable=state.boolean("set-node-network-unavailable"),
        version=state.boolean("version"),
        verbosity=state.integer("v"),
        vmodule=state.string("vmodule"),
        log_backtrace_at=state.string("log_backtrace_at"),
        log_format=state.string("log-format"),
        datapath=state.string("datapath"),
        bpf_decap=state.string("bpf-decap"),
        bpffs=state.string("bpffs"),
        anti_spoofing=state.boolean("anti-spoofing"),
        host_routing=state.string("host-routing"),
        pod_bridge=state.string("pod-bridge"),
        status_file=state.string("status-file")
        or default_status_file(state.string("subnet-file"), environ),
        metrics_addr=state.string("metrics-addr"),
    )


def status_dir(environ: Mapping[str, str]) -> str:
    return environ.get(STATUS_DIR_ENV) or DEFAULT_STATUS_DIR


def default_status_file(subnet_file: str, environ: Mapping[str, str]) -> str:
    """One status file per agent instance. flanneld's multi-network mode runs one daemon per
    -subnet-file (and -etcd-prefix), so the subnet file names the instance: the usual one keeps
    the well-known status.json, any other gets its path in the name, e.g.
    /run/flannel/networks/blue.env -> status-run-flannel-networks-blue.env.json."""
    directory = status_dir(environ)
    if subnet_file == DEFAULT_SUBNET_FILE:
        return f"{directory}/status.json"
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", subnet_file.strip("/")) or "subnet"
    return f"{directory}/status-{slug}.json"


def flag_names() -> tuple[str, ...]:
    """Every flag name, without dashes (for shell completion and docs)."""
    return tuple(sorted(f.name for f in _FLAGS))


def env_name(flag: str) -> str:
    """The environment variable for a flag name: "etcd-endpoints" -> FLANNELD_ETCD_ENDPOINTS."""
    return _BY_NAME[flag].env_name


def run_usage() -> str:
    """Help text in the layout of Go's flag.PrintDefaults."""
    lines = ["Usage: flannel-bpf run [OPTION]..."]
    for flag in sorted(_FLAGS, key=lambda f: f.name):
        head = f"  -{flag.name}"
        if flag.kind is not _Kind.BOOL:
            head += " int" if flag.kind in (_Kind.INT, _Kind.LEVEL) else f" {flag.kind.value}"
        text = flag.usage
        if flag.kind is _Kind.BOOL and flag.default is True:
            text += " (default true)"
        elif flag.kind is _Kind.STRING and flag.default != "":
            text += f' (default "{flag.default}")'
        elif flag.kind in (_Kind.INT, _Kind.LEVEL) and flag.default != 0:
            text += f" (default {flag.default})"
        lines.append(head)
        lines.append(f"    \t{text}")
    lines += [
        "",
        "Flags may be written -name or --name, with -name=value or -name value; boolean flags",
        "take -name, -name=true or -name=false. Any flag not given on the command line is read",
        f"from {ENV_PREFIX}_<NAME> (upper-case, '-' becomes '_'), e.g. "
        f"{ENV_PREFIX}_ETCD_ENDPOINTS.",
    ]
    return "\n".join(lines) + "\n"
