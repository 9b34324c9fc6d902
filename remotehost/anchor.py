"""The remote host's media anchor for calls that cross the WAN.

For each such call the anchor holds one UDP socket on the office LAN (its port goes into the SDP
the remote host gives its phone) and relays between it and the main host's relay through one
shared WAN socket: RTP from the phone is sealed (`shared.media.wan`, direction 0) and sent to the
relay tagged with the call's leg id; sealed packets from the relay are opened (direction 1),
checked against a replay window (RFC 3711 §3.3.2) and sent on to the phone.

It owns the sockets, the latching of the phone's address, the sender counters and the
keepalives that teach the relay our public address and hold the NAT binding open. It does not
own signalling, SDP, keys (the caller passes the login's current media key, and a new one with
`update_key` after a re-login) or the relay's address (from the MediaLeg message).

Phone side, symmetric RTP (RFC 4961): we send to the address from the phone's SDP until its
first RTP packet arrives, then to wherever that packet really came from (the phone may sit
behind another NAT or announce a private address), and from then on only that source is heard.

WAN side, no source filter: a packet is ours when it authenticates for the call's leg and is not
a replay, wherever it came from (the relay may answer from another address of a multi-homed
host). Addresses on that side never move on unauthenticated input.

Direct path (F4, docs/wire-protocol.md §9b): after `set_direct` the call also probes the other
office's anchor from the same WAN socket (so the NAT mapping the relay saw is the one the peer
is told about) and, once `remotehost.directpath` says both directions work, sends its audio
there instead of to the relay. The relay leg stays as it was (keepalives go on), packets from
both paths are accepted all the time, and the decision to fall back is the state machine's.

One task moves every packet: the WAN socket and all the calls' phone sockets sit in one epoll
set of the anchor's own (level-triggered), and trio waits for that set's descriptor alone. A
wakeup then serves every socket that is ready (the WAN socket drained up to a batch, a phone
socket read once) instead of waking one task per call and re-arming each socket with trio after
every packet; with a hundred calls that per-socket bookkeeping cost more than the packets.
`select.epoll` makes this module Linux-only, as the remote host is. The per-packet paths are
written out, with the leg's AESGCM and header prefix cached (`shared.media.wan` defines how
they compose); the direct path (F4), keepalives and everything rare go through the general
methods. Those written-out paths beside the general ones are why this module is long.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from remotehost.directpath import DirectPathState, DirectPathTimers
from shared.aio.dscp import set_dscp_ef
from shared.media.wan import (
    DIRECTION_DIRECT_ANSWER,
    DIRECTION_DIRECT_OFFER,
    DIRECTION_FROM_RELAY,
    DIRECTION_TO_RELAY,
    KEY_SIZE,
    KIND_KEEPALIVE,
    KIND_MEDIA,
    OVERHEAD,
    ReplayWindow,
    WanPacketError,
    header_prefix,
    leg_cipher,
    nonce_prefix,
    open_untrusted,
    peek_direction_untrusted,
    seal_direct,
    seal_keepalive,
    unpack_header,
)

__all__ = ["CallMedia", "CallMediaStatistics", "MediaAnchor", "set_dscp_ef"]

KEEPALIVE_INTERVAL = 2.0
_RECEIVE_SIZE = 2048
# Work done (datagrams read and sockets served) before other tasks get their turn.
_BATCH = 256
# Datagrams read from the WAN socket per round, at least; more when more phone sockets were
# ready in the round (one read each), so that under overload both directions get an equal share
# and neither side's receive queue overflows first.
_WAN_ROUND = 16
# The WAN socket carries every call's audio from the relay: room for a pause of the anchor's
# task (a busy remote host, a slow disk write) without loss. 4 MB requested holds about 5000
# packets, a second of 100 calls; Linux caps it at net.core.rmem_max (208 KB unless raised).
_WAN_RECEIVE_BUFFER = 4 << 20
# A full send buffer (EAGAIN) is waited out this long before the packet is dropped and counted.
_SEND_STALL = 0.05
_TX_NONCE = nonce_prefix(DIRECTION_TO_RELAY)
_RX_NONCE = nonce_prefix(DIRECTION_FROM_RELAY)
# RFC 4594 §4.5 / RFC 3246: Expedited Forwarding, DSCP 46, in the TOS / traffic class byte.
# Sender counters of closed calls, per (key, leg), so that a leg opened again under the same key
# never starts again at 0 (a GCM nonce must never repeat). Bounded: the oldest are forgotten.
_SPENT_LIMIT = 4096

Address = tuple[Any, ...]


def _udp_socket(ip: str, receive_buffer: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((ip, 0))
        sock.setblocking(False)
        set_dscp_ef(sock)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class CallMediaStatistics:
    phone_packets_in: int
    """RTP/RTCP read from the phone (after the source check)."""
    wan_packets_out: int
    """Media sealed and sent to the relay (keepalives not counted)."""
    wan_packets_in: int
    """Authentic, fresh media from the relay."""
    phone_packets_out: int
    keepalives_sent: int
    keepalives_in: int
    dropped_bad_auth: int
    """From the WAN: failed authentication, wrong direction, malformed."""
    dropped_replay: int
    dropped_wrong_source: int
    """On the phone socket, from another source than the latched phone."""
    dropped_not_rtp: int
    dropped_no_route: int
    """Nowhere to send yet: no WAN leg, or no phone address."""
    send_failures: int
    phone_address: tuple[str, int] | None
    latched: bool
    media_path: str = "relayed"
    """Where outgoing audio goes now: "relayed" or "direct" (F4)."""
    direct_packets_out: int = 0
    """Media sent on the direct path (not counted in `wan_packets_out`, which is the relay's)."""
    direct_packets_in: int = 0
    """Authentic, fresh media from the other office directly (not in `wan_packets_in`)."""
    direct_probes_sent: int = 0
    direct_probes_in: int = 0
    direct_switches: int = 0
    """Times outgoing audio moved to the direct path."""
    direct_fallbacks: int = 0
    """Times it moved back to the relay."""
    direct_peer: tuple[str, int] | None = None


class CallMedia:
    """The media of one call through the anchor; made by `MediaAnchor.open_call`."""

    def __init__(self, anchor: MediaAnchor, call_id: str, phone_sock: socket.socket) -> None:
        self.call_id = call_id
        self.local_port: int = phone_sock.getsockname()[1]
        """The phone-side port, for the SDP the remote host gives its phone."""
        self.leg: int | None = None
        self.relay: Address | None = None
        """The relay's (ip, port), once known."""
        self._relay_name: tuple[str, int] | None = None
        self._resolve_wanted = trio.Event()
        self._anchor = anchor
        self._sock = phone_sock
        self._scope = trio.CancelScope()
        self._closed = False
        self._key = b""
        self._cipher: AESGCM | None = None
        """The leg's AEAD under `_key` (both directions: the nonce tells them apart)."""
        self._tx_header = b""
        self._tx_counter = 0
        self._window = ReplayWindow()
        self._phone: Address | None = None
        self._latched = False
        self._last_wan_send = -float("inf")
        self._phone_packets_in = 0
        self._wan_packets_out = 0
        self._wan_packets_in = 0
        self._phone_packets_out = 0
        self._keepalives_sent = 0
        self._keepalives_in = 0
        self._dropped_bad_auth = 0
        self._dropped_replay = 0
        self._dropped_wrong_source = 0
        self._dropped_not_rtp = 0
        self._dropped_no_route = 0
        self._send_failures = 0
        # F4: the direct path, once the main host has sent DirectPath.
        self._direct: DirectPathState | None = None
        self._direct_key = b""
        self._direct_direction = 0
        self._direct_peer_leg = 0
        self._direct_peer: Address | None = None
        self._direct_tx = 0
        self._direct_window = ReplayWindow()
        self._direct_kick = trio.Event()
        self._direct_packets_out = 0
        self._direct_packets_in = 0
        self._direct_probes_sent = 0
        self._direct_probes_in = 0

    # -- control --

    def set_phone_target(self, ip: str, port: int) -> None:
        """Where the phone's SDP says it receives; used until its first packet is latched."""
        if not self._latched:
            self._phone = (str(ipaddress.ip_address(ip)), port)

    def set_wan(self, leg: int, relay: tuple[str, int], key: bytes) -> None:
        """Send this call's media to `relay` tagged with `leg`, sealed with `key`; a keepalive
        goes at once so the relay learns our address.

        `relay` is (host, port); a host name (the configured main host) is looked up by the
        call's task, and media waits (dropped, counted as no route) until it is known.
        """
        if self._closed:
            return
        host, port = relay
        self._anchor._attach(self, leg, key)
        try:
            self.relay = (str(ipaddress.ip_address(host)), port)
        except ValueError:
            self.relay = None
            self._relay_name = (host, port)
            self._resolve_wanted.set()
            return
        self._relay_name = None
        self._send_keepalive()

    def update_key(self, key: bytes) -> None:
        """The uplink logged in again: seal and open with the new media key from now on.

        A keepalive under the new key goes at once: after a new public address it is what
        moves the relay's latch, so audio to us resumes before our phone speaks again.
        """
        if self._closed or self.leg is None:
            return
        self._anchor._attach(self, self.leg, key)
        self._anchor._log.debug("call %s: new media key for leg %d", self.call_id, self.leg)
        self._send_keepalive()

    def set_direct(self, peer: tuple[str, int], peer_leg: int, key: bytes, direction: int) -> None:
        """Try the direct path to the other office's anchor at `peer` (an IP address and
        port, from DirectPath): probe it, and send audio there once both ways work.

        A DirectPath again with the same key changes nothing; a new key (the main host saw an
        address move) starts over with a fresh counter, fast probing and the new address.
        """
        if self._closed or (self._direct is not None and key == self._direct_key):
            return
        if len(key) != KEY_SIZE:
            raise ValueError(f"a direct key is {KEY_SIZE} bytes, not {len(key)}")
        if direction not in (DIRECTION_DIRECT_OFFER, DIRECTION_DIRECT_ANSWER):
            raise ValueError("a direct path's direction is 2 or 3")
        self._direct_peer = (str(ipaddress.ip_address(peer[0])), peer[1])
        self._direct_peer_leg = peer_leg
        self._direct_key = key
        self._direct_direction = direction
        self._direct_tx = 0  # a fresh key: its nonces start anew
        self._direct_window = ReplayWindow()
        self._direct = DirectPathState(trio.current_time(), self._anchor.direct_timers)
        self._anchor._log.info(
            "call %s: trying the direct path to %s:%d", self.call_id, *self._direct_peer
        )
        self._direct_kick.set()

    @property
    def media_path(self) -> str:
        """Where outgoing audio goes now: "relayed" or "direct" (F4)."""
        return "direct" if self._direct is not None and self._direct.direct else "relayed"

    def close(self) -> None:
        """Stop relaying and release the phone socket (the call's task closes it)."""
        if self._closed:
            return
        self._closed = True
        self._anchor._detach(self)
        self._scope.cancel()

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> CallMediaStatistics:
        phone = None if self._phone is None else (self._phone[0], self._phone[1])
        return CallMediaStatistics(
            phone_packets_in=self._phone_packets_in,
            wan_packets_out=self._wan_packets_out,
            wan_packets_in=self._wan_packets_in,
            phone_packets_out=self._phone_packets_out,
            keepalives_sent=self._keepalives_sent,
            keepalives_in=self._keepalives_in,
            dropped_bad_auth=self._dropped_bad_auth,
            dropped_replay=self._dropped_replay,
            dropped_wrong_source=self._dropped_wrong_source,
            dropped_not_rtp=self._dropped_not_rtp,
            dropped_no_route=self._dropped_no_route,
            send_failures=self._send_failures,
            phone_address=phone,
            latched=self._latched,
            media_path=self.media_path,
            direct_packets_out=self._direct_packets_out,
            direct_packets_in=self._direct_packets_in,
            direct_probes_sent=self._direct_probes_sent,
            direct_probes_in=self._direct_probes_in,
            direct_switches=0 if self._direct is None else self._direct.switches_to_direct,
            direct_fallbacks=0 if self._direct is None else self._direct.fallbacks,
            direct_peer=None
            if self._direct_peer is None
            else (self._direct_peer[0], self._direct_peer[1]),
        )

    # -- packets --

    def _send_wan(self, packet: bytes) -> bool:
        assert self.relay is not None
        # Counted as sent even when the kernel refuses it, so a failing path is retried at the
        # keepalive pace and not in a busy loop.
        self._last_wan_send = trio.current_time()
        try:
            self._anchor._wan_send(packet, self.relay)
        except OSError:  # BlockingIOError too: a full buffer drops the packet
            self._send_failures += 1
            return False
        return True

    def _send_keepalive(self) -> None:
        if self.leg is None or self.relay is None:
            return
        packet = seal_keepalive(self._key, DIRECTION_TO_RELAY, self.leg, self._tx_counter)
        self._tx_counter += 1
        if self._send_wan(packet):
            self._keepalives_sent += 1

    def _read_phone(self, now: float) -> int:
        """Read one datagram from the phone and send it on, sealed, to the relay (or on the
        direct path); the number read (0 or 1). Called by the anchor's loop when the phone
        socket is readable; `now` is the time of that wakeup.

        One per call: a phone sends 50 packets/s, so a wakeup rarely finds two, and reading
        on until EAGAIN would cost an exception per socket per wakeup. The anchor's epoll set
        is level-triggered: whatever is left is reported again at the next poll.
        """
        try:
            data, source = self._sock.recvfrom(_RECEIVE_SIZE)
        except OSError:
            # Nothing after all (EAGAIN), or an ICMP error for an earlier send (the phone
            # went away).
            return 0
        # RFC 7983 §7 (is_rtp_or_rtcp, written out): STUN, probes, junk stay off the WAN.
        if len(data) < 8 or not 128 <= data[0] <= 191:
            self._dropped_not_rtp += 1
            return 1
        if source != self._phone or not self._latched:
            if self._latched:
                self._dropped_wrong_source += 1
                return 1
            # RFC 4961 symmetric RTP: answer where the phone really sends from.
            if source != self._phone:
                self._anchor._log.debug(
                    "call %s: phone sends from %s, not %s (SDP)", self.call_id, source, self._phone
                )
            self._phone = source
            self._latched = True
        self._phone_packets_in += 1
        direct = self._direct
        if direct is not None and direct.direct and self._send_direct(data, now=now):
            self._direct_packets_out += 1
            return 1
        relay = self.relay
        cipher = self._cipher
        wan = self._anchor._wan_sock
        if self.leg is None or relay is None or cipher is None or wan is None:
            self._dropped_no_route += 1
            return 1
        tail = self._tx_counter.to_bytes(8, "big")
        self._tx_counter += 1
        header = self._tx_header + tail
        packet = header + cipher.encrypt(_TX_NONCE + tail, data, header)
        # Counted as sent even when the kernel refuses it, as in `_send_wan`.
        self._last_wan_send = now
        try:
            wan.sendto(packet, relay)
        except BlockingIOError:
            self._anchor._stalled = (wan, packet, relay, self, False)
            return 1
        except OSError:
            self._send_failures += 1
            return 1
        self._wan_packets_out += 1
        return 1

    def _send_direct(self, payload: bytes, *, now: float | None, probe: bool = False) -> bool:
        """Seal `payload` for the peer and send it on the direct path; False if it failed."""
        direct, peer = self._direct, self._direct_peer
        assert direct is not None and peer is not None
        now = trio.current_time() if now is None else now
        kind = KIND_KEEPALIVE if probe else KIND_MEDIA
        packet = seal_direct(
            self._direct_key,
            self._direct_direction,
            self._direct_peer_leg,
            self._direct_tx,
            payload,
            kind=kind,
        )
        self._direct_tx += 1
        direct.on_sent(now)
        try:
            self._anchor._wan_send(packet, peer)
        except OSError:
            self._send_failures += 1
            return False
        return True

    def _send_probe(self, now: float) -> None:
        direct = self._direct
        assert direct is not None
        # §9b: one byte, 1 when we have heard the peer lately (it may then trust the path).
        flag = b"\x01" if direct.hears_peer(now) else b"\x00"
        if self._send_direct(flag, now=now, probe=True):
            self._direct_probes_sent += 1

    def _from_wan(self, data: bytes, source: Address) -> None:
        """A packet tagged with our leg: from the relay (direction 1) or, on a direct path,
        from the other office (its direction byte, 2 or 3)."""
        try:
            direction = peek_direction_untrusted(data)
        except WanPacketError:
            self._dropped_bad_auth += 1
            return
        if direction == DIRECTION_FROM_RELAY or self._direct is None:
            self._from_relay(data)
            return
        peer_direction = DIRECTION_DIRECT_OFFER + DIRECTION_DIRECT_ANSWER - self._direct_direction
        try:
            _, counter, kind, payload = open_untrusted(self._direct_key, data, peer_direction)
        except WanPacketError:
            self._dropped_bad_auth += 1
            return
        if not self._direct_window.accept(counter):
            self._dropped_replay += 1
            return
        now = trio.current_time()
        if source != self._direct_peer:
            # Only an authentic, fresh packet moves the address (as at the relay): the peer's
            # NAT may map its socket elsewhere toward us than toward the relay.
            self._anchor._log.info(
                "call %s: direct peer answers from %s, not %s", self.call_id, source,
                self._direct_peer,
            )  # fmt: skip
            self._direct_peer = (source[0], source[1])
        was_direct = self._direct.direct
        if kind == KIND_KEEPALIVE:
            self._direct_probes_in += 1
            # A probe overtaken by a newer packet says something out of date: heard, no flag.
            fresh = counter >= self._direct_window.highest
            flag = payload[:1] == b"\x01" if fresh else None
            self._direct.on_packet(now, peer_hears_us=flag)
        else:
            # The peer sends media directly only once it has confirmed the path both ways.
            self._direct.on_packet(now, peer_hears_us=True)
        if was_direct != self._direct.direct:
            self._log_path()
        self._direct_kick.set()
        if kind == KIND_KEEPALIVE:
            return
        self._direct_packets_in += 1
        self._to_phone(payload)

    def _log_path(self) -> None:
        self._anchor._log.info("call %s: audio now %s", self.call_id, self.media_path)

    def _to_phone(self, payload: bytes) -> None:
        if self._phone is None:
            self._dropped_no_route += 1
            return
        try:
            self._sock.sendto(payload, self._phone)
        except OSError:
            self._send_failures += 1
            return
        self._phone_packets_out += 1

    def _from_relay(self, data: bytes) -> None:
        try:
            _, counter, kind, payload = open_untrusted(self._key, data, DIRECTION_FROM_RELAY)
        except WanPacketError:
            self._dropped_bad_auth += 1
            return
        if not self._window.accept(counter):
            self._dropped_replay += 1
            return
        if kind == KIND_KEEPALIVE:
            self._keepalives_in += 1
            return
        self._wan_packets_in += 1
        self._to_phone(payload)

    # -- the call's task --

    async def _run(self, keepalive_interval: float) -> None:
        # The phone socket is read by the anchor's loop; this task owns its lifetime, the
        # keepalives, the relay's name and the direct path's timers.
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keepalive_loop, keepalive_interval)
                    nursery.start_soon(self._resolve_loop, keepalive_interval)
                    await self._direct_loop()
        finally:
            self._anchor._unwatch(self._sock)
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    async def _keepalive_loop(self, interval: float) -> None:
        # While the phone is silent (before it speaks, on hold, muted) the relay would forget
        # nothing, but the office NAT would: a UDP binding lasts as little as 30 s (RFC 4787
        # REQ-5 asks for 2 min; routers do less). Media itself counts as keepalive.
        while True:
            await trio.sleep_until(max(self._last_wan_send + interval, trio.current_time()))
            if self.leg is None or self.relay is None:
                await trio.sleep(interval)
            elif trio.current_time() >= self._last_wan_send + interval:
                self._send_keepalive()

    async def _direct_loop(self) -> None:
        # Probes on the direct path's timer, and the silence check that makes us fall back.
        while True:
            direct = self._direct
            if direct is None:
                await self._direct_kick.wait()
            else:
                with trio.move_on_at(direct.get_timer()):
                    await self._direct_kick.wait()
            self._direct_kick = trio.Event()
            direct = self._direct
            if direct is None:
                continue
            now = trio.current_time()
            was_direct = direct.direct
            if direct.handle_timer(now):
                self._send_probe(now)
            if was_direct != direct.direct:
                self._log_path()

    async def _resolve_loop(self, retry_interval: float) -> None:
        while True:
            await self._resolve_wanted.wait()
            self._resolve_wanted = trio.Event()
            while self._relay_name is not None:
                name = self._relay_name
                try:
                    found = await trio.socket.getaddrinfo(
                        name[0], name[1], family=self._anchor.wan_family, type=socket.SOCK_DGRAM
                    )
                except OSError as exc:  # socket.gaierror: no such name, no DNS right now
                    self._anchor._log.warning("call %s: relay %s: %s", self.call_id, name, exc)
                    await trio.sleep(retry_interval)
                    continue
                if self._relay_name != name or not found:
                    continue  # set_wan named another relay meanwhile
                self._relay_name = None
                address = found[0][4]
                self.relay = (str(address[0]), int(address[1]))
                self._send_keepalive()


@dataclass(frozen=True)
class AnchorStatistics:
    calls: int
    received: int
    dropped_malformed: int
    dropped_unknown_leg: int


class MediaAnchor:
    """One remote host's media anchor: the shared WAN socket and the calls' phone sockets.

    `serve` runs the WAN socket and owns a nursery for the calls' tasks: a call's socket lives
    exactly as long as its task, so `open_call` needs `serve` to be running.
    """

    def __init__(
        self,
        phone_side_ip: str,
        *,
        wan_ip: str = "0.0.0.0",
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        direct_timers: DirectPathTimers | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.phone_side_ip = str(ipaddress.ip_address(phone_side_ip))
        self.wan_ip = str(ipaddress.ip_address(wan_ip))
        self.wan_family = (
            socket.AF_INET6 if ipaddress.ip_address(wan_ip).version == 6 else socket.AF_INET
        )
        self.wan_port = 0
        """The WAN socket's port, once `serve` has started."""
        self.keepalive_interval = keepalive_interval
        self.direct_timers = direct_timers or DirectPathTimers()
        self._log = logger or logging.getLogger(__name__)
        self._wan_sock: socket.socket | None = None
        self._nursery: trio.Nursery | None = None
        self._calls: dict[str, CallMedia] = {}
        self._by_leg: dict[int, CallMedia] = {}
        self._spent: dict[tuple[bytes, int], int] = {}
        # The sockets the anchor's loop reads: file descriptor -> what drains it.
        self._poller: select.epoll | None = None
        self._readers: dict[int, Callable[[float], int]] = {}
        # A packet the kernel had no room for (EAGAIN): (socket, packet, address, its call,
        # True if it goes to the phone).
        self._stalled: tuple[socket.socket, bytes, Address, CallMedia, bool] | None = None
        self._wan_round = _WAN_ROUND
        self._received = 0
        self._dropped_malformed = 0
        self._dropped_unknown_leg = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the WAN socket on port 0 and relay until cancelled; started with `wan_port`."""
        sock = _udp_socket(self.wan_ip, _WAN_RECEIVE_BUFFER)
        poller = select.epoll()
        try:
            self.wan_port = sock.getsockname()[1]
            self._wan_sock = sock
            self._poller = poller
            self._watch(sock, self._drain_wan)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self.wan_port)
                await self._media_loop(poller)
        finally:
            self._nursery = None
            self._wan_sock = None
            for media in list(self._calls.values()):
                media.close()
            self._poller = None
            self._readers.clear()
            poller.close()
            sock.close()

    async def open_call(self, call_id: str) -> CallMedia:
        """Bind a phone-side socket for `call_id` (port in `local_port`)."""
        if self._nursery is None:
            raise RuntimeError("the anchor is not serving")
        if call_id in self._calls:
            raise ValueError(f"call {call_id!r} already has media")
        sock = _udp_socket(self.phone_side_ip)
        media = CallMedia(self, call_id, sock)
        self._calls[call_id] = media
        self._watch(sock, media._read_phone)
        self._nursery.start_soon(media._run, self.keepalive_interval)
        await trio.lowlevel.checkpoint()
        return media

    def call(self, call_id: str) -> CallMedia | None:
        return self._calls.get(call_id)

    def statistics(self) -> AnchorStatistics:
        return AnchorStatistics(
            calls=len(self._calls),
            received=self._received,
            dropped_malformed=self._dropped_malformed,
            dropped_unknown_leg=self._dropped_unknown_leg,
        )

    # -- for CallMedia --

    def _wan_send(self, packet: bytes, address: Address) -> None:
        if self._wan_sock is None:
            raise OSError("the anchor is not serving")
        self._wan_sock.sendto(packet, address)

    def _attach(self, media: CallMedia, leg: int, key: bytes) -> None:
        """Give `media` (leg, key), keeping its sender counter unique per (key, leg)."""
        if len(key) != KEY_SIZE:
            # Refused here, in the caller's call: later, in a call's task, it would end them all.
            raise ValueError(f"a media key is {KEY_SIZE} bytes, not {len(key)}")
        owner = self._by_leg.get(leg)
        if owner is not None and owner is not media:
            raise ValueError(f"leg {leg} is already used by call {owner.call_id!r}")
        if media.leg == leg and media._key == key:
            return
        self._retire(media)
        media.leg = leg
        media._key = key
        media._cipher = leg_cipher(key, leg)
        media._tx_header = header_prefix(KIND_MEDIA, DIRECTION_TO_RELAY, leg)
        media._tx_counter = self._spent.pop((key, leg), 0)
        # A new key (or leg) starts a new sender on the relay's side too.
        media._window = ReplayWindow()
        self._by_leg[leg] = media

    def _detach(self, media: CallMedia) -> None:
        # At once, not when the call's task ends: a closed call must not read (and seal with a
        # counter already handed back to `_spent`) another packet.
        self._unwatch(media._sock)
        self._retire(media)
        if self._calls.get(media.call_id) is media:
            del self._calls[media.call_id]

    def _retire(self, media: CallMedia) -> None:
        if media.leg is None:
            return
        if self._by_leg.get(media.leg) is media:
            del self._by_leg[media.leg]
        self._spent[(media._key, media.leg)] = media._tx_counter
        while len(self._spent) > _SPENT_LIMIT:
            del self._spent[next(iter(self._spent))]

    def _watch(self, sock: socket.socket, reader: Callable[[float], int]) -> None:
        if self._poller is None:
            raise RuntimeError("the anchor is not serving")
        self._poller.register(sock.fileno(), select.EPOLLIN)
        self._readers[sock.fileno()] = reader

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd == -1 or self._readers.pop(fd, None) is None or self._poller is None:
            return
        with contextlib.suppress(OSError):  # not registered after all: nothing to undo
            self._poller.unregister(fd)

    async def _media_loop(self, poller: select.epoll) -> None:
        # Poll the anchor's own set without waiting, serve every ready socket, and again, until
        # nothing is ready (then wait, with trio, for the set's descriptor) or a batch's worth
        # of work is done (then let other tasks run first).
        poll = poller.poll
        readers = self._readers
        while True:
            work = 0
            while work < _BATCH:
                ready = poll(0)
                if not ready:
                    break
                now = trio.current_time()
                self._wan_round = max(_WAN_ROUND, len(ready))
                for fd, _ in ready:
                    reader = readers.get(fd)
                    if reader is not None:
                        work += 1 + reader(now)
                        if self._stalled is not None:
                            break  # the rest are reported again (level-triggered)
                else:
                    work += 1
                if self._stalled is not None:
                    await self._wait_to_send()
            if work >= _BATCH:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(poller)

    async def _wait_to_send(self) -> None:
        """A send found no room: wait for it (reading nothing meanwhile, the kernel queues),
        or drop and count the packet after `_SEND_STALL` or when its call closes."""
        assert self._stalled is not None
        sock, packet, address, media, to_phone = self._stalled
        self._stalled = None
        with trio.move_on_after(_SEND_STALL):
            while True:
                try:
                    await trio.lowlevel.wait_writable(sock)
                    sock.sendto(packet, address)
                except BlockingIOError:
                    continue
                except (OSError, ValueError, trio.ClosedResourceError):
                    break  # an ICMP error, or the call's socket closed meanwhile
                if to_phone:
                    media._phone_packets_out += 1
                else:
                    media._wan_packets_out += 1
                return
        media._send_failures += 1

    def _drain_wan(self, now: float) -> int:
        """Read up to `_wan_round` datagrams from the WAN socket: from the relay, opened and sent
        to the call's phone here; anything else (the direct path, packets to refuse) through
        `CallMedia._from_wan`. The checks are `open_untrusted`'s, in its order."""
        sock = self._wan_sock
        if sock is None:
            return 0
        recvfrom = sock.recvfrom
        by_leg = self._by_leg.get
        received = 0
        for _ in range(self._wan_round):
            try:
                data, source = recvfrom(_RECEIVE_SIZE)
            except BlockingIOError:
                break
            except OSError:
                continue  # an ICMP error for an earlier send (relay unreachable)
            received += 1
            if len(data) < OVERHEAD:
                self._dropped_malformed += 1
                continue
            kind, direction, reserved, leg, counter = unpack_header(data)
            media = by_leg(leg)
            if media is None:
                self._dropped_unknown_leg += 1
                continue
            if direction != DIRECTION_FROM_RELAY:
                media._from_wan(data, source)
                continue
            if (kind != KIND_MEDIA and kind != KIND_KEEPALIVE) or reserved:
                media._dropped_bad_auth += 1
                continue
            try:
                payload = media._cipher.decrypt(  # type: ignore[union-attr]
                    _RX_NONCE + data[8:16], data[16:], data[:16]
                )
            except InvalidTag:
                media._dropped_bad_auth += 1
                continue
            if not media._window.accept(counter):
                media._dropped_replay += 1
                continue
            if kind == KIND_KEEPALIVE:
                media._keepalives_in += 1
                continue
            media._wan_packets_in += 1
            phone = media._phone
            if phone is None:
                media._dropped_no_route += 1
                continue
            try:
                media._sock.sendto(payload, phone)
            except BlockingIOError:
                self._stalled = (media._sock, payload, phone, media, True)
                break
            except OSError:
                media._send_failures += 1
                continue
            media._phone_packets_out += 1
        self._received += received
        return received
