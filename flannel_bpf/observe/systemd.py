"""systemd's notify protocol (sd_notify(3)) without libsystemd: READY, STATUS, STOPPING, WATCHDOG.

Under a `Type=notify` unit systemd passes NOTIFY_SOCKET (and WATCHDOG_USEC with `WatchdogSec=`);
anywhere else the notifier is disabled and every call does nothing. A failed send is logged once
and never ends the agent: losing a status line is better than losing the network.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass
class SystemdNotifier:
    address: str | None = None  # NOTIFY_SOCKET: a path, or "@name" in the abstract namespace
    watchdog_interval: float | None = None  # seconds between WATCHDOG=1 (half of WATCHDOG_USEC)
    _warned: bool = field(default=False, init=False, repr=False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> SystemdNotifier:
        address = environ.get("NOTIFY_SOCKET") or None
        interval = None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is for: a child inheriting it is not.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            interval = int(usec) / 1e6 / 2
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str) -> bool:
        """Send KEY=value lines in one datagram; False when not under systemd or it failed."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall(message)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY="1", STATUS=status)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def stopping(self, status: str = "shutting down") -> bool:
        return self.notify(STOPPING="1", STATUS=status)

    async def keep_watchdog(self) -> None:
        """WATCHDOG=1 every half period while the event loop runs. A loop stuck for a whole
        period gets the agent restarted; the data path carries on meanwhile (it is pinned)."""
        if self.address is None or self.watchdog_interval is None:
            return
        while True:
            self.notify(WATCHDOG="1")
            await asyncio.sleep(self.watchdog_interval)
