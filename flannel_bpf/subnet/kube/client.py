"""The few Kubernetes API calls a node agent makes, on asyncio streams.

flanneld's kube subnet manager needs: get a Pod (to learn its node), get a Node, patch a Node's
status subresource (annotations and the NetworkUnavailable condition, as flanneld does), and list
and watch every Node. Full client libraries cost 10 to 45 MB of resident memory for that
(docs/decisions.md section 6, measured); this is HTTP/1.1 over one keep-alive TLS connection for
the unary calls and one connection per watch, with kubeconfig files (client certificates, bearer
tokens, CA) and in-cluster service-account credentials, the way client-go's
BuildConfigFromFlags picks between them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from flannel_bpf.subnet.manager import ManagerUnavailable

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
JSON = "application/json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
USER_AGENT = "flannel-bpf"
# Node objects carry image lists and conditions (10-20 KB each on real clusters): the initial
# list is paged so that it never holds more than a page of raw JSON at once.
LIST_PAGE = 250
MAX_HEADER_LINES = 200


class KubeError(Exception):
    """An API answer other than success; status 0 for no answer at all."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message


class KubeUnavailable(KubeError, ManagerUnavailable):
    """No connection, TLS failure, timeout or a broken response: worth retrying."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


class ResourceExpired(KubeError):
    """410 Gone: the resourceVersion to resume from is older than the API server keeps."""


class KubeConfigError(Exception):
    """The kubeconfig or in-cluster credentials are unusable; the message is for the operator."""


@dataclass
class ClusterAccess:
    """Where the API server is and how to prove who we are."""

    server: str  # scheme://host:port, no trailing slash
    ssl_context: ssl.SSLContext | None = None
    token: str = ""
    # Service-account tokens are rotated by the kubelet: read the file for every request.
    token_file: str = ""
    source: str = ""  # for the log: which kubeconfig, or "in-cluster"

    def authorization(self) -> str:
        token = self.token
        if self.token_file:
            with contextlib.suppress(OSError):
                token = Path(self.token_file).read_text().strip()
        return f"Bearer {token}" if token else ""


def resolve_access(api_url: str, kubeconfig: str, environ: Mapping[str, str]) -> ClusterAccess:
    """client-go's BuildConfigFromFlags as flanneld calls it: a kubeconfig file (its server
    replaced by --kube-api-url when given), or --kube-api-url alone, or, with neither, the
    in-cluster service account. $KUBECONFIG and ~/.kube/config are not read, as in flanneld."""
    if kubeconfig:
        return load_kubeconfig(Path(kubeconfig), api_url)
    if api_url:
        tls = _context() if api_url.startswith("https") else None
        return ClusterAccess(api_url.rstrip("/"), tls, source=api_url)
    return in_cluster(environ)


def in_cluster(environ: Mapping[str, str], directory: Path = SERVICE_ACCOUNT_DIR) -> ClusterAccess:
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConfigError(
            "unable to load in-cluster configuration, KUBERNETES_SERVICE_HOST and "
            "KUBERNETES_SERVICE_PORT must be defined (or give --kubeconfig-file or --kube-api-url)"
        )
    token_file = directory / "token"
    if not token_file.is_file():
        raise KubeConfigError(f"in-cluster configuration: no service account token at {token_file}")
    ca = directory / "ca.crt"
    host = f"[{host}]" if ":" in host else host
    return ClusterAccess(
        f"https://{host}:{port}",
        _context(cafile=str(ca) if ca.is_file() else None),
        token_file=str(token_file),
        source="in-cluster service account",
    )


def load_kubeconfig(path: Path, server_override: str = "") -> ClusterAccess:
    """The current context of a kubeconfig file (YAML or JSON)."""
    import yaml  # only kube mode reads YAML; the etcd-mode agent never imports it

    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise KubeConfigError(f"kubeconfig {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise KubeConfigError(f"kubeconfig {path} is not a kubeconfig document")

    def named(section: str, name: str, field: str) -> dict[str, Any]:
        for entry in doc.get(section) or []:
            if isinstance(entry, dict) and entry.get("name") == name:
                value = entry.get(field) or {}
                if isinstance(value, dict):
                    return value
        raise KubeConfigError(f"kubeconfig {path}: no {field} named {name!r} in {section}")

    current = doc.get("current-context")
    if not isinstance(current, str) or not current:
        raise KubeConfigError(f"kubeconfig {path} has no current-context")
    context = named("contexts", current, "context")
    cluster = named("clusters", str(context.get("cluster", "")), "cluster")
    user = named("users", str(context["user"]), "user") if context.get("user") else {}
    base = path.parent

    def file(value: object) -> str | None:
        if not value:
            return None
        p = Path(str(value))
        return str(p if p.is_absolute() else base / p)

    server = server_override or str(cluster.get("server") or "")
    if not server:
        raise KubeConfigError(
            f"kubeconfig {path}: cluster {context.get('cluster')!r} has no server"
        )
    tls = None
    if server.startswith("https"):
        try:
            tls = _context(
                cafile=file(cluster.get("certificate-authority")),
                cadata=cluster.get("certificate-authority-data"),
                certfile=file(user.get("client-certificate")),
                keyfile=file(user.get("client-key")),
                certdata=user.get("client-certificate-data"),
                keydata=user.get("client-key-data"),
                insecure=bool(cluster.get("insecure-skip-tls-verify")),
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise KubeConfigError(f"kubeconfig {path}: TLS material unusable: {exc}") from None
    return ClusterAccess(
        server.rstrip("/"),
        tls,
        token=str(user.get("token") or ""),
        token_file=file(user.get("tokenFile")) or "",
        source=str(path),
    )


def _context(
    cafile: str | None = None,
    cadata: object = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    certdata: object = None,
    keydata: object = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    ca_text = base64.b64decode(str(cadata)).decode() if cadata else None
    ctx = ssl.create_default_context(cafile=cafile, cadata=ca_text)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certdata and keydata:
        # load_cert_chain reads files only: a private temporary file, removed at once.
        fd, tmp = tempfile.mkstemp(prefix="fb-kube-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(base64.b64decode(str(certdata)) + b"\n" + base64.b64decode(str(keydata)))
            ctx.load_cert_chain(tmp)
        finally:
            os.unlink(tmp)
    elif certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: dict[str, Any]


@dataclass(frozen=True)
class NodePage:
    items: list[dict[str, Any]]
    resource_version: str
    next: str  # the continue token; "" on the last page


class KubeClient:
    def __init__(self, access: ClusterAccess, timeout: float = 15.0) -> None:
        self.access = access
        self.timeout = timeout
        url = urlsplit(access.server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise KubeConfigError(f"API server URL {access.server!r} is not http(s)://host[:port]")
        self._tls = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._tls else 80)
        self._netloc = url.netloc
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    # -- the calls ---------------------------------------------------------------------------

    async def get_node(self, name: str) -> dict[str, Any]:
        return await self.request("GET", f"/api/v1/nodes/{quote(name, safe='')}")

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        return await self.request("GET", path)

    async def patch_node_status(self, name: str, patch: bytes) -> dict[str, Any]:
        """A strategic merge patch of nodes/NAME/status: flanneld writes its annotations and the
        NetworkUnavailable condition this way, which is why its RBAC grants only that."""
        path = f"/api/v1/nodes/{quote(name, safe='')}/status"
        return await self.request("PATCH", path, body=patch, content_type=STRATEGIC_MERGE_PATCH)

    async def list_nodes(
        self, continue_token: str = "", limit: int = LIST_PAGE, field_selector: str = ""
    ) -> NodePage:
        query = {"limit": str(limit)}
        if continue_token:
            query["continue"] = continue_token
        if field_selector:
            query["fieldSelector"] = field_selector
        doc = await self.request("GET", "/api/v1/nodes", query)
        meta = doc.get("metadata") or {}
        items = doc.get("items") or []
        return NodePage(
            [i for i in items if isinstance(i, dict)],
            str(meta.get("resourceVersion") or ""),
            str(meta.get("continue") or ""),
        )

    async def watch_nodes(
        self, resource_version: str, timeout_seconds: int = 300, field_selector: str = ""
    ) -> AsyncIterator[WatchEvent]:
        """Node events after resource_version, until the server ends the watch (timeout_seconds)
        or the connection breaks (KubeUnavailable). ResourceExpired when that version is gone."""
        query = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_seconds),
        }
        if field_selector:
            query["fieldSelector"] = field_selector
        reader, writer = await self._open()
        try:
            writer.write(self._request_bytes("GET", "/api/v1/nodes?" + urlencode(query)))
            await writer.drain()
            status, headers = await asyncio.wait_for(_read_head(reader), self.timeout)
            if status >= 300:
                raise _error(status, await _read_body(reader, headers))
            chunks = _body_chunks(reader, headers)
            buffer = b""
            deadline = timeout_seconds + self.timeout
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), deadline)
                except StopAsyncIteration:
                    return
                buffer += chunk
                while (newline := buffer.find(b"\n")) >= 0:
                    line, buffer = buffer[:newline], buffer[newline + 1 :]
                    if line.strip():
                        yield _watch_event(line)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            raise KubeUnavailable(f"node watch broken: {exc or type(exc).__name__}") from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- HTTP --------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = JSON,
    ) -> dict[str, Any]:
        if query:
            path += "?" + urlencode(query)
        async with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None:
                        self._conn = await self._open()
                    reader, writer = self._conn
                    writer.write(self._request_bytes(method, path, body, content_type))
                    await writer.drain()
                    status, headers = await asyncio.wait_for(_read_head(reader), self.timeout)
                    data = await asyncio.wait_for(_read_body(reader, headers), self.timeout)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    self._drop()
                    # A kept-alive connection the server closed fails the first try only.
                    if attempt == 2 or isinstance(exc, TimeoutError):
                        raise KubeUnavailable(
                            f"{method} {path.split('?')[0]}: {exc or type(exc).__name__}"
                        ) from None
                    continue
                if headers.get("connection", "").lower() == "close":
                    self._drop()
                break
        if status >= 300:
            raise _error(status, data)
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            raise KubeUnavailable(f"{method} {path}: answer is not JSON") from None
        if not isinstance(doc, dict):
            raise KubeUnavailable(f"{method} {path}: answer is not a JSON object")
        return doc

    async def close(self) -> None:
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    self._host,
                    self._port,
                    ssl=self.access.ssl_context if self._tls else None,
                    server_hostname=self._host if self._tls else None,
                    limit=1 << 20,
                ),
                self.timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise KubeUnavailable(
                f"cannot connect to {self.access.server}: {exc or type(exc).__name__}"
            ) from None

    def _request_bytes(
        self, method: str, path: str, body: bytes | None = None, content_type: str = JSON
    ) -> bytes:
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self._netloc}",
            f"User-Agent: {USER_AGENT}",
            "Accept: application/json",
        ]
        if auth := self.access.authorization():
            lines.append(f"Authorization: {auth}")
        if body is not None:
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return int(parts[1]), headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raise ValueError("too many response headers")


async def _body_chunks(
    reader: asyncio.StreamReader, headers: Mapping[str, str]
) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while chunk := await reader.read(1 << 16):
            yield chunk


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    return b"".join([chunk async for chunk in _body_chunks(reader, headers)])


def _error(status: int, data: bytes) -> KubeError:
    message, reason = data.decode(errors="replace")[:500], ""
    with contextlib.suppress(ValueError):
        doc = json.loads(data)
        if isinstance(doc, dict):
            message = str(doc.get("message") or message)
            reason = str(doc.get("reason") or "")
    if status == 410:
        return ResourceExpired(status, message, reason or "Gone")
    return KubeError(status, message, reason)


def _watch_event(line: bytes) -> WatchEvent:
    doc = json.loads(line)
    if not isinstance(doc, dict) or not isinstance(doc.get("object"), dict):
        raise ValueError("watch event is not {type, object}")
    kind, obj = str(doc.get("type")), doc["object"]
    if kind == "ERROR":
        code = int(obj.get("code") or 500)
        message, reason = str(obj.get("message") or ""), str(obj.get("reason") or "")
        if code == 410:
            raise ResourceExpired(code, message, reason or "Expired")
        raise KubeError(code, message, reason)
    return WatchEvent(kind, obj)
