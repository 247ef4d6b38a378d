"""Benchmarks: scripts that measure the data path and write bench/results/."""

from __future__ import annotations

import signal


def unwind_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, so a killed benchmark still runs its cleanup (labs,
    namespaces, etcd) instead of leaving them behind."""

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
