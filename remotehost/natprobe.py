"""What a remote host learns about its own network: LAN interfaces, public address, NAT type.

This module owns three probes, all aimed at the main host's own STUN service and never at a
public one (F1, F9):

- `lan_interfaces()`: the branch office side, read from the kernel through `netifaces`.
- `probe_nat_type()`: the RFC 3489 classification (open, full cone, restricted, port
  restricted, symmetric) by pystun3, which is blocking code, so it runs in a worker thread under
  a trio deadline. It needs the main host to have a second IP (`mainhost.stun`).
- `stun_binding()`: one RFC 5389 Binding transaction with retransmission, optionally over the
  remote host's own UDP socket, so it doubles as a keepalive that notices a new public address.
  The timing lives in `BindingTransaction`, a sans-I/O object, and the trio code only moves bytes.

It does not own what to do with the answers (the remote host's login and keepalive logic), the
STUN codec (`shared.stun.message`) or the server.

pystun3 2.0 workarounds, all in the NAT-type section below:
- it falls back to public servers when given no host, so an empty host is refused before it;
- it reports the mapped address of the *last* test, which is empty for restricted NATs, so the
  first mapped address is read from the replies here instead;
- it retransmits for ever when it receives a response it does not expect, and it cannot be
  cancelled, so it gets a socket wrapper that stops it at the deadline or on cancellation;
- "Open Internet" needs the source IP it is told to equal the mapped IP, so the socket is bound
  to the local address the kernel would use towards the server (port 0: ephemeral), not 0.0.0.0.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import netifaces
import stun as pystun3
import trio

from shared.stun.message import (
    BINDING,
    ErrorCode,
    MappedAddress,
    StunClass,
    StunMessage,
    StunParseError,
    TransportAddress,
    XorMappedAddress,
    parse_message_untrusted,
)

log = logging.getLogger(__name__)

_I = TypeVar("_I", ipaddress.IPv4Interface, ipaddress.IPv6Interface)

NAT_UNKNOWN = "unknown"
NAT_TIMEOUT = "timeout"

# --- LAN interfaces ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LanInterface:
    """One network interface of the remote host with its non-loopback addresses."""

    name: str
    ipv4: tuple[ipaddress.IPv4Interface, ...]
    """Addresses with their netmask (`.ip`, `.network`)."""
    ipv6: tuple[ipaddress.IPv6Interface, ...]
    """Addresses with their prefix; link-local ones keep their `%scope` in `str()`."""


def lan_interfaces() -> list[LanInterface]:
    """The host's interfaces that have at least one non-loopback IP address."""
    table = {name: netifaces.ifaddresses(name) for name in netifaces.interfaces()}
    return interfaces_from_table(
        table, ipv4_family=netifaces.AF_INET, ipv6_family=netifaces.AF_INET6
    )


def interfaces_from_table(
    table: Mapping[str, Mapping[int, Sequence[Mapping[str, str]]]],
    *,
    ipv4_family: int = socket.AF_INET,
    ipv6_family: int = socket.AF_INET6,
) -> list[LanInterface]:
    """Turn netifaces' `{name: {family: [{"addr", "netmask", ...}]}}` into `LanInterface`s.

    Entries that do not parse are skipped rather than fatal: a strange virtual interface must
    not stop the remote host from starting.
    """
    result = []
    for name, families in table.items():
        ipv4 = tuple(_parse_entries(families.get(ipv4_family, ()), ipaddress.IPv4Interface))
        ipv6 = tuple(_parse_entries(families.get(ipv6_family, ()), ipaddress.IPv6Interface))
        if ipv4 or ipv6:
            result.append(LanInterface(name, ipv4, ipv6))
    return result


def _parse_entries(entries: Sequence[Mapping[str, str]], kind: type[_I]) -> list[_I]:
    parsed: list[_I] = []
    for entry in entries:
        address = entry.get("addr")
        if not address:
            continue
        netmask = entry.get("netmask", "")
        # netifaces writes IPv6 masks as "ffff:ffff:ffff:ffff::/64"; the prefix is what counts.
        prefix = netmask.rpartition("/")[2] if "/" in netmask else netmask
        try:
            interface = kind(f"{address}/{prefix}" if prefix else address)
        except ValueError:
            try:  # an IPv6 mask written out in full
                bits = bin(int(ipaddress.IPv6Address(prefix))).count("1")
                interface = kind(f"{address}/{bits}")
            except ValueError:
                log.debug("skipping interface address %r", entry)
                continue
        if not interface.ip.is_loopback:
            parsed.append(interface)
    return parsed


# --- NAT type (pystun3) -----------------------------------------------------------------------


@dataclass(frozen=True)
class NatProbeResult:
    """The outcome of `probe_nat_type`.

    `nat_type` is one of pystun3's names ("Open Internet", "Full Cone", "Restric NAT",
    "Restric Port NAT", "Symmetric NAT", "Symmetric UDP Firewall"), or `NAT_TIMEOUT`
    ("timeout": no answer in time), or `NAT_UNKNOWN` ("unknown": see `error`).
    """

    nat_type: str
    external_ip: str | None
    external_port: int | None
    error: str | None = None


class _ProbeStopped(Exception):
    """Raised inside the worker thread to end pystun3 at the deadline or on cancellation."""


class _GuardedSocket:
    """The socket pystun3 gets: it stops pystun3 in time and notes the first mapped address."""

    def __init__(self, sock: socket.socket, deadline: float, stop: threading.Event) -> None:
        self._sock = sock
        self._deadline = deadline
        self._stop = stop
        self.first_mapped: TransportAddress | None = None
        self.sends = 0

    def _check(self) -> float:
        remaining = self._deadline - time.monotonic()
        if self._stop.is_set() or remaining <= 0:
            raise _ProbeStopped
        return remaining

    def sendto(self, data: bytes, address: tuple[str | None, int | None]) -> int:
        self._check()
        host, port = address
        if host is None or port is None:
            # pystun3 sends to CHANGED-ADDRESS without checking that the server gave one.
            raise _ProbeStopped("the STUN server sent no CHANGED-ADDRESS")
        self.sends += 1
        return self._sock.sendto(data, (host, port))

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        timeout = self._sock.gettimeout()
        self._sock.settimeout(min(timeout or 1.0, self._check()))
        try:
            data, source = self._sock.recvfrom(size)
        finally:
            self._sock.settimeout(timeout)
        if self.first_mapped is None:
            try:
                reply = parse_message_untrusted(data)
            except StunParseError:
                pass
            else:
                mapped = reply.get(MappedAddress) if reply.cls is StunClass.SUCCESS else None
                if mapped is not None:
                    self.first_mapped = mapped.address
        return data, source


def _probe_blocking(
    host: str, port: int, attempt_timeout: float, deadline: float, stop: threading.Event
) -> NatProbeResult:
    """The worker thread's half of `probe_nat_type`. Never raises."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        server_ip = str(infos[0][4][0])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as scout:
            # Connecting a UDP socket sends nothing; it makes the kernel choose the route's
            # source address, which pystun3 must know to recognise "Open Internet".
            scout.connect((server_ip, port))
            local_ip = str(scout.getsockname()[0])
    except (OSError, UnicodeError, IndexError) as exc:
        return NatProbeResult(NAT_UNKNOWN, None, None, f"no route to STUN server {host}: {exc}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        guarded = _GuardedSocket(raw, deadline, stop)
        try:
            raw.settimeout(attempt_timeout)
            raw.bind((local_ip, 0))
            nat_type, _ = pystun3.get_nat_type(
                guarded, local_ip, raw.getsockname()[1], stun_host=server_ip, stun_port=port
            )
        except _ProbeStopped as exc:
            mapped = guarded.first_mapped
            ip, mapped_port = (mapped.ip, mapped.port) if mapped else (None, None)
            if exc.args:
                return NatProbeResult(NAT_UNKNOWN, ip, mapped_port, str(exc.args[0]))
            return NatProbeResult(NAT_TIMEOUT, ip, mapped_port, "NAT probe stopped at its deadline")
        except OSError as exc:
            return NatProbeResult(NAT_UNKNOWN, None, None, f"socket error: {exc}")
        except Exception as exc:  # pystun3 trips over unexpected replies with KeyError and such
            return NatProbeResult(NAT_UNKNOWN, None, None, f"pystun3 failed: {exc!r}")
    mapped = guarded.first_mapped
    if nat_type == pystun3.Blocked:
        return NatProbeResult(NAT_TIMEOUT, None, None, f"no answer from STUN server {host}:{port}")
    if mapped is None:
        return NatProbeResult(NAT_UNKNOWN, None, None, "the STUN answers had no MAPPED-ADDRESS")
    if nat_type == pystun3.ChangedAddressError:
        return NatProbeResult(
            NAT_UNKNOWN, mapped.ip, mapped.port, "no answer from the STUN server's other address"
        )
    return NatProbeResult(str(nat_type), mapped.ip, mapped.port)


async def probe_nat_type(
    stun_host: str, stun_port: int, *, timeout: float, attempt_timeout: float | None = None
) -> NatProbeResult:
    """Classify the NAT between us and the main host's STUN server (RFC 3489 tests).

    Never raises on network trouble: the result says "timeout" or "unknown" and why.
    `attempt_timeout` is how long pystun3 waits for each reply; by default a tenth of `timeout`,
    so that the two tests that legitimately go unanswered behind a restricted NAT (four
    attempts each) still fit.
    """
    if not stun_host:
        # pystun3 would try its list of public servers instead.
        return NatProbeResult(NAT_UNKNOWN, None, None, "no STUN server given")
    if attempt_timeout is None:
        attempt_timeout = min(max(timeout / 10, 0.05), 2.0)
    stop = threading.Event()
    work = partial(
        _probe_blocking, stun_host, stun_port, attempt_timeout, time.monotonic() + timeout, stop
    )
    try:
        with trio.move_on_after(timeout):
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    finally:
        # An abandoned thread sees this at its next send or receive and ends.
        stop.set()
    return NatProbeResult(NAT_TIMEOUT, None, None, f"NAT probe did not finish in {timeout}s")


# --- one Binding transaction (RFC 5389 §7.2.1) ------------------------------------------------


class BindingTransaction:
    """One Binding request over UDP, as a sans-I/O object: time is an input.

    RFC 5389 §7.2.1: send at 0, RTO, 3 RTO, 7 RTO, ... (the interval doubles), Rc requests in
    all, then wait Rm times RTO for the last one before giving up.
    """

    def __init__(
        self,
        server: TransportAddress,
        *,
        now: float,
        rto: float = 0.5,
        rc: int = 7,
        rm: int = 16,
        transaction_id: bytes | None = None,
    ) -> None:
        self.server = server
        self.transaction_id = transaction_id or secrets.token_bytes(12)
        self.request = StunMessage(BINDING, StunClass.REQUEST, self.transaction_id).encode()
        self.mapped: TransportAddress | None = None
        self.error: str | None = None
        self.done = False
        self._initial_rto = rto
        self._interval = rto
        self._rm = rm
        self._sends_left = rc - 1  # the first send is the caller's, right after construction
        self._timer = now + rto

    def get_timer(self) -> float | None:
        return None if self.done else self._timer

    def handle_timer(self, now: float) -> bytes | None:
        """The request to send again, or None (and `done`) when it is time to give up."""
        if self.done or now < self._timer:
            return None
        if self._sends_left == 0:
            self.done = True
            self.error = "no response"
            return None
        self._sends_left -= 1
        self._interval *= 2
        # The last request is given Rm times the initial RTO to be answered.
        wait = self._interval if self._sends_left else self._rm * self._initial_rto
        self._timer = now + wait
        return self.request

    def receive_datagram_untrusted(self, data: bytes, source: TransportAddress) -> bool:
        """Feed a datagram; True when it was our answer and finished the transaction."""
        if self.done or source != self.server:
            return False
        try:
            response = parse_message_untrusted(data)
        except StunParseError:
            return False
        if response.transaction_id != self.transaction_id or response.method != BINDING:
            return False
        if response.cls is StunClass.SUCCESS:
            # RFC 5389 §7.3.3: XOR-MAPPED-ADDRESS; MAPPED-ADDRESS from an RFC 3489 server.
            xor = response.get(XorMappedAddress)
            plain = response.get(MappedAddress)
            found = xor or plain
            if found is None:
                self.error = "success response without a mapped address"
            else:
                self.mapped = found.address
        elif response.cls is StunClass.ERROR:
            code = response.get(ErrorCode)
            self.error = f"error {code.code} {code.reason}" if code else "error response"
        else:
            return False
        self.done = True
        return True


async def stun_binding(
    server: tuple[str, int],
    *,
    timeout: float,
    sock: trio.socket.SocketType | None = None,
    rto: float = 0.5,
) -> tuple[str, int] | None:
    """Ask the STUN server what our public (ip, port) is; None if it could not be learnt.

    With `sock`, an already-bound trio UDP socket, the answer is the public address of *that*
    socket, which makes this a keepalive for its NAT binding that also notices a changed public
    address (F9). While this runs it must be the socket's only reader: other datagrams that
    arrive meanwhile are discarded. Without `sock` an ephemeral socket is used.

    Never raises on network trouble; gives up after `timeout` seconds.
    """
    with trio.move_on_after(timeout):
        try:
            if sock is None:
                family = await _family_of(server)
                with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as own:
                    await own.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
                    return await _binding_over(own, server, rto)
            return await _binding_over(sock, server, rto)
        except OSError as exc:  # includes socket.gaierror
            log.debug("STUN binding to %s failed: %s", server, exc)
            return None
    log.debug("STUN binding to %s: no answer within %ss", server, timeout)
    return None


async def _family_of(server: tuple[str, int]) -> int:
    infos = await trio.socket.getaddrinfo(server[0], server[1], type=trio.socket.SOCK_DGRAM)
    return int(infos[0][0])


async def _binding_over(
    sock: trio.socket.SocketType, server: tuple[str, int], rto: float
) -> tuple[str, int] | None:
    infos = await trio.socket.getaddrinfo(
        server[0], server[1], family=sock.family, type=trio.socket.SOCK_DGRAM
    )
    destination = infos[0][4]
    transaction = BindingTransaction(
        TransportAddress(str(destination[0]), int(destination[1])),
        now=trio.current_time(),
        rto=rto,
    )
    await sock.sendto(transaction.request, destination)
    while True:
        timer = transaction.get_timer()
        if timer is None:
            break
        with trio.move_on_at(timer):
            data, source = await sock.recvfrom(2048)
            try:
                origin = TransportAddress(str(source[0]), int(source[1]))
            except ValueError:
                continue
            transaction.receive_datagram_untrusted(data, origin)
            continue
        again = transaction.handle_timer(trio.current_time())
        if again is not None:
            await sock.sendto(again, destination)
    if transaction.mapped is None:
        log.debug("STUN binding to %s: %s", server, transaction.error)
        return None
    return transaction.mapped.ip, transaction.mapped.port
