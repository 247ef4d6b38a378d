"""subnet.env: the contract with the CNI plugin and Docker (flannel-compat.md section 4)."""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T", IPv4Network, IPv6Network)


@dataclass(frozen=True)
class SubnetFile:
    network: IPv4Network | None
    subnet: IPv4Network | None
    ipv6_network: IPv6Network | None
    ipv6_subnet: IPv6Network | None
    mtu: int
    ip_masq: bool

    def render(self) -> str:
        """flanneld's variables in flanneld's order; subnets as their first usable address."""
        lines = []
        if self.network is not None and self.subnet is not None:
            lines.append(f"FLANNEL_NETWORK={self.network}")
            lines.append(
                f"FLANNEL_SUBNET={self.subnet.network_address + 1}/{self.subnet.prefixlen}"
            )
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_NETWORK={self.ipv6_network}")
            first = self.ipv6_subnet.network_address + 1
            lines.append(f"FLANNEL_IPV6_SUBNET={first}/{self.ipv6_subnet.prefixlen}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ip_masq else 'false'}")
        return "".join(line + "\n" for line in lines)


def write_subnet_file(path: str | os.PathLike[str], contents: SubnetFile) -> None:
    """Write atomically (temp file + rename) with mode 0644 whatever the umask.

    A half-written file makes every pod sandbox creation fail, so readers must only ever see
    the old file or the complete new one.
    """
    target = Path(path)
    _make_dirs(target.parent)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(contents.render())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_dirs(directory: Path) -> None:
    """mkdir -p with 0755 on what we create, whatever the umask: CNI and Docker read the file."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        os.chmod(path, 0o755)


@dataclass(frozen=True)
class PreviousSubnets:
    """What an earlier run left in subnet.env: used to keep the same subnet across restarts."""

    network: IPv4Network | None = None
    subnet: IPv4Network | None = None
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None


def read_previous_subnets(path: str | os.PathLike[str]) -> PreviousSubnets:
    """Read an earlier subnet.env as flanneld does; anything unreadable counts as absent."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return PreviousSubnets()
    except OSError as exc:
        log.warning("cannot read previous subnet file %s: %s", path, exc)
        return PreviousSubnets()
    values = _parse_env(text)
    return PreviousSubnets(
        network=_single_cidr(values, "FLANNEL_NETWORK", IPv4Network),
        subnet=_single_cidr(values, "FLANNEL_SUBNET", IPv4Network),
        ipv6_network=_single_cidr(values, "FLANNEL_IPV6_NETWORK", IPv6Network),
        ipv6_subnet=_single_cidr(values, "FLANNEL_IPV6_SUBNET", IPv6Network),
    )


def _parse_env(text: str) -> dict[str, str]:
    """The subset of dotenv syntax subnet.env files use: KEY=value, optional quotes, comments."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _single_cidr(values: dict[str, str], key: str, kind: type[T]) -> T | None:
    """flanneld accepts a comma-separated list, skips invalid entries and wants exactly one."""
    if key not in values:
        return None
    parsed: list[T] = []
    for item in values[key].split(","):
        try:
            network = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            continue
        if isinstance(network, kind):
            parsed.append(network)
    if len(parsed) > 1:
        log.error("%s in subnet file lists %d subnets; ignoring it", key, len(parsed))
        return None
    return parsed[0] if parsed else None


# --------------------------------------------------------------------------------------------
# Docker: what flanneld's dist/mk-docker-opts.sh makes of subnet.env


DOCKER_OPTS_SCHEMA = "flannel-bpf/docker-opts/v1"


@dataclass(frozen=True)
class DockerOptions:
    """DOCKER_OPT_* variables (in the script's order: sorted by name) and the combined line."""

    options: dict[str, str]
    combined_key: str
    combined: str

    def render(self, individual: bool, combined: bool) -> str:
        lines = [f'{name}="{value}"' for name, value in self.options.items()] if individual else []
        if combined:
            lines.append(f'{self.combined_key}="{self.combined}"')
        return "".join(line + "\n" for line in lines)


def docker_options(
    subnet_env: str,
    environ: dict[str, str],
    *,
    ip_masq: bool = True,
    combined_key: str = "DOCKER_OPTS",
) -> DockerOptions:
    """mk-docker-opts.sh's result for the text of a subnet.env.

    As the script: --bip and --mtu straight from the file; --ip-masq=false when flannel
    masquerades (FLANNEL_IPMASQ=true) unless ``ip_masq`` is off (its -m); DOCKER_OPT_* variables
    already in the environment are kept; the combined value starts with the environment's
    value of ``combined_key``, then a space, then each option followed by a space.
    """
    values = _parse_env(subnet_env)
    options = {k: v for k, v in environ.items() if k.startswith("DOCKER_OPT_")}
    if values.get("FLANNEL_SUBNET"):
        options["DOCKER_OPT_BIP"] = f"--bip={values['FLANNEL_SUBNET']}"
    if values.get("FLANNEL_MTU"):
        options["DOCKER_OPT_MTU"] = f"--mtu={values['FLANNEL_MTU']}"
    if values.get("FLANNEL_IPMASQ") == "true" and ip_masq:
        options["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
    ordered = dict(sorted(options.items()))
    combined = environ.get(combined_key, "") + " " + "".join(v + " " for v in ordered.values())
    return DockerOptions(ordered, combined_key, combined)
