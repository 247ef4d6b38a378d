"""The agent's HTTP endpoints: /metrics, and /healthz and /readyz with flanneld's answers.

A deliberately small HTTP/1.1 server on asyncio (GET and HEAD, one request per connection):
the agent needs three fixed paths, not a web framework. Scrapes are built in a worker thread
because they read BPF maps and netlink; the event loop keeps serving etcd and lease events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address

log = logging.getLogger(__name__)

# flanneld's bodies (main.go), so probes written for flanneld match ours.
HEALTHZ_BODY = b"flanneld is running"
READY_BODY = b"flanneld is ready"
NOT_READY_BODY = b"flanneld is not ready yet"

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 10.0
SHUTDOWN_GRACE = 3.0  # flanneld gives its healthz server 3 s

Response = tuple[int, str, bytes]
Handler = Callable[[], Awaitable[Response]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class EndpointError(Exception):
    """The address cannot be parsed or bound; the message names the flag."""


def parse_listen_address(text: str, flag: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or :PORT (all addresses), as Go's net.Listen takes it."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise EndpointError(f"{flag} {text!r}: want HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise EndpointError(f"{flag} {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise EndpointError(f"{flag} {text!r}: port must be 1..65535")
    try:
        ip_address(host)
    except ValueError:
        raise EndpointError(f"{flag} {text!r}: {host!r} is not an IP address") from None
    return host, port


def text_response(status: int, body: bytes) -> Response:
    return status, "text/plain; charset=utf-8", body


@dataclass
class HTTPEndpoint:
    """One listening socket serving a fixed set of GET paths."""

    name: str  # for the log: "metrics" or "healthz"
    host: str
    port: int
    routes: Mapping[str, Handler]
    _server: asyncio.Server | None = field(default=None, init=False)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.port, reuse_address=True
            )
        except OSError as exc:
            raise EndpointError(
                f"cannot listen on {self.host}:{self.port} for {self.name}: {exc.strerror or exc}"
            ) from None
        sock = self._server.sockets[0].getsockname()
        self.port = int(sock[1])
        log.info("serving %s on http://%s:%d%s", self.name, self.host, self.port, _paths(self))

    async def stop(self) -> None:
        """Stop accepting, give requests in flight the grace period, then cut them."""
        if self._server is None:
            return
        self._server.close()
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=SHUTDOWN_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), SHUTDOWN_GRACE)
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except TimeoutError:
            await _send(writer, "GET", text_response(408, b"request timeout\n"))
            return
        except asyncio.LimitOverrunError:
            await _send(writer, "GET", text_response(431, b"request head too large\n"))
            return
        if len(head) > MAX_REQUEST_BYTES:
            await _send(writer, "GET", text_response(431, b"request head too large\n"))
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _send(writer, "GET", text_response(400, b"bad request\n"))
            return
        method, target, _ = parts
        path = target.split("?", 1)[0]
        handler = self.routes.get(path)
        if handler is None:
            response = text_response(404, f"not found; try {_paths(self).strip()}\n".encode())
        elif method not in ("GET", "HEAD"):
            response = text_response(405, b"only GET and HEAD\n")
        else:
            try:
                response = await handler()
            except Exception as exc:  # a scrape must never take the agent down
                log.error("%s %s failed: %s", method, path, exc, exc_info=True)
                response = text_response(500, f"{type(exc).__name__}: {exc}\n".encode())
        await _send(writer, method, response)


def _paths(endpoint: HTTPEndpoint) -> str:
    return " (" + ", ".join(sorted(endpoint.routes)) + ")"


async def _send(writer: asyncio.StreamWriter, method: str, response: Response) -> None:
    status, content_type, body = response
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
    await writer.drain()
