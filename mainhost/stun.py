"""The main host's STUN service: UDP sockets around the pure `shared.stun.server.StunServer`.

This module owns the sockets (two ports on the primary IP, and two more on the alternate IP when
the main host has a second address for RFC 3489/RFC 5780 NAT-type discovery), one receive loop
per socket, and sending each reply from the socket the server chose. It does not own any STUN
decision: what to answer, and from where, is `StunServer`'s.

Sockets are non-blocking stdlib sockets waited on with `trio.lowlevel.wait_readable`, so that a
reply can be sent with one non-blocking `sendto`: a receive loop never waits on a full send
buffer, it drops the reply and counts it (`send_failures`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from dataclasses import dataclass

import trio

from shared.stun.message import TransportAddress
from shared.stun.server import ServerAddresses, StunServer, StunServerStatistics

# Larger than any STUN message we answer; a longer datagram is cut short by the kernel and then
# fails the length check, which is what it deserves.
_RECEIVE_SIZE = 2048
# With port 0 the kernel picks the primary port; the alternate IP may already use it. Try again.
_BIND_ATTEMPTS = 20


@dataclass(frozen=True)
class StunServiceStatistics:
    received: int
    answered: int
    errors: int
    dropped: int
    send_failures: int
    """Replies the kernel would not take (full buffer, unreachable); not counted as dropped."""


class StunService:
    """The running service, handed out by `serve_stun` through `task_status.started`."""

    def __init__(
        self,
        server: StunServer,
        sockets: dict[TransportAddress, socket.socket],
        logger: logging.Logger,
    ) -> None:
        self.server_addresses = server.addresses
        self.addresses: tuple[tuple[str, int], ...] = tuple(
            (a.ip, a.port) for a in server.addresses.local_addresses()
        )
        """The bound (ip, port) pairs, in the order of `local_addresses`."""
        self._server = server
        self._sockets = sockets
        self._log = logger
        self._send_failures = 0

    @property
    def local_addresses(self) -> tuple[TransportAddress, ...]:
        """Every bound (ip, port), primary first: P:p, P:a, then A:p, A:a when there is A."""
        return self.server_addresses.local_addresses()

    def statistics(self) -> StunServiceStatistics:
        counts: StunServerStatistics = self._server.statistics()
        return StunServiceStatistics(
            received=counts.received,
            answered=counts.answered,
            errors=counts.errors,
            dropped=counts.dropped,
            send_failures=self._send_failures,
        )

    async def _receive_loop(self, local: TransportAddress) -> None:
        sock = self._sockets[local]
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data, source = sock.recvfrom(_RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                # Linux may report an ICMP error for an earlier send here; nothing to read.
                self._log.debug("STUN receive on %s: %s", local, exc)
                continue
            remote = TransportAddress(source[0], source[1])
            reply = self._server.handle_datagram_untrusted(data, local, remote)
            if reply is None:
                continue
            try:
                self._sockets[reply.local].sendto(reply.data, (reply.remote.ip, reply.remote.port))
            except OSError as exc:  # BlockingIOError too: a full buffer drops the reply
                self._send_failures += 1
                self._log.debug("STUN send %s -> %s failed: %s", reply.local, reply.remote, exc)


async def serve_stun(
    primary_ip: str,
    port: int,
    *,
    alternate_ip: str | None = None,
    alternate_port: int | None = None,
    software: str | None = "branchpbx",
    logger: logging.Logger | None = None,
    task_status: trio.TaskStatus[StunService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve STUN until cancelled.

    `alternate_port` defaults to `port + 1` (3478 and 3479 in the product), or to an ephemeral
    port when `port` is 0. The `StunService` given to `task_status.started` has the real bound
    addresses and `statistics()`.
    """
    log = logger or logging.getLogger(__name__)
    if alternate_port is None:
        alternate_port = port + 1 if port else 0
    with contextlib.ExitStack() as stack:
        sockets, addresses = _bind_all(stack, primary_ip, port, alternate_ip, alternate_port)
        service = StunService(StunServer(addresses, software=software, logger=log), sockets, log)
        log.debug("STUN service on %s", ", ".join(f"{a.ip}:{a.port}" for a in sockets))
        async with trio.open_nursery() as nursery:
            for local in sockets:
                nursery.start_soon(service._receive_loop, local)
            task_status.started(service)


def _bind_all(
    stack: contextlib.ExitStack,
    primary_ip: str,
    port: int,
    alternate_ip: str | None,
    alternate_port: int,
) -> tuple[dict[TransportAddress, socket.socket], ServerAddresses]:
    for attempt in range(_BIND_ATTEMPTS):
        attempt_stack = contextlib.ExitStack()
        try:
            primary = attempt_stack.enter_context(_udp_socket(primary_ip, port))
            real_port = primary.getsockname()[1]
            second = attempt_stack.enter_context(_udp_socket(primary_ip, alternate_port))
            real_alternate_port = second.getsockname()[1]
            addresses = ServerAddresses(
                primary_ip, real_port, alternate_port=real_alternate_port, alternate_ip=alternate_ip
            )
            bound = [primary, second]
            if alternate_ip is not None:
                bound.append(attempt_stack.enter_context(_udp_socket(alternate_ip, real_port)))
                bound.append(
                    attempt_stack.enter_context(_udp_socket(alternate_ip, real_alternate_port))
                )
        except OSError:
            attempt_stack.close()
            # Only kernel-chosen ports can collide by chance; a fixed port in use is an error.
            if (port and alternate_port) or attempt == _BIND_ATTEMPTS - 1:
                raise
            continue
        except BaseException:
            attempt_stack.close()
            raise
        stack.enter_context(attempt_stack)
        return dict(zip(addresses.local_addresses(), bound, strict=True)), addresses
    raise AssertionError("unreachable")  # the loop returns or raises


def _udp_socket(ip: str, port: int) -> socket.socket:
    version = ipaddress.ip_address(ip).version
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock
