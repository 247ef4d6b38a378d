"""`flannel-bpf`: the command line. `run` is the agent; other commands inspect and manage."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flannel_bpf import __version__
from flannel_bpf.agent import Agent, AgentError
from flannel_bpf.cli.flags import (
    DEFAULT_STATUS_FILE,
    FlagError,
    HelpRequested,
    parse_run_args,
    run_usage,
)
from flannel_bpf.observe.logs import setup_logging
from flannel_bpf.observe.systemd import NOTIFY_VARIABLES, SystemdNotifier

log = logging.getLogger("flannel_bpf")


USAGE = """\
usage: flannel-bpf COMMAND [ARGS]

commands:
  run [FLAGS]     run the agent (flanneld's flags and FLANNELD_* environment; run -h lists them)
  status [--status-file PATH] [-o json]
                  the agent: data path and why, lease and expiry, etcd health, BPF hooks
  leases [-o json] [etcd flags]
                  every lease in etcd: subnet, public IP, backend, expiry or reservation
  peers [-o json] the BPF remote map (peer subnet -> VTEP), read from the pins
  stats [-o json] [--all]
                  BPF counters by hook and reason, read from the pins
  docker-opts [-f subnet.env] [-d FILE|-] [-i] [-c] [-k KEY] [-m]
                  Docker daemon options from subnet.env (flanneld's mk-docker-opts.sh)
  cleanup [--bpffs PATH]
                  detach and unpin this namespace's BPF data path (a normal stop leaves it)
  lab up|status|exec|restart|etcd|down
                  a multi-node lab on network namespaces (lab -h for its options)
  vagrant up|status|ssh|down
                  the Vagrant lab: etcd and worker VMs under a libvirtd of its own (vagrant -h)
  bench [--quick] [--only prog_cost control_plane datapath]
                  build, measure, tear down; write docs/benchmarks.md (from a source checkout)
  version         print the version

flannel-bpf run --iface eth1 --etcd-endpoints http://10.0.0.1:2379
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return EXIT_OK if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    commands: dict[str, Callable[[list[str]], int]] = {
        "run": cmd_run,
        "status": cmd_status,
        "leases": cmd_leases,
        "peers": cmd_peers,
        "stats": cmd_stats,
        "docker-opts": cmd_docker_opts,
        "cleanup": cmd_cleanup,
        "lab": cmd_lab,
        "bench": cmd_bench,
        "vagrant": cmd_vagrant,
        "version": cmd_version,
    }
    if command in ("-version", "--version"):
        return cmd_version(rest)
    handler = commands.get(command)
    if handler is None:
        print(f"flannel-bpf: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        return EXIT_USAGE
    return handler(rest)


def cmd_version(_: list[str]) -> int:
    print(__version__)
    return EXIT_OK


def cmd_run(args: list[str]) -> int:
    try:
        options = parse_run_args(args, os.environ)
    except HelpRequested:
        print(run_usage(), end="")
        return EXIT_OK
    except FlagError as exc:
        print(f"flannel-bpf run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if options.version:
        print(__version__, file=sys.stderr)
        return EXIT_OK
    setup_logging(options.verbosity, options.log_format)
    log.info("flannel-bpf %s starting (pid %d)", __version__, os.getpid())
    notifier = SystemdNotifier.from_environment(os.environ)
    for name in NOTIFY_VARIABLES:  # ours alone: not for the compilers and tools we run
        os.environ.pop(name, None)
    if notifier.enabled:
        log.info("notifying systemd (watchdog every %s s)", notifier.watchdog_interval or "-")
    try:
        status = asyncio.run(_run_until_signalled(Agent(options, notifier=notifier)))
    except AgentError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    log.info("Exiting cleanly...")
    return status


def _output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default="text",
        help="json: the stable document described in docs/cli.md",
    )


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace | int:
    try:
        return parser.parse_args(args)
    except SystemExit as exc:
        return int(exc.code or 0)


def _emit(doc: dict[str, Any], output: str, text: Callable[[dict[str, Any]], str]) -> None:
    print(json.dumps(doc, indent=2) if output == "json" else text(doc))


def cmd_status(args: list[str]) -> int:
    from flannel_bpf.observe.status import (
        STATUS_LIST_SCHEMA,
        StatusError,
        collect,
        format_status,
        status_file_for_subnet_file,
        status_files,
    )

    parser = argparse.ArgumentParser(
        prog="flannel-bpf status",
        description="the agent: data path and why, lease and expiry, etcd endpoints and their "
        "health, BPF hooks; exit status 0 only while the agent runs with its devices here. "
        "Without --status-file or --subnet-file: every agent instance on this host.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--status-file", help="one instance, by its status file")
    which.add_argument("--subnet-file", help="one instance, by the subnet file it writes")
    parser.add_argument(
        "--no-etcd-probe",
        action="store_true",
        help="do not contact etcd (each endpoint otherwise gets one 2 s read; a password comes "
        "from FLANNELD_ETCD_PASSWORD)",
    )
    _output_flag(parser)
    opts = _parse(parser, args)
    if isinstance(opts, int):
        return opts
    if opts.status_file:
        paths = [Path(opts.status_file)]
    elif opts.subnet_file:
        paths = [status_file_for_subnet_file(opts.subnet_file)]
    else:
        # Several agents on one host (flanneld's multi-network mode) each have their own file.
        paths = status_files() or [Path(DEFAULT_STATUS_FILE)]
    password = os.environ.get("FLANNELD_ETCD_PASSWORD", "")
    try:
        docs = [collect(path, not opts.no_etcd_probe, password) for path in paths]
    except StatusError as exc:
        print(f"flannel-bpf status: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if len(docs) == 1:
        _emit(docs[0], opts.output, format_status)
    else:
        listing = {"schema": STATUS_LIST_SCHEMA, "instances": docs}
        _emit(listing, opts.output, lambda doc: "\n\n".join(
            f"== instance {d['status_file']} (subnet file {d.get('subnet_file') or '?'})\n"
            + format_status(d) for d in doc["instances"]
        ))  # fmt: skip
    healthy = all(d.get("running") and not d.get("problems") for d in docs)
    return EXIT_OK if healthy else EXIT_FAILURE


def cmd_leases(args: list[str]) -> int:
    """Every lease in etcd, read with the agent's own flags and FLANNELD_* environment."""
    from flannel_bpf.observe.inspection import InspectionError, format_leases, leases_document

    output, rest = _take_output(args)
    if output is None:
        print("flannel-bpf leases: -o takes text or json", file=sys.stderr)
        return EXIT_USAGE
    try:
        options = parse_run_args(rest, os.environ)
    except HelpRequested:
        print(
            "usage: flannel-bpf leases [-o text|json] [--etcd-endpoints ...] [--etcd-prefix ...] "
            "[--etcd-cafile/certfile/keyfile ...] [--etcd-username/password ...]\n"
            "Lists every lease under <prefix>/subnets/ (flannel-bpf run -h: all flags)."
        )
        return EXIT_OK
    except FlagError as exc:
        print(f"flannel-bpf leases: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.ERROR)
    try:
        doc = asyncio.run(leases_document(options))
    except InspectionError as exc:
        print(f"flannel-bpf leases: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    _emit(doc, output, format_leases)
    return EXIT_OK


def _take_output(args: list[str]) -> tuple[str | None, list[str]]:
    """Pull -o/--output out of a flanneld-style flag list; None when its value is bad."""
    output, rest, i = "text", [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-o", "--output", "-output"):
            output = args[i + 1] if i + 1 < len(args) else ""
            i += 2
            continue
        if arg.startswith(("-o=", "--output=", "-output=")):
            output = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return (output if output in ("text", "json") else None), rest


def _pin_command(
    args: list[str],
    name: str,
    description: str,
    document: Callable[[list[Any]], dict[str, Any]],
    text: Callable[[dict[str, Any], argparse.Namespace], str],
    add_flags: Callable[[argparse.ArgumentParser], object] = lambda parser: None,
) -> int:
    """peers and stats: find the pinned instances, build the document, print it."""
    from flannel_bpf.datapath.loader import DEFAULT_BPFFS
    from flannel_bpf.observe.inspection import InspectionError, find_instances

    parser = argparse.ArgumentParser(prog=f"flannel-bpf {name}", description=description)
    parser.add_argument("--pin-dir", help="one instance's pins (default: every instance pinned "
                        "for this network namespace)")  # fmt: skip
    parser.add_argument("--bpffs", default=str(DEFAULT_BPFFS))
    parser.add_argument("--status-file", default=DEFAULT_STATUS_FILE)
    _output_flag(parser)
    add_flags(parser)
    opts = _parse(parser, args)
    if isinstance(opts, int):
        return opts
    try:
        instances = find_instances(opts.pin_dir, Path(opts.bpffs), Path(opts.status_file))
        doc = document(instances)
    except InspectionError as exc:
        print(f"flannel-bpf {name}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    _emit(doc, opts.output, lambda d: text(d, opts))
    return EXIT_OK


def cmd_peers(args: list[str]) -> int:
    from flannel_bpf.observe.inspection import format_peers, peers_document

    return _pin_command(
        args,
        "peers",
        "the BPF remote map: peer subnet -> VTEP (read from the pins)",
        peers_document,
        lambda doc, _: format_peers(doc),
    )


def cmd_stats(args: list[str]) -> int:
    from flannel_bpf.observe.inspection import format_stats, stats_document

    return _pin_command(
        args,
        "stats",
        "BPF data-path counters by hook and reason, summed over CPUs (read from the pins)",
        stats_document,
        lambda doc, opts: format_stats(doc, show_zero=opts.all),
        lambda parser: parser.add_argument(
            "--all", action="store_true", help="text: also the counters at zero"
        ),
    )


def cmd_docker_opts(args: list[str]) -> int:
    """flanneld's mk-docker-opts.sh, same flags and output file."""
    from flannel_bpf.subnet.subnet_env import DOCKER_OPTS_SCHEMA, docker_options

    parser = argparse.ArgumentParser(
        prog="flannel-bpf docker-opts",
        description="Docker daemon options from subnet.env, as flanneld's mk-docker-opts.sh",
    )
    parser.add_argument("-f", dest="subnet_env", default="/run/flannel/subnet.env",
                        help="flannel env file (default /run/flannel/subnet.env)")  # fmt: skip
    parser.add_argument("-d", dest="docker_env", default="/run/docker_opts.env",
                        help="Docker env file to write (default /run/docker_opts.env; - for "
                        "standard output)")  # fmt: skip
    parser.add_argument("-i", dest="individual", action="store_true",
                        help="each option as its own DOCKER_OPT_* variable")  # fmt: skip
    parser.add_argument("-c", dest="combined", action="store_true",
                        help="all options in one variable (DOCKER_OPTS)")  # fmt: skip
    parser.add_argument("-k", dest="key", default="DOCKER_OPTS", help="the combined variable")
    parser.add_argument("-m", dest="no_ip_masq", action="store_true", help="no --ip-masq")
    _output_flag(parser)
    opts = _parse(parser, args)
    if isinstance(opts, int):
        return opts
    try:
        text = Path(opts.subnet_env).read_text()
    except OSError as exc:
        print(
            f"flannel-bpf docker-opts: cannot read {opts.subnet_env} ({exc.strerror}): the agent "
            "writes it once it holds a lease (is it running? -f names another file)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    result = docker_options(
        text, dict(os.environ), ip_masq=not opts.no_ip_masq, combined_key=opts.key
    )
    if opts.output == "json":
        doc = {
            "schema": DOCKER_OPTS_SCHEMA,
            "options": result.options,
            "combined_key": result.combined_key,
            "combined": result.combined,
        }
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    both = not opts.individual and not opts.combined
    rendered = result.render(opts.individual or both, opts.combined or both)
    if opts.docker_env == "-":
        print(rendered, end="")
        return EXIT_OK
    try:
        Path(opts.docker_env).write_text(rendered)
    except OSError as exc:
        print(f"flannel-bpf docker-opts: cannot write {opts.docker_env}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_cleanup(args: list[str]) -> int:
    from flannel_bpf.datapath import loader
    from flannel_bpf.datapath.traffic_rules import remove_host_routing_rules

    parser = argparse.ArgumentParser(
        prog="flannel-bpf cleanup",
        description="detach every flannel-bpf program in this network namespace and remove its "
        "pinned maps; also unpins maps of namespaces that no longer exist",
    )
    parser.add_argument("--bpffs", default=str(loader.DEFAULT_BPFFS))
    opts = _parse(parser, args)
    if isinstance(opts, int):
        return opts
    root = Path(opts.bpffs)
    done: list[str] = []
    try:
        for pin_dir in loader.instance_dirs(root):
            done += loader.cleanup(pin_dir)
        done += loader.remove_orphans(root)
        if remove_host_routing_rules():
            done.append("removed the host routing mangle rules")
    except OSError as exc:
        print(f"flannel-bpf cleanup: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for line in done:
        print(line)
    print(f"cleanup: {len(done)} actions" if done else "cleanup: nothing to do")
    return EXIT_OK


def cmd_bench(args: list[str]) -> int:
    """The benchmarks live beside the package in a source checkout (bench/), not in the wheel."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "__main__.py").is_file():
        print(f"flannel-bpf bench: no bench/ next to {root / 'flannel_bpf'}; run it from a "
              "source checkout", file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=root).returncode


def cmd_lab(args: list[str]) -> int:
    from flannel_bpf.lab import cni, lab

    parser = argparse.ArgumentParser(prog="flannel-bpf lab", description="namespace lab")
    parser.add_argument("--name", default="fblab", help="lab name, prefix of its namespaces")
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="build the lab (tears down an earlier one of that name)")
    p_up.add_argument("--nodes", type=int, default=3)
    p_up.add_argument("--pods-per-node", type=int, default=1)
    p_up.add_argument("--backend", default="vxlan")
    p_up.add_argument("--network", default="10.244.0.0/16")
    p_up.add_argument("--ipv6-network", default="",
                      help="dual stack: EnableIPv6 with this IPv6Network (e.g. fd10:244::/56), "
                           "an IPv6 underlay, pods with both families")  # fmt: skip
    p_up.add_argument("--ipv6-only", action="store_true",
                      help="with --ipv6-network and --kube: EnableIPv4 false, no IPv4 "
                           "lease, VTEP or pod address (nodes reach the control plane over "
                           "IPv4)")  # fmt: skip
    p_up.add_argument("--underlay-mtu", type=int, default=1500)
    p_up.add_argument(
        "--datapath",
        default="",
        help="--datapath for the agents, or a comma list cycled over the nodes (bpf,kernel)",
    )
    p_up.add_argument(
        "--agent-arg", action="append", default=[], help="extra flag for every agent (repeatable)"
    )
    p_up.add_argument("--rp-filter", type=int, choices=(0, 1, 2), help="hosts' rp_filter")
    p_up.add_argument(
        "--prometheus", action="store_true", help="also a Prometheus scraping every agent"
    )
    p_up.add_argument(
        "--etcd-tls", action="store_true", help="etcd with mutual TLS (certificates made here)"
    )
    p_up.add_argument(
        "--etcd-members", type=int, default=1, help="members of the etcd cluster (1..5)"
    )
    p_up.add_argument(
        "--flanneld-nodes",
        type=int,
        default=0,
        help="hosts 1..N run the real flanneld (built by scripts/build-peers.sh) instead",
    )
    p_up.add_argument(
        "--flanneld-arg", action="append", default=[], help="extra flag for every flanneld"
    )
    p_up.add_argument(
        "--kube",
        action="store_true",
        help="a Kubernetes control plane (kube-apiserver, kube-controller-manager) on the etcd, "
        "agents in Kubernetes mode",
    )
    p_status = sub.add_parser("status", help="nodes and pods")
    p_status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p_exec = sub.add_parser("exec", help="run a command in a pod or node: exec POD -- CMD")
    p_exec.add_argument("pod")
    p_exec.add_argument("command", nargs=argparse.REMAINDER)
    p_restart = sub.add_parser("restart", help="restart a node's agent (--kill: SIGKILL it)")
    p_restart.add_argument("node")
    p_restart.add_argument("--kill", action="store_true")
    p_etcd = sub.add_parser(
        "etcd", help="stop, kill or start one etcd member: etcd stop|kill|start MEMBER"
    )
    p_etcd.add_argument("operation", choices=("stop", "kill", "start"))
    p_etcd.add_argument("member", type=int, help="0-based, as in lab status")
    sub.add_parser("down", help="remove everything the lab made")
    p_attach = sub.add_parser(
        "attach-pods",
        help="on a node (a Vagrant VM): pods in namespaces of their own, attached through the "
        "node's CNI configuration list as a container runtime attaches them",
    )
    p_attach.add_argument("--count", type=int, default=2)
    p_attach.add_argument("--prefix", default="pod", help="pods are PREFIX1..PREFIXN")
    p_attach.add_argument(
        "--cni-conf", type=Path, default=Path("/etc/cni/net.d/10-flannel.conflist"),
        help="the CNI configuration list (default: %(default)s, packaging/cni's)",
    )  # fmt: skip
    opts = _parse(parser, args)
    if isinstance(opts, int):
        return opts
    try:
        if opts.action == "up":
            if not 1 <= opts.nodes <= 50 or not 0 <= opts.pods_per_node <= 20:
                raise lab.LabError("--nodes must be 1..50 and --pods-per-node 0..20")
            spec = lab.LabSpec(
                opts.name,
                opts.nodes,
                opts.pods_per_node,
                opts.backend,
                opts.network,
                opts.underlay_mtu,
                tuple(opts.agent_arg),
                tuple(d for d in opts.datapath.split(",") if d),
                opts.rp_filter,
                opts.prometheus,
                opts.etcd_tls,
                opts.etcd_members,
                opts.flanneld_nodes,
                tuple(opts.flanneld_arg),
                kube=opts.kube,
                ipv6_network=opts.ipv6_network,
                ipv4=not opts.ipv6_only,
            )
            lab.up(spec)
            print(lab.format_status(lab.status(opts.name)))
        elif opts.action == "status":
            info = lab.status(opts.name)
            print(json.dumps(info, indent=2) if opts.output == "json" else lab.format_status(info))
        elif opts.action == "restart":
            sig = signal.SIGKILL if opts.kill else signal.SIGTERM
            pid = lab.restart_agent(opts.name, opts.node, sig, ready_timeout=60)
            print(f"agent on {opts.node} restarted and ready: pid {pid}")
        elif opts.action == "etcd":
            if opts.operation == "start":
                pid = lab.start_etcd_member(opts.name, opts.member, wait=False)
                print(f"etcd member {opts.member} started: pid {pid}")
            else:
                sig = signal.SIGKILL if opts.operation == "kill" else signal.SIGTERM
                lab.stop_etcd_member(opts.name, opts.member, sig)
                print(f"etcd member {opts.member} stopped")
        elif opts.action == "attach-pods":
            if not 0 <= opts.count <= 20:
                raise lab.LabError("--count must be 0..20")
            try:
                conflist = cni.load_conflist(opts.cni_conf)
            except cni.CniError as exc:
                raise lab.LabError(str(exc)) from None
            for i in range(1, opts.count + 1):
                pod = f"{opts.prefix}{i}"
                print(f"{pod} {lab.attach_pod(None, pod, conflist)}")
        elif opts.action == "exec":
            command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
            return lab.exec_in_pod(opts.name, opts.pod, command)
        else:
            lab.down(opts.name)
    except lab.LabError as exc:
        print(f"flannel-bpf lab: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_vagrant(args: list[str]) -> int:
    from flannel_bpf.lab import vagrant
    from flannel_bpf.lab.netns import CommandError

    parser = argparse.ArgumentParser(
        prog="flannel-bpf vagrant",
        description="the Vagrant lab (vagrant/Vagrantfile) on libvirt, run from this machine: "
        "libvirtd, its networks and every vagrant command live in a network namespace of their own",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="build or reuse the box, boot etcd and the workers")
    p_up.add_argument("--workers", type=int, default=3)
    sub.add_parser("status", help="each worker's agent: data path, decap hook, lease, peers")
    p_ssh = sub.add_parser("ssh", help="a shell (or a command, as root) on a VM: ssh NODE [-- CMD]")
    p_ssh.add_argument("node")
    p_ssh.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("down", help="vagrant destroy, then everything the lab added to libvirt")
    opts = _parse(parser, args)
    if isinstance(opts, int):
        return opts
    try:
        if opts.action == "up":
            if not 1 <= opts.workers <= 20:
                raise vagrant.VagrantLabError("--workers must be 1..20")
            lab = vagrant.lab_up(opts.workers, lambda text: print(text, flush=True))
            print(
                f"\nthe lab is up: etcd at 198.18.100.10, workers {', '.join(lab.nodes)} at "
                f"198.18.100.11..{10 + lab.workers}\n"
                "  flannel-bpf vagrant status\n"
                "  flannel-bpf vagrant ssh node1 -- flannel-bpf stats\n"
                "  flannel-bpf vagrant ssh node1 -- ip netns exec pod1 ping 10.244.X.2\n"
                "  flannel-bpf vagrant down"
            )
        elif opts.action == "status":
            lab = vagrant.load()
            for node in lab.nodes:
                proc = lab.ssh(node, "flannel-bpf status --no-etcd-probe", check=False)
                print(f"== {node}\n{proc.stdout or proc.stderr}")
        elif opts.action == "ssh":
            lab = vagrant.load()
            command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
            return lab.interactive_ssh(opts.node, command)
        else:
            removed = vagrant.lab_down()
            print("the Vagrant lab is gone" + (f" ({', '.join(removed)})" if removed else ""))
    except CommandError as exc:  # VagrantLabError, or a command of the lab failing
        print(f"flannel-bpf vagrant: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def _run_until_signalled(agent: Agent) -> int:
    """SIGTERM and SIGINT end the agent cleanly with status 0, the lease left in place."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    run = asyncio.create_task(agent.run(), name="agent")

    def stop(signum: int) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        run.cancel()
        # A second signal gets the default action, as with flanneld.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await run
    except asyncio.CancelledError:
        if main_task.cancelling():
            raise
        return EXIT_OK
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)


if __name__ == "__main__":
    sys.exit(main())
