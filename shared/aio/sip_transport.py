"""SIP over UDP and TCP on one port: the trio adapter between sockets and the message layer.

This module owns the server side of RFC 3261 §18 for one (host, port): a UDP socket and a TCP
listener bound to the same port, reading datagrams and stream segments, framing them
(`SipStreamFramer`), parsing and validating them, stamping the top Via of requests with
`received` / `rport` (RFC 3261 §18.2.1, RFC 3581 §4), answering malformed requests at once when
they can be answered, answering RFC 5626 §4.4.1 CRLF pings over TCP, and handing every good
message to one handler through a bounded queue. It also owns the one send path: to an address
over UDP from the listening socket (so NAT bindings phones opened towards us are reused) or
over an existing TCP connection, turning transport failures into `SipTransportError`.

It does not own transactions, dialogs or any policy: the handler gets `(message, Source)` and
decides. It never opens outbound TCP connections (a phone behind NAT could not be reached that
way anyway); a response whose connection is gone fails with `SipTransportError`. It binds IP
literals only and does no DNS: responses go to `received` / `rport`, which we always set when
sent-by is a name.

Choices worth knowing:
- UDP keepalives (a datagram of only CRLFs or NULs, as many phones send; RFC 5626 §4.4.2 would
  use STUN over UDP) are counted and not answered: the phone sent them to keep its NAT binding
  open, which receiving them already did, and some phones log an unexpected CRLF as garbage.
- STUN Binding requests on the UDP port (RFC 5626 §4.4.2 / §8: how outbound-capable phones
  keep a UDP flow alive, told apart from SIP by their first two bits and the magic cookie) are
  answered with XOR-MAPPED-ADDRESS; other STUN datagrams are dropped.
- The UDP receive loop never waits for the handler (STYLE.md, trio `_dtls.py`): when the queue
  is full the datagram is dropped and counted, as the network could have dropped it; the
  client's retransmission (RFC 3261 §17.1.1.2) recovers. TCP readers do wait: TCP has its own
  flow control, and a stream cannot lose a message without losing its framing.
- UDP goes through a plain non-blocking socket, not trio's socket wrapper: the receive loop
  reads every datagram that is ready (up to `UDP_BATCH`, then it lets the handlers run) and
  waits for readability only when the socket is empty, and a send is one `sendto` that waits
  for writability only when the kernel says so. Trio's wrapper yields to the scheduler twice
  per call, which cost more CPU than parsing the message (bench/run.py, REGISTER profile).
- A handler exception is logged and counted, not raised: one bad message must not stop a PBX.
- Bound to a wildcard address (Linux), each datagram's own local address is read (IP_PKTINFO)
  into `Source.local` and replies leave from it, so multi-homed hosts stay symmetric.
- A malformed request whose top Via cannot be read still gets its error reply when it has the
  headers a reply copies; it goes straight back to the packet's source, the only address known.

It is longer than most modules (about 900 lines) because its pure half (Via stamping, response
routing, reading untrusted bytes into a message or an error reply, STUN keepalive replies) sits
above the sockets it serves; that half imports no trio and could move to `shared.sip` whole.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import trio

from shared.sip.errors import SipParseError, bad_request
from shared.sip.framing import (
    KEEPALIVE_PONG,
    KeepAlivePing,
    KeepAlivePong,
    SipStreamFramer,
    is_datagram_keepalive,
)
from shared.sip.headers import Via, split_comma_untrusted
from shared.sip.message import (
    DEFAULT_LIMITS,
    SipLimits,
    SipMessage,
    SipRequest,
    SipResponse,
    error_response,
    generate_tag,
    parse_message_untrusted,
    validate_request_untrusted,
    validate_response_untrusted,
)
from shared.stun.message import (
    BINDING,
    MAGIC_COOKIE,
    StunClass,
    StunMessage,
    StunParseError,
    TransportAddress,
    XorMappedAddress,
)
from shared.stun.message import parse_message_untrusted as parse_stun_untrusted

Address = tuple[str, int]
TransportName = Literal["udp", "tcp"]
Handler = Callable[[SipMessage, "Source"], Awaitable[None]]

DEFAULT_SIP_PORT = 5060
RECEIVE_SIZE = 65536  # a UDP datagram's maximum, so recvfrom never truncates one
UDP_BATCH = 16
"""Datagrams read in one go before the receive loop lets other tasks run, and messages a
handler task takes in one go: both bound how long the media anchor, which shares the trio
thread, waits during a burst of SIP (16 REGISTERs are about 5 ms of work)."""
TCP_BACKLOG = 128
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# Linux packet info: on a wildcard bind, which local address a datagram came to, and which one
# a reply leaves from (RFC 3581 §4: a response must come from the address the request went to,
# or the phone's NAT drops it). Python 3.11 lacks the IPv4 name; 8 is its Linux value.
_IP_PKTINFO: int | None = getattr(socket, "IP_PKTINFO", 8 if sys.platform == "linux" else None)
_IPV6_RECVPKTINFO: int | None = getattr(socket, "IPV6_RECVPKTINFO", None)
_IPV6_PKTINFO: int | None = getattr(socket, "IPV6_PKTINFO", None)
_ANCILLARY_SIZE = 64  # room for one in_pktinfo (12 octets) or in6_pktinfo (20) and headers
_LOG = logging.getLogger(__name__)


class SipTransportError(Exception):
    """Sending failed (socket error, connection gone, peer not reading); the message says how."""


@dataclass(frozen=True, slots=True)
class SipTransportOptions:
    """How the transport bounds its resources. Frozen; the defaults suit an office PBX."""

    queue_size: int = 256
    """Messages waiting for the handler. When full, UDP datagrams are dropped (counted) and
    TCP readers wait."""
    handler_tasks: int = 1
    """Handler calls that may run at once. 1 keeps arrival order; more lets a slow handler
    (a database write) overlap, in any order."""
    max_tcp_connections: int = 1024
    """Open TCP connections at most; beyond it new ones are closed at once (counted)."""
    tcp_idle_timeout: float = 300.0
    """Seconds without traffic either way before a TCP connection is closed (RFC 3261 §18
    lets a server close idle connections). Above the 120 s a RFC 5626 §4.4.1 client pings at."""
    tcp_message_timeout: float = 30.0
    """Seconds from the first octet of a message to its last over TCP: a peer that trickles
    bytes to hold a connection (slowloris) is disconnected."""
    send_timeout: float = 10.0
    """Seconds a TCP peer may take to accept our bytes before its connection is closed."""
    force_rport: bool = False
    """Treat every request as if its top Via carried an empty `rport` (RFC 3581), so responses
    go back to the source port even for clients behind NAT that do not ask (Kamailio's
    `force_rport`). Off by default: RFC 3261 §18.2.2 sends to the sent-by port."""
    supported_extensions: frozenset[str] = frozenset()
    """Option tags accepted in Require; a request requiring others is answered 420 by the
    transport (RFC 3261 §8.2.2.3). The layer above says which it implements."""
    bind_attempts: int = 8
    """For port 0: how many UDP ports to try before giving up finding one whose TCP twin is
    free."""


DEFAULT_OPTIONS = SipTransportOptions()


@dataclass(slots=True)
class SipTransportStatistics:
    """Counters since the transport started; `statistics()` returns a snapshot."""

    datagrams_received: int = 0
    """UDP datagrams read from the socket, whatever they held."""
    received: int = 0
    """Messages (UDP and TCP) queued for the handler."""
    dropped_full: int = 0
    """UDP messages dropped because the handler's queue was full."""
    dropped_malformed: int = 0
    """Malformed messages dropped unanswered: responses, garbage, unanswerable requests."""
    answered_malformed: int = 0
    """Malformed requests answered with an error status by the transport."""
    keepalives: int = 0
    """UDP keepalive datagrams, STUN Binding requests and TCP CRLF pings received."""
    sent: int = 0
    """Messages and pongs sent."""
    send_errors: int = 0
    """Sends that failed (`SipTransportError`)."""
    handler_errors: int = 0
    """Handler calls that raised."""
    tcp_connections: int = 0
    """TCP connections open now."""
    tcp_accepted: int = 0
    """TCP connections accepted since the start."""
    tcp_refused: int = 0
    """TCP connections closed at once because `max_tcp_connections` were open."""
    tcp_closed_idle: int = 0
    """TCP connections closed for idleness or for trickling a message too slowly."""
    tcp_closed_junk: int = 0
    """TCP connections closed because the peer sent something that is not SIP."""
    tcp_closed_send_failed: int = 0
    """TCP connections closed because a send to the peer failed or timed out."""


@dataclass(frozen=True, slots=True)
class Destination:
    """Where to send: an address over UDP, or over TCP (preferably on `connection`)."""

    transport: TransportName
    address: Address
    connection: TcpConnection | None = None
    local_ip: str | None = None
    """UDP on a wildcard bind: the local address to send from (the one the request came to);
    None lets the kernel choose."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where a received message came from, and the way back to it."""

    transport: TransportName
    remote: Address
    """The packet's source (ip, port): what `received` / `rport` were filled with."""
    local: Address
    """The local (ip, port) it arrived on; on a wildcard bind the real address where the
    system tells it (Linux), else the wildcard."""
    connection: TcpConnection | None = None
    """The TCP connection it came over, to send responses back on (RFC 3261 §18.2.2)."""
    endpoint: SipTransport | None = field(default=None, repr=False, compare=False)
    """The transport that received it, so a handler can answer without a global."""

    @property
    def destination(self) -> Destination:
        """Straight back to the source (same connection for TCP, from the same address for
        UDP), ignoring any Via."""
        return Destination(self.transport, self.remote, self.connection, self.local[0])

    async def reply(self, response: SipResponse) -> None:
        """Send a response to the request that came from here (see `send_response`)."""
        if self.endpoint is None:
            raise SipTransportError("this source has no transport to reply through")
        await self.endpoint.send_response(response, self)


@dataclass(frozen=True, slots=True)
class Inbound:
    """What `read_message_untrusted` made of some bytes: a message for the handler, or an
    error with perhaps a reply the transport sends at once."""

    message: SipMessage | None = None
    reply: SipResponse | None = None
    error: SipParseError | None = None
    is_sip: bool = False
    """The bytes were a SIP message (start line, headers, a SIP version), perhaps an invalid
    one: over TCP the peer speaks SIP and keeps its connection."""


# ---------------------------------------------------------------------------------------------
# The pure part: bytes in, message or reply out. No sockets, testable alone.


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    found = _IP_MEMO.get(text, _NOT_SEEN)
    if found is not _NOT_SEEN:
        return found  # type: ignore[return-value]
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
            text.strip("[]")
        )
    except ValueError:
        ip = None
    if len(text) > _IP_MEMO_MAX_TEXT:
        # Not an address we will see again (no IP literal is this long): a Via host name
        # from the network, which must not pin memory.
        return ip
    if len(_IP_MEMO) >= _IP_MEMO_SIZE:
        # Addresses come from the network: bounded, and cheap to start over.
        _IP_MEMO.clear()
    _IP_MEMO[text] = ip
    return ip


# Parsing an address costs more than the rest of a UDP send; the same few phones' and our own
# addresses come back on every message.
_IP_MEMO: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None] = {}
_IP_MEMO_SIZE = 4096
_IP_MEMO_MAX_TEXT = 64  # the longest IPv6 literal, bracketed with a scope, fits
_NOT_SEEN = object()


def top_via_untrusted(message: SipMessage) -> Via:
    """The top Via alone. `message.vias` parses every Via, and a request that failed
    validation (so its error reply, which copies them) may have a broken lower one; routing a
    reply needs only the top one (RFC 3261 §18.2.2), which `message.top_via` parses alone (and
    a response made by `make_response` has already)."""
    return message.top_via


def stamp_top_via_untrusted(
    request: SipRequest, remote: Address, *, force_rport: bool = False
) -> Via:
    """Add `received` and fill `rport` in the request's top Via; return the new top Via.

    RFC 3261 §18.2.1: `received` when the sent-by host is a name or an address other than the
    packet's source. RFC 3581 §4: when the Via has `rport`, set it to the source port and add
    `received` even if it equals sent-by. A client must send `rport` empty; one with a value is
    overwritten too, so that responses never go anywhere but to the packet's source. Headers
    are untouched (received bytes kept) when nothing changes. Raises `SipParseError` (400) for
    a missing or malformed top Via.
    """
    top = request.top_via  # parsed once, by validation as a rule
    source_ip, source_port = remote
    params: dict[str, str | None] = {}
    if "rport" in top.params or force_rport:
        params["rport"] = str(source_port)
        params["received"] = source_ip
    elif _ip(top.host) != _ip(source_ip) or _ip(top.host) is None:
        params["received"] = source_ip
    if all(top.params.get(k, "") == v for k, v in params.items()):
        return top
    new_top = top.with_params(**params)
    headers = request.headers
    elements = split_comma_untrusted(headers.get_all("Via")[0])
    elements[0] = str(new_top)
    try:
        # Only the Via views are dropped from the parsed-header cache; the new top Via is
        # known, not parsed again.
        headers.replace_first("Via", ", ".join(elements))
    except ValueError:
        # Cannot happen for parsed headers (names are tokens, values have no CR/LF); if it
        # ever did, it is the message's fault.
        raise bad_request("Unserializable header") from None
    headers.cached("via:top", lambda: new_top)
    return new_top


def read_message_untrusted(
    data: bytes,
    remote: Address,
    *,
    limits: SipLimits = DEFAULT_LIMITS,
    options: SipTransportOptions = DEFAULT_OPTIONS,
) -> Inbound:
    """Parse and validate one whole message from `remote`; never raises.

    A good request comes back with its top Via stamped (`stamp_top_via_untrusted`); a good
    response as parsed. A bad request gets `reply` set when it can be answered: it is not an
    ACK (RFC 3261 §17.1.1.3: an ACK is never answered) and it has Via, From, To, Call-ID and
    CSeq to copy (RFC 3261 §8.2.6.2); `reply_destination` says where the reply goes. A bad
    response is dropped (RFC 3261 §18.1.2).
    """
    message: SipMessage | None = None
    try:
        message = parse_message_untrusted(data, limits)
        if isinstance(message, SipResponse):
            validate_response_untrusted(message)
        else:
            validate_request_untrusted(
                message, limits=limits, supported_extensions=options.supported_extensions
            )
            stamp_top_via_untrusted(message, remote, force_rport=options.force_rport)
    except SipParseError as exc:
        read = message if message is not None else exc.request
        is_sip = read is not None and read.version.upper().startswith("SIP/")
        return Inbound(reply=_error_reply(exc, remote, options), error=exc, is_sip=is_sip)
    return Inbound(message=message, is_sip=True)


def _error_reply(
    exc: SipParseError, remote: Address, options: SipTransportOptions
) -> SipResponse | None:
    request = exc.request
    if request is None or request.method == "ACK":
        return None
    if any(name not in request.headers for name in ("Via", "From", "To", "Call-ID", "CSeq")):
        return None
    try:
        stamp_top_via_untrusted(request, remote, force_rport=options.force_rport)
    except SipParseError:
        # A top Via we cannot read (RFC 4475 §3.1.2.1 still wants a 400): it is copied as it
        # came and the reply goes straight back to the packet's source (`reply_destination`).
        pass
    return error_response(exc, to_tag=generate_tag())


def reply_destination(reply: SipResponse, source: Source) -> Destination:
    """Where the transport sends its own error reply: routed by the top Via like any response
    (`response_destination`), or, when that Via cannot be read, straight back to the source,
    the only address we know (never a third party's)."""
    try:
        via = top_via_untrusted(reply)
    except SipParseError:
        return source.destination
    try:
        return response_destination(via, source)
    except SipTransportError:
        return source.destination


def is_stun(data: bytes) -> bool:
    """RFC 5626 §8.4 / RFC 7983: a STUN message starts with two zero bits and carries the
    magic cookie at octet 4; a SIP message starts with a letter (or CRLF)."""
    return len(data) >= 20 and data[0] < 4 and data[4:8] == MAGIC_COOKIE.to_bytes(4, "big")


def stun_reply_untrusted(data: bytes, remote: Address) -> bytes | None:
    """The answer to a STUN keepalive on the SIP port, or None to drop the datagram.

    RFC 5626 §4.4.2 / §8.4: a Binding request is answered with a success response carrying
    the source as XOR-MAPPED-ADDRESS (RFC 5389 §7.3.1), with FINGERPRINT when the request had
    one. No authentication: the flow keepalive needs none. Indications, responses, other
    methods and classic RFC 3489 requests get nothing. Never raises.
    """
    try:
        request = parse_stun_untrusted(data)
        if request.cls is not StunClass.REQUEST or request.method != BINDING:
            return None
        if request.is_rfc3489:
            return None
        mapped = XorMappedAddress(TransportAddress(remote[0], remote[1]))
    except (StunParseError, ValueError):
        return None
    reply = StunMessage(
        BINDING, StunClass.SUCCESS, request.transaction_id, (mapped,), request.fingerprint
    )
    return reply.encode()


def response_destination(via: Via, source: Source) -> Destination:
    """Where a response whose top Via is `via` goes, for a request that came from `source`.

    RFC 3261 §18.2.2: over TCP on the request's connection (`SipTransport.send` falls back to
    another open connection from the same address). Over UDP, RFC 3581 §4: to `received` and
    `rport` when the Via has both; else to `received` and the sent-by port (5060 if none);
    else to sent-by, which must then be an IP address (we do no DNS). `maddr` (multicast) is
    not supported and ignored.
    """
    if source.transport == "tcp":
        return Destination("tcp", source.remote, source.connection)
    received = via.received
    rport = via.params.get("rport")
    port = via.port or DEFAULT_SIP_PORT
    local_ip = source.local[0]
    if received is not None:
        if rport and rport.isdigit():
            port = int(rport)
        return Destination("udp", (received.strip("[]"), port), local_ip=local_ip)
    if _ip(via.host) is None:
        raise SipTransportError(f"cannot route a response to the name {via.host!r}")
    return Destination("udp", (via.host.strip("[]"), port), local_ip=local_ip)


# ---------------------------------------------------------------------------------------------
# The I/O part.


def _address(sockaddr: object) -> Address:
    """(ip, port) of a socket address; IPv6 scope ids (`%eth0`) are dropped."""
    assert isinstance(sockaddr, tuple)
    host = str(sockaddr[0]).partition("%")[0]
    return host, int(sockaddr[1])


def _enable_packet_info(udp: socket.socket) -> bool:
    """Ask for the local address of every datagram; False where the system cannot."""
    try:
        if udp.family == socket.AF_INET and _IP_PKTINFO is not None:
            udp.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        elif udp.family == socket.AF_INET6 and _IPV6_RECVPKTINFO is not None:
            udp.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
        else:
            return False
    except OSError:
        return False
    return True


def _local_ip_of(ancillary: list[tuple[int, int, bytes]]) -> str | None:
    """The destination address of a datagram from its IP_PKTINFO / IPV6_PKTINFO."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo { int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr; }
            return socket.inet_ntop(socket.AF_INET, data[8:12])
        if level == socket.IPPROTO_IPV6 and kind == _IPV6_PKTINFO and len(data) >= 16:
            # struct in6_pktinfo { in6_addr ipi6_addr; int ipi6_ifindex; }
            return socket.inet_ntop(socket.AF_INET6, data[:16])
    return None


def _source_address_option(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[tuple[int, int, bytes]]:
    """The ancillary data that makes the kernel send from `ip`."""
    if ip.version == 4 and _IP_PKTINFO is not None:
        return [(socket.IPPROTO_IP, _IP_PKTINFO, struct.pack("=I4s4s", 0, ip.packed, bytes(4)))]
    if ip.version == 6 and _IPV6_PKTINFO is not None:
        return [(socket.IPPROTO_IPV6, _IPV6_PKTINFO, ip.packed + struct.pack("=I", 0))]
    return []


class TcpConnection:
    """One accepted TCP connection. Its reader belongs to the transport; any task may `send`.

    Closed by the transport when the peer closes, idles, sends junk or stops reading.
    """

    def __init__(
        self, stream: trio.SocketStream, remote: Address, local: Address, send_timeout: float
    ) -> None:
        self.remote = remote
        self.local = local
        self._stream = stream
        self._send_timeout = send_timeout
        self._send_lock = trio.Lock()
        self._closed = False
        self.last_activity = trio.current_time()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TcpConnection {self.remote[0]}:{self.remote[1]} {state}>"

    @property
    def is_open(self) -> bool:
        return not self._closed

    async def send(self, data: bytes) -> None:
        """Send bytes; a failure or a peer that does not read within `send_timeout` closes
        the connection and raises `SipTransportError`."""
        if self._closed:
            raise SipTransportError(f"TCP connection to {_show(self.remote)} is closed")
        async with self._send_lock:
            with trio.move_on_after(self._send_timeout) as scope:
                try:
                    await self._stream.send_all(data)
                except _TRANSPORT_ERRORS as exc:
                    await self.aclose()
                    raise SipTransportError(
                        f"TCP send to {_show(self.remote)} failed: {exc or type(exc).__name__}"
                    ) from None
            if scope.cancelled_caught:
                await self.aclose()
                raise SipTransportError(f"TCP send to {_show(self.remote)} timed out")
        self.last_activity = trio.current_time()

    async def aclose(self) -> None:
        """Close at once (the reader sees the close and ends). Never raises."""
        self._closed = True
        await trio.aclose_forcefully(self._stream)


def _show(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SipTransport:
    """The running transport of one port: sending, connections and statistics.

    Created by `serve_sip_transports`, which reports it through `task_status`.
    """

    def __init__(
        self,
        udp: socket.socket,
        address: Address,
        queue: trio.MemorySendChannel[tuple[SipMessage, Source]],
        limits: SipLimits,
        options: SipTransportOptions,
        log: logging.Logger,
        *,
        packet_info: bool = False,
    ) -> None:
        self.address = address
        """The bound (host, port), the same for UDP and TCP."""
        self._udp = udp
        """Non-blocking; used directly, with trio.lowlevel.wait_readable / wait_writable."""
        self._udp_send_lock = trio.Lock()  # one task at a time may wait for writability
        self._packet_info = packet_info
        self._queue = queue
        self._limits = limits
        self._options = options
        self._log = log
        self._stats = SipTransportStatistics()
        self._connections: dict[Address, TcpConnection] = {}
        self._closed = False

    def statistics(self) -> SipTransportStatistics:
        """A snapshot of the counters."""
        return replace(self._stats, tcp_connections=len(self._connections))

    def connection_to(self, address: Address) -> TcpConnection | None:
        """The open TCP connection from `address`, if any."""
        connection = self._connections.get(address)
        return connection if connection is not None and connection.is_open else None

    async def send(self, data: bytes, destination: Destination) -> None:
        """Send one message (or keepalive) to `destination`.

        UDP goes from the listening socket, so a phone's NAT binding towards us is reused
        (RFC 3581 §4 symmetric response). TCP goes on `destination.connection` if it is still
        open, else on an open connection from `destination.address`; we never open one.
        Raises `SipTransportError`.
        """
        try:
            if self._closed:
                raise SipTransportError("the SIP transport is closed")
            if destination.transport == "udp":
                await self._send_udp(data, destination.address, destination.local_ip)
            else:
                connection = destination.connection
                if connection is None or not connection.is_open:
                    connection = self.connection_to(destination.address)
                if connection is None:
                    raise SipTransportError(
                        f"no open TCP connection to {_show(destination.address)}"
                    )
                was_open = connection.is_open
                try:
                    await connection.send(data)
                except SipTransportError:
                    if was_open and not connection.is_open:
                        self._stats.tcp_closed_send_failed += 1
                    raise
        except SipTransportError:
            self._stats.send_errors += 1
            raise
        self._stats.sent += 1

    async def send_message(self, message: SipMessage, destination: Destination) -> None:
        await self.send(message.encode(), destination)

    async def send_response(self, response: SipResponse, source: Source) -> None:
        """Send a response to the request that came from `source`, routed by the response's
        top Via as RFC 3261 §18.2.2 and RFC 3581 §4 say (see `response_destination`)."""
        try:
            via = top_via_untrusted(response)
        except SipParseError as exc:
            self._stats.send_errors += 1
            raise SipTransportError(f"cannot route a response: {exc.reason}") from None
        await self.send(response.encode(), response_destination(via, source))

    async def _send_udp(self, data: bytes, address: Address, local_ip: str | None) -> None:
        host, port = address
        ip = _ip(host)
        if ip is None or not 0 < port < 65536:
            raise SipTransportError(f"not an IP address and port: {host!r} {port!r}")
        if (ip.version == 6) != (self._udp.family == socket.AF_INET6):
            raise SipTransportError(f"cannot reach {_show(address)} from {_show(self.address)}")
        local = _ip(local_ip) if local_ip is not None and self._packet_info else None
        udp = self._udp
        target = (ip.compressed, port)
        try:
            while True:
                try:
                    if local is None or local.is_unspecified or local.version != ip.version:
                        udp.sendto(data, target)
                    else:
                        udp.sendmsg([data], _source_address_option(local), 0, target)
                    return
                except BlockingIOError:
                    # The send buffer is full: wait until it drains (one waiter per socket).
                    async with self._udp_send_lock:
                        if self._closed:
                            raise trio.ClosedResourceError from None
                        await trio.lowlevel.wait_writable(udp)
        except OSError as exc:
            raise SipTransportError(f"UDP send to {_show(address)} failed: {exc}") from None
        except trio.ClosedResourceError:
            # The transport stopped while we waited for room (serve_sip_transports).
            raise SipTransportError("the SIP transport is closed") from None

    # -- UDP -----------------------------------------------------------------------------------

    async def _receive_udp(self) -> None:
        udp = self._udp
        stats = self._stats
        bound_ip, port = self.address
        packet_info = self._packet_info
        batch = 0
        while True:
            local_ip = bound_ip
            if batch >= UDP_BATCH:
                # Let the handlers work off what was queued (and notice cancellation). Twice:
                # trio runs the tasks that are ready in random order, so after one yield this
                # loop may run again before a handler woken by this batch; after the second,
                # every task that was ready has had its turn.
                batch = 0
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()
            try:
                if packet_info:
                    data, ancillary, _, sockaddr = udp.recvmsg(RECEIVE_SIZE, _ANCILLARY_SIZE)
                    local_ip = _local_ip_of(ancillary) or bound_ip
                else:
                    data, sockaddr = udp.recvfrom(RECEIVE_SIZE)
            except BlockingIOError:
                batch = 0
                await trio.lowlevel.wait_readable(udp)
                continue
            except (ConnectionResetError, ConnectionRefusedError):
                # An ICMP error for an earlier send, reported here by some systems.
                continue
            batch += 1
            stats.datagrams_received += 1
            remote = _address(sockaddr)
            if is_datagram_keepalive(data):
                stats.keepalives += 1
                continue
            source = Source("udp", remote, (local_ip, port), None, self)
            if is_stun(data):
                await self._answer_stun(data, source)
                continue
            inbound = read_message_untrusted(
                data, remote, limits=self._limits, options=self._options
            )
            if inbound.message is None:
                await self._refuse(inbound, source)
                continue
            try:
                # Never wait for the handler here (module docstring).
                self._queue.send_nowait((inbound.message, source))
            except trio.WouldBlock:
                stats.dropped_full += 1
            else:
                stats.received += 1

    async def _answer_stun(self, data: bytes, source: Source) -> None:
        reply = stun_reply_untrusted(data, source.remote)
        if reply is None:
            self._stats.dropped_malformed += 1
            return
        self._stats.keepalives += 1
        try:
            await self.send(reply, source.destination)
        except SipTransportError as exc:
            self._log.debug("could not answer a STUN keepalive: %s", exc)

    async def _refuse(self, inbound: Inbound, source: Source) -> bool:
        """Answer a malformed request if it can be; return whether it was answered."""
        reply = inbound.reply
        if reply is None:
            self._stats.dropped_malformed += 1
            return False
        self._stats.answered_malformed += 1
        try:
            await self.send(reply.encode(), reply_destination(reply, source))
        except SipTransportError as exc:
            self._log.debug("could not answer a malformed request: %s", exc)
        return True

    # -- TCP -----------------------------------------------------------------------------------

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        stats = self._stats
        if len(self._connections) >= self._options.max_tcp_connections:
            stats.tcp_refused += 1
            await trio.aclose_forcefully(stream)
            return
        try:
            remote = _address(stream.socket.getpeername())
            local = _address(stream.socket.getsockname())
        except OSError:
            # Gone before we looked at it.
            await trio.aclose_forcefully(stream)
            return
        connection = TcpConnection(stream, remote, local, self._options.send_timeout)
        self._connections[remote] = connection
        stats.tcp_accepted += 1
        try:
            await self._read_tcp(connection, stream)
        finally:
            if self._connections.get(remote) is connection:
                del self._connections[remote]
            with trio.CancelScope(shield=True):
                await connection.aclose()

    async def _read_tcp(self, connection: TcpConnection, stream: trio.SocketStream) -> None:
        options = self._options
        stats = self._stats
        framer = SipStreamFramer(self._limits)
        source = Source("tcp", connection.remote, connection.local, connection, self)
        message_started: float | None = None
        while connection.is_open:
            deadline = connection.last_activity + options.tcp_idle_timeout
            if message_started is not None:
                deadline = min(deadline, message_started + options.tcp_message_timeout)
            with trio.move_on_at(deadline) as scope:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except _TRANSPORT_ERRORS:
                    return
            if scope.cancelled_caught:
                now = trio.current_time()
                if (
                    message_started is not None
                    and now >= message_started + options.tcp_message_timeout
                ) or now >= connection.last_activity + options.tcp_idle_timeout:
                    stats.tcp_closed_idle += 1
                    return
                continue  # we sent something meanwhile: not idle
            connection.last_activity = trio.current_time()
            completed = framer.messages_received
            framer.receive_data(data)
            if not await self._drain_framer(framer, source):
                return
            if not data:
                return  # the peer closed its side
            # A lone CRLF (up to a half ping) is held by the framer and is no message yet; a
            # message begun in the segment that completed another gets its own full time.
            if framer.buffered > len(b"\r\n\r\n"):
                if message_started is None or framer.messages_received != completed:
                    message_started = connection.last_activity
            else:
                message_started = None

    async def _drain_framer(self, framer: SipStreamFramer, source: Source) -> bool:
        """Handle every complete message and keepalive; False (counted) when the connection
        must close."""
        stats = self._stats
        connection = source.connection
        assert connection is not None
        while True:
            try:
                event = framer.next_message()
            except SipParseError as exc:
                # RFC 3261 §18.3: the stream cannot be resynchronised; answer if we can, close.
                reply = _error_reply(exc, source.remote, self._options)
                await self._refuse(Inbound(reply=reply, error=exc), source)
                stats.tcp_closed_junk += 1
                return False
            if event is None:
                return True
            if isinstance(event, KeepAlivePing):
                # RFC 5626 §4.4.1: a CRLFCRLF ping is answered with one CRLF.
                stats.keepalives += 1
                try:
                    await self.send(KEEPALIVE_PONG, source.destination)
                except SipTransportError:
                    return False  # counted by send()
                continue
            if isinstance(event, KeepAlivePong):
                continue
            inbound = read_message_untrusted(
                event, source.remote, limits=self._limits, options=self._options
            )
            if inbound.message is None:
                # Framed, so still in sync: answer (or drop) it and go on, unless it was not
                # SIP at all: then the peer is disconnected.
                await self._refuse(inbound, source)
                if not inbound.is_sip:
                    stats.tcp_closed_junk += 1
                    return False
                continue
            # TCP waits for room in the queue (module docstring).
            await self._queue.send((inbound.message, source))
            stats.received += 1

    # -- handler -------------------------------------------------------------------------------

    async def _run_handler(
        self, handler: Handler, queue: trio.MemoryReceiveChannel[tuple[SipMessage, Source]]
    ) -> None:
        async with queue:
            async for item in queue:
                await self._handle(handler, item)
                # Then what else is queued, up to UDP_BATCH in all, without a trip through the
                # scheduler per message (a memory channel's receive yields even when it has
                # items): as many as the receive loop queues per turn, so the queue does not
                # grow while the handler keeps up, and no more, so other tasks get their turn.
                for _ in range(UDP_BATCH - 1):
                    try:
                        item = queue.receive_nowait()
                    except trio.WouldBlock:
                        break
                    await self._handle(handler, item)

    async def _handle(self, handler: Handler, item: tuple[SipMessage, Source]) -> None:
        message, source = item
        try:
            await handler(message, source)
        except Exception:
            self._stats.handler_errors += 1
            self._log.exception("SIP handler failed on a message from %s", _show(source.remote))

    def _close(self) -> None:
        self._closed = True
        for connection in list(self._connections.values()):
            connection._closed = True


def _family(host: str) -> socket.AddressFamily:
    ip = _ip(host)
    if ip is None:
        raise ValueError(f"SIP transports bind IP addresses only, not {host!r}")
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _udp_socket(family: socket.AddressFamily) -> socket.socket:
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.setblocking(False)
    return udp


async def _bind(
    host: str, port: int, attempts: int
) -> tuple[socket.socket, trio.socket.SocketType]:
    """A non-blocking UDP socket and a listening TCP socket on the same port. For port 0 UDP
    picks it, and another is tried when TCP finds it taken. `host` is an IP literal, so binding
    never resolves a name and does not block."""
    family = _family(host)
    for _ in range(max(1, attempts)):
        udp = _udp_socket(family)
        tcp = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                # One family per socket pair: an IPv4-mapped source would need mapping back.
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Restarting must not wait for the old TCP connections' TIME_WAIT.
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp.bind((host, port))
            bound_port = _address(udp.getsockname())[1]
            try:
                await tcp.bind((host, bound_port))
            except OSError as exc:
                if port != 0 or exc.errno != errno.EADDRINUSE:
                    raise
                udp.close()
                tcp.close()
                continue
            tcp.listen(TCP_BACKLOG)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        return udp, tcp
    raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host} in {attempts}")


async def serve_sip_transports(
    host: str,
    port: int,
    handler: Handler,
    *,
    limits: SipLimits = DEFAULT_LIMITS,
    options: SipTransportOptions = DEFAULT_OPTIONS,
    log: logging.Logger = _LOG,
    task_status: trio.TaskStatus[tuple[Address, SipTransport]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve SIP over UDP and TCP on `host`:`port` (an IP literal; port 0 picks one free for
    both) until cancelled; report `((host, port), transport)` through `task_status`.

    Every good message is passed to `handler(message, source)`; see the module docstring for
    what the transport answers itself and what it drops.
    """
    udp, tcp = await _bind(host, port, options.bind_attempts)
    address = _address(udp.getsockname())
    wildcard = ipaddress.ip_address(host).is_unspecified
    packet_info = wildcard and _enable_packet_info(udp)
    send_queue, receive_queue = trio.open_memory_channel[tuple[SipMessage, Source]](
        max(0, options.queue_size)
    )
    transport = SipTransport(
        udp, address, send_queue, limits, options, log, packet_info=packet_info
    )
    try:
        async with trio.open_nursery() as nursery:
            async with receive_queue:
                for _ in range(max(1, options.handler_tasks)):
                    nursery.start_soon(transport._run_handler, handler, receive_queue.clone())
            nursery.start_soon(transport._receive_udp)
            nursery.start_soon(
                partial(
                    trio.serve_listeners,
                    transport._serve_tcp,
                    [trio.SocketListener(tcp)],
                    handler_nursery=nursery,
                )
            )
            task_status.started((address, transport))
    finally:
        transport._close()
        # A plain socket: a sender waiting for room on it must be woken (ClosedResourceError)
        # before the descriptor goes, or it would wait for ever.
        trio.lowlevel.notify_closing(udp)
        udp.close()
        tcp.close()
