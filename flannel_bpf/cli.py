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

from . import __version__
from .agent import Agent, AgentError
from .flags import FlagError, HelpRequested, parse_run_args, run_usage
from .logs import setup_logging

log = logging.getLogger("flannel_bpf")

USAGE = """\
usage: flannel-bpf COMMAND [ARGS]

commands:
  run [FLAGS]     run the agent (flanneld's flags and FLANNELD_* environment; run -h lists them)
  status [--status-file PATH] [-o json]
                  the running agent: data path and why, lease, BPF hooks, remotes, counters
  cleanup [--bpffs PATH]
                  detach and unpin this namespace's BPF data path (a normal stop leaves it)
  lab up|status|exec|down
                  a multi-node lab on network namespaces (lab -h for its options)
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
        "cleanup": cmd_cleanup,
        "lab": cmd_lab,
        "bench": cmd_bench,
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
    try:
        status = asyncio.run(_run_until_signalled(Agent(options)))
    except AgentError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    log.info("Exiting cleanly...")
    return status


def cmd_status(args: list[str]) -> int:
    from .status import StatusError, collect, format_status

    parser = argparse.ArgumentParser(prog="flannel-bpf status", description="agent status")
    parser.add_argument("--status-file", default="/run/flannel-bpf/status.json")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    try:
        opts = parser.parse_args(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        info = collect(Path(opts.status_file))
    except StatusError as exc:
        print(f"flannel-bpf status: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(info, indent=2) if opts.output == "json" else format_status(info))
    return EXIT_OK if info.get("running") else EXIT_FAILURE


def cmd_cleanup(args: list[str]) -> int:
    from . import loader

    parser = argparse.ArgumentParser(
        prog="flannel-bpf cleanup",
        description="detach every flannel-bpf program in this network namespace and remove its "
        "pinned maps; also unpins maps of namespaces that no longer exist",
    )
    parser.add_argument("--bpffs", default=str(loader.DEFAULT_BPFFS))
    try:
        opts = parser.parse_args(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    root = Path(opts.bpffs)
    done: list[str] = []
    try:
        for pin_dir in loader.instance_dirs(root):
            done += loader.cleanup(pin_dir)
        done += loader.remove_orphans(root)
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

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "__main__.py").is_file():
        print(f"flannel-bpf bench: no bench/ next to {root / 'flannel_bpf'}; run it from a "
              "source checkout", file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=root).returncode


def cmd_lab(args: list[str]) -> int:
    from .lab import lab

    parser = argparse.ArgumentParser(prog="flannel-bpf lab", description="namespace lab")
    parser.add_argument("--name", default="fblab", help="lab name, prefix of its namespaces")
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="build the lab (tears down an earlier one of that name)")
    p_up.add_argument("--nodes", type=int, default=3)
    p_up.add_argument("--pods-per-node", type=int, default=1)
    p_up.add_argument("--backend", default="vxlan")
    p_up.add_argument("--network", default="10.244.0.0/16")
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
    p_status = sub.add_parser("status", help="nodes and pods")
    p_status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p_exec = sub.add_parser("exec", help="run a command in a pod or node: exec POD -- CMD")
    p_exec.add_argument("pod")
    p_exec.add_argument("command", nargs=argparse.REMAINDER)
    p_restart = sub.add_parser("restart", help="restart a node's agent (--kill: SIGKILL it)")
    p_restart.add_argument("node")
    p_restart.add_argument("--kill", action="store_true")
    sub.add_parser("down", help="remove everything the lab made")
    try:
        opts = parser.parse_args(args)
    except SystemExit as exc:
        return int(exc.code or 0)
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
            )
            lab.up(spec)
            print(lab.format_status(lab.status(opts.name)))
        elif opts.action == "status":
            info = lab.status(opts.name)
            print(json.dumps(info, indent=2) if opts.output == "json" else lab.format_status(info))
        elif opts.action == "restart":
            sig = signal.SIGKILL if opts.kill else signal.SIGTERM
            pid = lab.restart_agent(opts.name, opts.node, sig)
            print(f"agent on {opts.node} restarted: pid {pid}")
        elif opts.action == "exec":
            command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
            return lab.exec_in_pod(opts.name, opts.pod, command)
        else:
            lab.down(opts.name)
    except lab.LabError as exc:
        print(f"flannel-bpf lab: {exc}", file=sys.stderr)
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
