"""Run every benchmark in one go, then write docs/benchmarks.md: ``python -m bench [--quick]``.

Each benchmark builds what it measures (namespace labs, an etcd, agents), runs, tears it down and
saves bench/results/<name>.json; the report is written from whatever results exist.
"""

from __future__ import annotations

import argparse
import functools
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("prog_cost", "control_plane", "datapath", "datapath-v6only", "profile")
# How each is run: its module and arguments (datapath-v6only: the IPv6-only labs, apart).
COMMANDS = {name: [f"bench.{name}"] for name in BENCHMARKS} | {
    "datapath-v6only": ["bench.datapath", "--ipv6-only"]
}
QUICK_ARGS = {
    "prog_cost": ["--runs", "3000"],
    "control_plane": ["--leases", "1000", "--agents", "10"],
    "datapath": ["--rounds", "1", "--seconds", "2", "--mtu", "1500"],
    "datapath-v6only": ["--rounds", "1", "--seconds", "2", "--mtu", "1500"],
    "profile": ["--seconds", "2", "--paths", "flanneld-vxlan", "bpf-host-routing"],
}


def _forward(child: subprocess.Popen[bytes], signum: int, _frame: object) -> None:
    child.send_signal(signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flannel-bpf bench", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument(
        "--quick", action="store_true", help="smaller runs, to check that everything works"
    )
    opts = parser.parse_args(argv)
    failed = []
    for name in opts.only:
        extra = QUICK_ARGS[name] if opts.quick else []
        print(f"== bench {name} {' '.join(extra)}", flush=True)
        start = time.monotonic()
        # Separate processes: a benchmark's state (bcc, labs, etcd) never leaks into the next.
        proc = subprocess.Popen([sys.executable, "-m", *COMMANDS[name], *extra], cwd=ROOT)
        # A SIGTERM goes on to the benchmark, which tears down what it built before it exits.
        previous = signal.signal(signal.SIGTERM, functools.partial(_forward, proc))
        try:
            returncode = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        print(f"== bench {name}: exit {returncode} in {time.monotonic() - start:.0f} s")
        if returncode == 130:
            return 130
        if returncode != 0:
            failed.append(name)
    from bench import report

    print(f"wrote {report.write()}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
