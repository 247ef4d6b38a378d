"""A `flannel-bpf run` process (or a real flanneld) inside a namespace, as the lab and the tests
start it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flannel_bpf.lab.netns import in_netns
from flannel_bpf.lab.proc import stop_process


class AgentStillRunning(subprocess.TimeoutExpired):
    """wait() ran out of time; the message ends with the agent's log."""

    def __init__(self, cmd: Sequence[str], timeout: float, log: str) -> None:
        super().__init__(list(cmd), timeout)
        self.log = log

    def __str__(self) -> str:
        return f"agent still running after {self.timeout} s; the end of its log:\n{self.log}"


FLANNEL_BPF = "flannel-bpf"
FLANNELD = "flanneld"
PROGRAMS = (FLANNEL_BPF, FLANNELD)


@dataclass
class AgentProcess:
    netns: str | None
    args: Sequence[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    # flannel-bpf, or flanneld: the real one (lab/peers.py), which takes the same flags.
    program: str = FLANNEL_BPF
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def command(self) -> list[str]:
        if self.program == FLANNELD:
            from flannel_bpf.lab.peers import flanneld_binary

            return in_netns(self.netns, [flanneld_binary(), *self.args])
        return in_netns(self.netns, [sys.executable, "-m", "flannel_bpf", "run", *self.args])

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            # Where it hangs is in its log, which goes with the test's temporary directory.
            raise AgentStillRunning(exc.cmd, timeout, self.log()[-4000:]) from None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL for the whole session if it does not go."""
        return stop_process(self.process, signal.SIGTERM, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if not self.running():
                raise AssertionError(f"agent exited waiting for {text!r}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in agent log after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
