"""rtnetlink in batches: the fixed neighbour, FDB and route requests a vxlan network sends,
packed by hand and written many to a send().

pyroute2 spends ~190 us of Python per request (request filters, NLA encoding, the ack's
parse) against ~25 us in the kernel, so thousands of peers cost seconds of CPU whether the
requests are awaited one by one or pipelined on one socket. These few fixed messages are
packed directly instead, byte for byte what pyroute2 sends for the same call (the tests
compare them), and written many to a send(); the kernel still handles and acknowledges each
on its own, in order. What remains is mostly the kernel's route insert, which walks every
route's fib_info sharing our device and protocol (its hash leaves the gateway out): ~60 us a
route at 5,000, the same for any client writing these routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import NamedTuple

NUD_NONE = 0x00
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_USE = 0x01
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
RT_TABLE_MAIN = 254
# vishvananda/netlink's default, so `ip route` shows our routes exactly as flanneld's.
RTPROT_BOOT = 3

AF_BRIDGE = 7
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
SO_RCVBUFFORCE = 33
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLM_REQUEST = NLM_F_REQUEST | NLM_F_ACK
NLM_REPLACE = NLM_REQUEST | NLM_F_REPLACE | NLM_F_CREATE
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
RTN_UNICAST = 1
RTM_NEWNEXTHOP = 104
NHA_ID, NHA_OIF, NHA_GATEWAY = 1, 5, 6
RTA_NH_ID = 30

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src len, tos, table, proto, scope, type, flags
_NHMSG = struct.Struct("=BBBxI")  # family, scope, protocol, flags
_NLATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_ERROR = struct.Struct("=i")

# Receive-buffer cost (skb truesize) per request, measured on 6.x: an ack takes ~832 bytes, a
# route lookup's answer plus its ack ~1,700. A window's answers must fit: the kernel handles a
# send() before it returns and drops the answers that find the buffer full (ENOBUFS).
ACK_BUFFER = 1024
LOOKUP_BUFFER = 2048
RCVBUF = 1 << 20
MAX_WINDOW = 512
REPLY_TIMEOUT = 5.0  # only a kernel that stopped answering waits this long


class NlRequest(NamedTuple):
    type: int
    flags: int
    body: bytes  # after the netlink header, which is added at send time (it holds the seq)


class NlReply:
    """One request's outcome: the errno of its ack (0: done) and anything answered before it."""

    __slots__ = ("error", "messages")

    def __init__(self) -> None:
        self.error = 0
        self.messages: list[tuple[int, bytes]] = []  # (type, payload after the header)


def _nlattr(kind: int, payload: bytes) -> bytes:
    size = _NLATTR.size + len(payload)
    return _NLATTR.pack(size, kind) + payload + bytes(-size % 4)


def _has_attr(payload: bytes, offset: int, kind: int) -> bool:
    """Whether the attributes from offset on include kind (at the top level)."""
    while offset + _NLATTR.size <= len(payload):
        size, found = _NLATTR.unpack_from(payload, offset)
        if size < _NLATTR.size:
            break
        if found & NLA_TYPE_MASK == kind:
            return True
        offset += (size + 3) & ~3
    return False


def _family(address: IPv4Address | IPv6Address) -> int:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def neigh_request(add: bool, ifindex: int, dst: IPv4Address | IPv6Address, mac: str) -> NlRequest:
    """ip neigh replace|del <dst> lladdr <mac> dev <ifindex> nud permanent (either family)."""
    body = (
        _NDMSG.pack(_family(dst), ifindex, NUD_PERMANENT, 0, 0)
        + _nlattr(NDA_DST, dst.packed)
        + _nlattr(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))
    )
    return (
        NlRequest(RTM_NEWNEIGH, NLM_REPLACE, body)
        if add
        else NlRequest(RTM_DELNEIGH, NLM_REQUEST, body)
    )


def fdb_request(add: bool, ifindex: int, mac: str, dst: IPv4Address | IPv6Address) -> NlRequest:
    """bridge fdb replace|del <mac> dev <ifindex> dst <dst> self permanent."""
    body = (
        _NDMSG.pack(AF_BRIDGE, ifindex, NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0)
        + _nlattr(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))
        + _nlattr(NDA_DST, dst.packed)
    )
    return (
        NlRequest(RTM_NEWNEIGH, NLM_REPLACE, body)
        if add
        else NlRequest(RTM_DELNEIGH, NLM_REQUEST, body)
    )


def route_request(
    add: bool,
    dst: IPv4Network | IPv6Network,
    gateway: IPv4Address | IPv6Address,
    oif: int | None = None,
) -> NlRequest:
    """ip route replace <dst> via <gateway> [dev <oif> onlink] proto boot (table main), or del.

    With oif the gateway is on-link on that device: the tunnel route via the peer's subnet.0.
    Either family (dst and gateway of the same one).
    """
    header = _RTMSG.pack(
        _family(gateway),
        dst.prefixlen,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT if add else 0,
        0,  # RT_SCOPE_UNIVERSE
        RTN_UNICAST if add else 0,
        RTNH_F_ONLINK if oif is not None else 0,
    )
    attrs = _nlattr(RTA_DST, dst.network_address.packed) + _nlattr(RTA_GATEWAY, gateway.packed)
    if oif is not None:
        attrs += _nlattr(RTA_OIF, _U32.pack(oif))
    body = header + attrs + _nlattr(RTA_TABLE, _U32.pack(RT_TABLE_MAIN))
    return (
        NlRequest(RTM_NEWROUTE, NLM_REPLACE, body)
        if add
        else NlRequest(RTM_DELROUTE, NLM_REQUEST, body)
    )


def nexthop_request(nexthop_id: int, gateway: IPv4Address, oif: int) -> NlRequest:
    """ip nexthop replace id <nexthop_id> via <gateway> dev <oif> onlink proto boot.

    Not what the agent writes (it keeps flanneld's routes): the control-plane benchmark times
    it as the alternative whose routes the kernel inserts in constant time.
    """
    body = (
        _NHMSG.pack(socket.AF_INET, 0, RTPROT_BOOT, RTNH_F_ONLINK)
        + _nlattr(NHA_ID, _U32.pack(nexthop_id))
        + _nlattr(NHA_OIF, _U32.pack(oif))
        + _nlattr(NHA_GATEWAY, gateway.packed)
    )
    return NlRequest(RTM_NEWNEXTHOP, NLM_REPLACE, body)


def route_by_nexthop_request(dst: IPv4Network, nexthop_id: int) -> NlRequest:
    """ip route replace <dst> nhid <nexthop_id> proto boot (table main); see nexthop_request."""
    header = _RTMSG.pack(
        socket.AF_INET, dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0, RTN_UNICAST, 0
    )
    attrs = _nlattr(RTA_DST, dst.network_address.packed) + _nlattr(RTA_NH_ID, _U32.pack(nexthop_id))
    return NlRequest(RTM_NEWROUTE, NLM_REPLACE, header + attrs)


def route_get_request(dst: IPv4Address | IPv6Address) -> NlRequest:
    """ip route get <dst>."""
    header = _RTMSG.pack(_family(dst), dst.max_prefixlen, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0)
    return NlRequest(RTM_GETROUTE, NLM_REQUEST, header + _nlattr(RTA_DST, dst.packed))


def neigh_use_request(ifindex: int, dst: IPv4Address) -> NlRequest:
    """ip neigh replace <dst> dev <ifindex> nud none use: have the kernel resolve dst now (the
    entry is made when missing, as an ordinary one the garbage collector may take)."""
    body = _NDMSG.pack(socket.AF_INET, ifindex, NUD_NONE, NTF_USE, 0) + _nlattr(NDA_DST, dst.packed)
    return NlRequest(RTM_NEWNEIGH, NLM_REPLACE, body)


def route_next_hop(reply: NlReply) -> tuple[int, IPv4Address | None] | None:
    """For a route_get_request's reply: (output ifindex, gateway or None), or None."""
    for kind, payload in reply.messages:
        if kind != RTM_NEWROUTE:
            continue
        oif, gateway = 0, None
        offset = _RTMSG.size
        while offset + _NLATTR.size <= len(payload):
            size, found = _NLATTR.unpack_from(payload, offset)
            if size < _NLATTR.size:
                break
            value = payload[offset + _NLATTR.size : offset + size]
            if found & NLA_TYPE_MASK == RTA_OIF and len(value) == 4:
                oif = _U32.unpack(value)[0]
            elif found & NLA_TYPE_MASK == RTA_GATEWAY and len(value) == 4:
                gateway = IPv4Address(value)
            offset += (size + 3) & ~3
        return (oif, gateway) if oif else None
    return None


def one_route_without_gateway(reply: NlReply) -> bool:
    """For a route_get_request's reply: exactly one route, and it has no gateway."""
    routes = [payload for kind, payload in reply.messages if kind == RTM_NEWROUTE]
    return len(routes) == 1 and not _has_attr(routes[0], _RTMSG.size, RTA_GATEWAY)


class RtnlBatch:
    """A NETLINK_ROUTE socket that sends requests a window at a time and matches the answers
    to them by sequence number.

    The kernel handles a window in order, inside the send(), so a request later in a window
    always finds the earlier ones applied; callers that must see a result before sending the
    next request (the route after its neighbour) put them in separate :meth:`run` calls.
    """

    def __init__(self, max_window: int = MAX_WINDOW) -> None:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                # Errors acknowledged without a copy of the request (kernels since 4.3); ours
                # are under 64 bytes, so an ack fits ACK_BUFFER either way.
                sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            try:
                # Above net.core.rmem_max, which only root (CAP_NET_ADMIN) may do.
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, 0))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self._max_window = max(1, max_window)
        self._seq = 0

    async def __aenter__(self) -> RtnlBatch:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def window(self, reply_buffer: int) -> int:
        """Requests per send(): half the receive buffer holds all their answers."""
        return max(1, min(self._max_window, self._rcvbuf // 2 // reply_buffer))

    async def run(
        self, requests: Sequence[NlRequest], reply_buffer: int = ACK_BUFFER
    ) -> list[NlReply]:
        """Each request's reply, in order. Never raises for a request: socket errors become
        that request's errno, which the caller may retry."""
        replies = [NlReply() for _ in requests]
        window = self.window(reply_buffer)
        for start in range(0, len(requests), window):
            if start:
                await asyncio.sleep(0)  # let the lease keeper and watcher in between windows
            waiting: dict[int, NlReply] = {}
            parts: list[bytes] = []
            for index in range(start, min(start + window, len(requests))):
                request = requests[index]
                self._seq = self._seq % 0xFFFFFFFF + 1
                waiting[self._seq] = replies[index]
                parts.append(
                    _NLMSGHDR.pack(
                        _NLMSGHDR.size + len(request.body),
                        request.type,
                        request.flags,
                        self._seq,
                        0,
                    )
                )
                parts.append(request.body)
            try:
                self._sock.send(b"".join(parts))
            except OSError as exc:
                self._fail(waiting, exc.errno or errno.EIO)
                continue
            await self._collect(waiting)
        return replies

    async def _collect(self, waiting: dict[int, NlReply]) -> None:
        loop = asyncio.get_running_loop()
        while waiting:
            try:
                try:
                    # The answers are queued by the time send() returns: read without waiting.
                    data = self._sock.recv(65536)
                except BlockingIOError:
                    data = await asyncio.wait_for(loop.sock_recv(self._sock, 65536), REPLY_TIMEOUT)
            except TimeoutError:
                self._fail(waiting, errno.ETIMEDOUT)
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Some answers were dropped for lack of room. The kernel handled the whole
                    # window inside send(), so what is still queued is all that will come.
                    self._drain(waiting)
                self._fail(waiting, exc.errno or errno.EIO)
                return
            self._parse(data, waiting)

    def _drain(self, waiting: dict[int, NlReply]) -> None:
        while waiting:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            self._parse(data, waiting)

    @staticmethod
    def _parse(data: bytes, waiting: dict[int, NlReply]) -> None:
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, seq, _port = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                break
            # Answers to a window given up on (timeout) carry sequence numbers no longer waited.
            reply = waiting.get(seq)
            if reply is not None:
                if kind == NLMSG_ERROR:
                    reply.error = -_ERROR.unpack_from(data, offset + _NLMSGHDR.size)[0]
                    del waiting[seq]
                else:
                    reply.messages.append((kind, data[offset + _NLMSGHDR.size : offset + length]))
            offset += (length + 3) & ~3

    @staticmethod
    def _fail(waiting: dict[int, NlReply], code: int) -> None:
        for reply in waiting.values():
            reply.error = code
        waiting.clear()
