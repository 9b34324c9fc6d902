"""The main host's media relay: sealed WAN audio in from one office, out to the other.

This module owns the relay's UDP socket (5090/udp in the product), the table of calls and legs,
and the per-packet path: find the leg from the header, open the packet with that leg's office's
current media key, refuse replays (RFC 3711 §3.3.2), learn the leg's address from authenticated
packets only, and seal the payload again for the other leg. Its control API is keyed by call,
after Kamailio rtpengine's: `offer`, `answer`, `delete`, `query`.

It does not own keys (``key_for(office)`` is asked for the office's current key at every
packet, so a re-login takes effect at once), call signalling (the caller tells each remote host
its leg id with MediaLeg), codecs or RTP itself: payloads pass through as opaque bytes.

The address of a leg is latched from the source of the last authenticated, fresh packet, never
from anything a stranger can send: a packet that fails authentication or is a replay changes
nothing. That is the defence against "RTP bleed" (audio sent to whoever speaks first) and lets
an office's new public address after a NAT rebinding take over with its first good packet.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from shared.aio.dscp import set_dscp_ef
from shared.media.wan import (
    DIRECTION_FROM_RELAY,
    DIRECTION_TO_RELAY,
    KEY_SIZE,
    KIND_KEEPALIVE,
    ReplayWindow,
    WanDefect,
    WanPacketError,
    open_untrusted,
    peek_leg_untrusted,
    seal,
)

__all__ = ["RELAY_PORT", "MediaRelay", "RelayStatistics", "set_dscp_ef"]

RELAY_PORT = 5090
# Larger than any RTP packet over an Ethernet MTU plus our 32 bytes; a longer datagram is cut
# short by the kernel and then fails authentication, as it should.
_RECEIVE_SIZE = 2048
# Datagrams handled per wakeup before yielding to other tasks (the drain loop goes on at once if
# more are ready: wait_readable returns immediately).
_BATCH = 512
# RFC 4594 §4.5 / RFC 3246: Expedited Forwarding, DSCP 46, shifted into the TOS/traffic class.

Address = tuple[Any, ...]


@dataclass(frozen=True)
class RelayStatistics:
    calls: int
    legs: int
    received: int
    """Datagrams read from the socket, whatever they were."""
    forwarded: int
    keepalives: int
    dropped_malformed: int
    dropped_unknown_leg: int
    dropped_no_key: int
    """For a leg whose office has no usable media key (logged out)."""
    dropped_bad_tag: int
    dropped_replay: int
    dropped_wrong_direction: int
    unrouted: int
    """Authentic media for a call whose other leg has no address yet (or no key)."""
    send_failures: int
    address_changes: int


@dataclass(eq=False)
class _Leg:
    leg: int
    call_id: str
    office: str
    role: str
    window: ReplayWindow = field(default_factory=ReplayWindow)
    address: Address | None = None
    rx_key: bytes = b""
    tx_counter: int = 0
    peer: _Leg | None = None
    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    keepalives_in: int = 0
    dropped_bad_tag: int = 0
    dropped_replay: int = 0
    dropped_wrong_direction: int = 0
    dropped_malformed: int = 0
    dropped_no_key: int = 0
    unrouted: int = 0
    address_changes: int = 0

    def report(self) -> dict[str, Any]:
        return {
            "leg": self.leg,
            "office": self.office,
            "address": None if self.address is None else (self.address[0], self.address[1]),
            "packets_in": self.packets_in,
            "bytes_in": self.bytes_in,
            "packets_out": self.packets_out,
            "bytes_out": self.bytes_out,
            "keepalives_in": self.keepalives_in,
            "address_changes": self.address_changes,
            "unrouted": self.unrouted,
            "drops": {
                "bad_tag": self.dropped_bad_tag,
                "replay": self.dropped_replay,
                "wrong_direction": self.dropped_wrong_direction,
                "malformed": self.dropped_malformed,
                "no_key": self.dropped_no_key,
            },
        }


@dataclass(eq=False)
class _Call:
    call_id: str
    offer: _Leg
    answer: _Leg | None = None


class MediaRelay:
    """The relay. Control methods are synchronous and may be called from any trio task.

    Byte counts are of whole datagrams (what the WAN carries), in and out.
    """

    def __init__(
        self,
        key_for: Callable[[str], bytes | None],
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        self._key_for = key_for
        self._log = logger or logging.getLogger(__name__)
        self._calls: dict[str, _Call] = {}
        self._legs: dict[int, _Leg] = {}
        # Leg ids are never reused by one relay: a (key, leg, direction) triple must not see a
        # counter twice, and our counters per leg start at 0 (see shared.media.wan). A random
        # start keeps a restarted relay's ids away from the last one's.
        self._next_leg = secrets.randbits(32)
        self._sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        """The bound (host, port), once `serve` has started."""
        self._received = 0
        self._forwarded = 0
        self._keepalives = 0
        self._dropped_malformed = 0
        self._dropped_unknown_leg = 0
        self._dropped_no_key = 0
        self._dropped_bad_tag = 0
        self._dropped_replay = 0
        self._dropped_wrong_direction = 0
        self._unrouted = 0
        self._send_failures = 0
        self._address_changes = 0

    # -- control API (rtpengine's offer / answer / delete / query) ----------------------------

    def offer(self, call_id: str, office: str) -> int:
        """The calling side's leg of `call_id`; asking again returns the same leg."""
        call = self._calls.get(call_id)
        if call is not None:
            if call.offer.office != office:
                raise ValueError(f"call {call_id!r} was offered by {call.offer.office!r}")
            return call.offer.leg
        leg = self._new_leg(call_id, office, "offer")
        self._calls[call_id] = _Call(call_id, leg)
        return leg.leg

    def answer(self, call_id: str, office: str) -> int:
        """The called side's leg of `call_id`; KeyError without an offer. Asking again for the
        same office returns the same leg; another office replaces the answer leg (a call moved
        to a backup route), with a new leg id."""
        call = self._calls[call_id]
        if call.answer is not None:
            if call.answer.office == office:
                return call.answer.leg
            self._legs.pop(call.answer.leg, None)
        leg = self._new_leg(call_id, office, "answer")
        call.answer = leg
        leg.peer = call.offer
        call.offer.peer = leg
        return leg.leg

    def delete(self, call_id: str) -> None:
        """Forget the call and both its legs; packets for them are then unknown legs."""
        call = self._calls.pop(call_id, None)
        if call is None:
            return
        self._legs.pop(call.offer.leg, None)
        if call.answer is not None:
            self._legs.pop(call.answer.leg, None)

    def query(self, call_id: str) -> dict[str, Any]:
        """Addresses and counters of the call's legs; KeyError for an unknown call."""
        call = self._calls[call_id]
        return {
            "call_id": call_id,
            "offer": call.offer.report(),
            "answer": None if call.answer is None else call.answer.report(),
        }

    def statistics(self) -> RelayStatistics:
        return RelayStatistics(
            calls=len(self._calls),
            legs=len(self._legs),
            received=self._received,
            forwarded=self._forwarded,
            keepalives=self._keepalives,
            dropped_malformed=self._dropped_malformed,
            dropped_unknown_leg=self._dropped_unknown_leg,
            dropped_no_key=self._dropped_no_key,
            dropped_bad_tag=self._dropped_bad_tag,
            dropped_replay=self._dropped_replay,
            dropped_wrong_direction=self._dropped_wrong_direction,
            unrouted=self._unrouted,
            send_failures=self._send_failures,
            address_changes=self._address_changes,
        )

    def _new_leg(self, call_id: str, office: str, role: str) -> _Leg:
        while True:
            leg_id = self._next_leg
            self._next_leg = (self._next_leg + 1) & 0xFFFFFFFF
            if leg_id and leg_id not in self._legs:
                break
        leg = _Leg(leg_id, call_id, office, role)
        self._legs[leg_id] = leg
        return leg

    # -- the socket -------------------------------------------------------------------------

    async def serve(
        self,
        sock_or_host_port: socket.socket | tuple[str, int],
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Relay until cancelled, on a bound UDP socket or on a (host, port) it binds.

        A socket passed in stays the caller's to close; one bound here is closed on exit.
        `task_status.started` gets the bound (host, port).
        """
        bind_to: tuple[str, int] | None = None
        if isinstance(sock_or_host_port, socket.socket):
            sock = sock_or_host_port
        else:
            bind_to = sock_or_host_port
            family = (
                socket.AF_INET6 if ipaddress.ip_address(bind_to[0]).version == 6 else socket.AF_INET
            )
            sock = socket.socket(family, socket.SOCK_DGRAM)
        owned = bind_to is not None
        try:
            if bind_to is not None:
                sock.bind(bind_to)
            sock.setblocking(False)
            set_dscp_ef(sock)
            name = sock.getsockname()
            self.address = (name[0], name[1])
            self._sock = sock
            self._log.debug("media relay on %s:%d", name[0], name[1])
            task_status.started(self.address)
            await self._receive_loop(sock)
        finally:
            self._sock = None
            if owned:
                sock.close()

    async def _receive_loop(self, sock: socket.socket) -> None:
        handle = self._handle_datagram
        recvfrom = sock.recvfrom
        while True:
            await trio.lowlevel.wait_readable(sock)
            # Drain what is ready: one wakeup per burst, not one per packet.
            for _ in range(_BATCH):
                try:
                    data, source = recvfrom(_RECEIVE_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    # Linux reports an ICMP error for an earlier send here; nothing to read.
                    self._log.debug("relay receive: %s", exc)
                    continue
                handle(data, source, sock)
            else:
                await trio.lowlevel.checkpoint()

    def _handle_datagram(self, data: bytes, source: Address, sock: socket.socket) -> None:
        self._received += 1
        try:
            leg = self._legs.get(peek_leg_untrusted(data))
        except WanPacketError:
            self._dropped_malformed += 1
            return
        if leg is None:
            self._dropped_unknown_leg += 1
            return
        key = self._key_for(leg.office)
        if key is None or len(key) != KEY_SIZE:
            leg.dropped_no_key += 1
            self._dropped_no_key += 1
            return
        try:
            _, counter, kind, payload = open_untrusted(key, data, DIRECTION_TO_RELAY)
        except WanPacketError as exc:
            self._count_defect(leg, exc.defect)
            return
        if key is not leg.rx_key and key != leg.rx_key:
            # A new login (new key): its sender may count from anew, and nothing sealed with
            # the old key opens any more, so the old window has nothing left to protect.
            leg.window = ReplayWindow()
            leg.rx_key = key
        if not leg.window.accept(counter):
            leg.dropped_replay += 1
            self._dropped_replay += 1
            return
        if leg.address != source:
            # Only here, after authentication and the replay check, does an address move.
            if leg.address is not None:
                self._log.info(
                    "call %s leg %d (%s) moved from %s to %s",
                    leg.call_id,
                    leg.leg,
                    leg.office,
                    leg.address,
                    source,
                )
            leg.address = source
            leg.address_changes += 1
            self._address_changes += 1
        leg.packets_in += 1
        leg.bytes_in += len(data)
        if kind == KIND_KEEPALIVE:
            leg.keepalives_in += 1
            self._keepalives += 1
            return
        peer = leg.peer
        if peer is None or peer.address is None:
            leg.unrouted += 1
            self._unrouted += 1
            return
        peer_key = self._key_for(peer.office)
        if peer_key is None or len(peer_key) != KEY_SIZE:
            leg.unrouted += 1
            self._unrouted += 1
            return
        out = seal(peer_key, DIRECTION_FROM_RELAY, peer.leg, peer.tx_counter, payload)
        peer.tx_counter += 1
        try:
            sock.sendto(out, peer.address)
        except OSError:  # BlockingIOError too: a full buffer drops the packet
            self._send_failures += 1
            return
        peer.packets_out += 1
        peer.bytes_out += len(out)
        self._forwarded += 1

    def _count_defect(self, leg: _Leg, defect: WanDefect) -> None:
        if defect is WanDefect.BAD_TAG:
            leg.dropped_bad_tag += 1
            self._dropped_bad_tag += 1
        elif defect is WanDefect.WRONG_DIRECTION:
            leg.dropped_wrong_direction += 1
            self._dropped_wrong_direction += 1
        else:
            leg.dropped_malformed += 1
            self._dropped_malformed += 1
