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
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.aio.dscp import set_dscp_ef
from shared.media.wan import (
    DIRECTION_FROM_RELAY,
    DIRECTION_TO_RELAY,
    KEY_SIZE,
    KIND_KEEPALIVE,
    KIND_MEDIA,
    OVERHEAD,
    ReplayWindow,
    header_prefix,
    leg_cipher,
    nonce_prefix,
    unpack_header,
)

__all__ = ["RELAY_PORT", "MediaRelay", "RelayStatistics", "set_dscp_ef"]

RELAY_PORT = 5090
# Larger than any RTP packet over an Ethernet MTU plus our 32 bytes; a longer datagram is cut
# short by the kernel and then fails authentication, as it should.
_RECEIVE_SIZE = 2048
# Datagrams handled per wakeup before yielding to other tasks (the loop goes on at once if more
# are ready: it only waits for readability once a read found nothing).
_BATCH = 256
# Receive buffer requested for a socket the relay binds itself: 4 MB hold about 5000 packets, a
# second of 100 calls each way. Linux caps it at net.core.rmem_max (208 KB unless raised).
_RECEIVE_BUFFER = 4 << 20
# A full send buffer (EAGAIN) is waited out this long before the packets waiting are dropped.
_SEND_STALL = 0.05
_RX_NONCE = nonce_prefix(DIRECTION_TO_RELAY)
_TX_NONCE = nonce_prefix(DIRECTION_FROM_RELAY)
# No key seen yet: not an answer `key_for` can give (None and b"" are singletons).
_UNSET = object()

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


@dataclass(eq=False, slots=True)
class _Leg:
    leg: int
    call_id: str
    office: str
    role: str
    window: ReplayWindow = field(default_factory=ReplayWindow)
    address: Address | None = None
    rx_key: object = _UNSET
    """The key the replay window is for (set once a packet authenticated under it)."""
    rx_cipher_key: object = _UNSET
    """The `key_for` answer `rx_cipher` was derived from (the same object, for a cheap `is`)."""
    rx_cipher: AESGCM | None = None
    tx_key: object = _UNSET
    """The same for `tx_cipher`, what the relay seals with for this leg."""
    tx_cipher: AESGCM | None = None
    tx_header: bytes = b""
    """The first 8 header bytes of what the relay seals for this leg."""
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
        # A sealed packet the kernel had no room for yet (EAGAIN): (packet, address, its leg).
        self._stalled: tuple[bytes, Address, _Leg] | None = None

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
        leg.tx_header = header_prefix(KIND_MEDIA, DIRECTION_FROM_RELAY, leg_id)
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

        A socket passed in stays the caller's to close and to size; one bound here gets a large
        receive buffer (`_RECEIVE_BUFFER`) and is closed on exit.
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
                # Every call's audio arrives here: room for a pause of this task without loss.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
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
        drain = self._drain
        while True:
            more = drain(sock)
            if self._stalled is not None:
                await self._wait_to_send(sock)
            if more:
                # A full batch: let other tasks run, then go on without waiting.
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(sock)

    async def _wait_to_send(self, sock: socket.socket) -> None:
        """The send buffer was full: wait until there is room for the stalled packet (what
        arrives meanwhile waits in the kernel's receive queue), or drop it after
        `_SEND_STALL`. Only this task waits on the socket, for reading or for writing."""
        with trio.move_on_after(_SEND_STALL):
            while self._stalled is not None:
                await trio.lowlevel.wait_writable(sock)
                packet, address, leg = self._stalled
                try:
                    sock.sendto(packet, address)
                except BlockingIOError:
                    continue
                except OSError:
                    self._send_failures += 1
                else:
                    self._sent(leg, packet)
                self._stalled = None
        if self._stalled is not None:
            self._send_failures += 1
            self._stalled = None

    def _sent(self, leg: _Leg, packet: bytes) -> None:
        leg.packets_out += 1
        leg.bytes_out += len(packet)
        self._forwarded += 1

    def _drain(self, sock: socket.socket) -> bool:
        """Read and relay up to `_BATCH` ready datagrams; True when the batch ran out before
        the socket did, or a send found no room (the packet is then in `_stalled`).

        The whole packet path is written out in this one loop, with what it needs bound to
        locals: a call and an attribute look-up cost as much as the AEAD of a small packet. The
        order of the checks, and so which counter a bad packet lands in, is `open_untrusted`'s
        (shared.media.wan): the length, the leg, the key, the kind and reserved bits, the
        direction, the tag; then the replay window, after authentication (RFC 3711 §3.3).
        """
        recvfrom = sock.recvfrom
        legs_get = self._legs.get
        key_for = self._key_for
        sendto = sock.sendto
        received = 0
        forwarded = 0
        more = True
        for _ in range(_BATCH):
            try:
                data, source = recvfrom(_RECEIVE_SIZE)
            except BlockingIOError:
                more = False
                break
            except OSError as exc:
                # Linux reports an ICMP error for an earlier send here; nothing to read.
                self._log.debug("relay receive: %s", exc)
                continue
            received += 1
            if len(data) < OVERHEAD:
                self._dropped_malformed += 1
                continue
            kind, direction, reserved, leg_id, counter = unpack_header(data)
            leg = legs_get(leg_id)
            if leg is None:
                self._dropped_unknown_leg += 1
                continue
            key = key_for(leg.office)
            if key is not leg.rx_cipher_key:
                if key is None or len(key) != KEY_SIZE:
                    leg.dropped_no_key += 1
                    self._dropped_no_key += 1
                    continue
                if leg.rx_cipher is None or key != leg.rx_cipher_key:
                    leg.rx_cipher = leg_cipher(key, leg_id)
                leg.rx_cipher_key = key
            if (kind != KIND_MEDIA and kind != KIND_KEEPALIVE) or reserved:
                leg.dropped_malformed += 1
                self._dropped_malformed += 1
                continue
            if direction != DIRECTION_TO_RELAY:
                # A packet reflected back at us: refused before spending an AEAD operation.
                leg.dropped_wrong_direction += 1
                self._dropped_wrong_direction += 1
                continue
            try:
                payload = leg.rx_cipher.decrypt(  # type: ignore[union-attr]
                    _RX_NONCE + data[8:16], data[16:], data[:16]
                )
            except InvalidTag:
                leg.dropped_bad_tag += 1
                self._dropped_bad_tag += 1
                continue
            if key is not leg.rx_key and key != leg.rx_key:
                # A new login (new key): its sender may count from anew, and nothing sealed
                # with the old key opens any more, so the old window has nothing left to protect.
                leg.window = ReplayWindow()
            leg.rx_key = key
            if not leg.window.accept(counter):
                leg.dropped_replay += 1
                self._dropped_replay += 1
                continue
            if leg.address != source:
                self._move(leg, source)
            leg.packets_in += 1
            leg.bytes_in += len(data)
            if kind == KIND_KEEPALIVE:
                leg.keepalives_in += 1
                self._keepalives += 1
                continue
            peer = leg.peer
            if peer is None or peer.address is None:
                leg.unrouted += 1
                self._unrouted += 1
                continue
            peer_key = key_for(peer.office)
            if peer_key is not peer.tx_key:
                if peer_key is None or len(peer_key) != KEY_SIZE:
                    leg.unrouted += 1
                    self._unrouted += 1
                    continue
                if peer.tx_cipher is None or peer_key != peer.tx_key:
                    peer.tx_cipher = leg_cipher(peer_key, peer.leg)
                peer.tx_key = peer_key
            tail = peer.tx_counter.to_bytes(8, "big")
            peer.tx_counter += 1
            header = peer.tx_header + tail
            out = header + peer.tx_cipher.encrypt(_TX_NONCE + tail, payload, header)  # type: ignore[union-attr]
            try:
                sendto(out, peer.address)
            except BlockingIOError:
                # No room in the send buffer: wait for it before reading more.
                self._stalled = (out, peer.address, peer)
                break
            except OSError:
                # An ICMP error from an earlier send, no route: this packet is lost.
                self._send_failures += 1
                continue
            peer.packets_out += 1
            peer.bytes_out += len(out)
            forwarded += 1
        self._received += received
        self._forwarded += forwarded
        return more

    def _move(self, leg: _Leg, source: Address) -> None:
        """Latch `leg` to `source`: only ever called after authentication and the replay
        check, so nothing a stranger sends can move a leg."""
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
