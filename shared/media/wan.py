"""The WAN media packet: RTP between a remote host and the main host's relay, sealed.

This module owns the packet format of docs/wire-protocol.md §9a, sealing and opening one
packet with AES-256-GCM (`cryptography`'s AESGCM: a vetted AEAD, not our own crypto), and the
sliding replay window (RFC 3711 §3.3.2). It does not own sockets, addresses, keys' lifetimes or
who may talk to whom: that is the relay's (`mainhost.relay`) and the anchor's
(`remotehost.anchor`) business. Time plays no part here.

Layout (16 header bytes, all of them authenticated as associated data)::

     0       1          2 3        4 ... 7    8 ......... 15   16 ...
    +-------+----------+--------+----------+--------------+--------------------------+
    | kind  | direction| 0 0    | leg u32  | counter u64  | ciphertext of RTP | tag16 |
    +-------+----------+--------+----------+--------------+--------------------------+

    kind       1 media (an RTP or RTCP packet), 2 keepalive/probe (payload usually empty)
    direction  0 remote host -> relay, 1 relay -> remote host; on a direct path between two
               remote hosts (F4, §9b) 2 from the calling office's host, 3 from the called one's
    nonce      direction byte | 00 00 00 | counter (12 bytes)

Every leg has its own AES key, ``HMAC-SHA256(media_key, "bpx-wan-leg-v1|" | leg)``. The login's
media key is shared by all the calls of one office, and the relay numbers each leg's packets
from 0: without a key per leg, two calls of one office would seal different audio under the
same (key, nonce), which in GCM leaks the XOR of the plaintexts and the authentication key
(NIST SP 800-38D §8). With it, a nonce is unique as long as one sender owns each
(media key, leg, direction) and never sends a counter twice; the direction byte keeps the two
senders of one leg apart. This is SRTP's answer too (RFC 3711 §4.1.1: the SSRC is in the IV).

A direct path (F4) uses the same format under its own key, fresh from the main host for each
call: each side tags its packets with the receiver's relay leg (so the receiver finds the call as
it does for the relay's packets) and seals with its own direction byte, 2 or 3, so that the two
senders never share a nonce even though both hold the same key.

The per-packet cost is one dictionary look-up for the cached AESGCM object and one AEAD
operation; deriving a leg key happens once per (key, leg).

Hot paths (the relay's and the anchor's per-packet loops) keep a leg's `leg_cipher` and its
`header_prefix` and build each packet from the pieces this module defines, without a call per
field: the header is ``header_prefix(kind, direction, leg) + counter.to_bytes(8, "big")``, the
nonce ``nonce_prefix(direction) + counter.to_bytes(8, "big")``, and `unpack_header` reads all
five fields of a received packet at once. `seal` and `open_untrusted` are the reference the
tests hold those loops to.
"""

from __future__ import annotations

import enum
import hmac
import struct
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DIRECTION_DIRECT_ANSWER",
    "DIRECTION_DIRECT_OFFER",
    "DIRECTION_FROM_RELAY",
    "DIRECTION_TO_RELAY",
    "HEADER_SIZE",
    "KEY_SIZE",
    "KIND_KEEPALIVE",
    "KIND_MEDIA",
    "OVERHEAD",
    "ReplayWindow",
    "WanDefect",
    "WanPacket",
    "WanPacketError",
    "header_prefix",
    "leg_cipher",
    "nonce_prefix",
    "open_untrusted",
    "peek_direction_untrusted",
    "peek_leg_untrusted",
    "seal",
    "seal_direct",
    "seal_keepalive",
    "unpack_header",
]

KIND_MEDIA = 1
KIND_KEEPALIVE = 2
DIRECTION_TO_RELAY = 0
DIRECTION_FROM_RELAY = 1
DIRECTION_DIRECT_OFFER = 2
"""Sealed by the calling office's remote host on a direct path (F4)."""
DIRECTION_DIRECT_ANSWER = 3
"""Sealed by the called office's remote host on a direct path (F4)."""
KEY_SIZE = 32
TAG_SIZE = 16
_HEADER = struct.Struct("!BBHIQ")
_NONCE = struct.Struct("!B3xQ")  # direction, three zero bytes, counter
HEADER_SIZE = _HEADER.size  # 16
OVERHEAD = HEADER_SIZE + TAG_SIZE
"""Bytes a sealed packet adds to its payload (32)."""
MAX_COUNTER = (1 << 64) - 1
MAX_LEG = (1 << 32) - 1
DEFAULT_REPLAY_WINDOW = 1024
"""Packets: RFC 3711 §3.3.2 asks for at least 64; wider costs nothing with an int bitmap and
tolerates more reordering on a bad WAN path (1024 packets of 20 ms is 20 s)."""

_LEG_LABEL = b"bpx-wan-leg-v1|"
_CACHE_LIMIT = 4096
_ciphers: dict[tuple[bytes, int], AESGCM] = {}


class WanDefect(enum.Enum):
    """Why a packet was refused, for the receiver's drop counters."""

    MALFORMED = "malformed"
    WRONG_DIRECTION = "wrong-direction"
    BAD_TAG = "bad-tag"


class WanPacketError(Exception):
    """The bytes are not an authentic WAN media packet for us (the sender's fault)."""

    def __init__(self, defect: WanDefect, detail: str) -> None:
        super().__init__(detail)
        self.defect = defect


class WanPacket(NamedTuple):
    leg: int
    counter: int
    kind: int
    payload: bytes


def _cipher(key: bytes, leg: int) -> AESGCM:
    cipher = _ciphers.get((key, leg))
    if cipher is None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a media key is {KEY_SIZE} bytes, not {len(key)}")
        if len(_ciphers) >= _CACHE_LIMIT:
            # Keys change at every login and legs at every call: forget them all at once rather
            # than track ages; re-deriving costs one HMAC per live leg.
            _ciphers.clear()
        leg_key = hmac.digest(key, _LEG_LABEL + leg.to_bytes(4, "big"), "sha256")
        cipher = _ciphers[(bytes(key), leg)] = AESGCM(leg_key)
    return cipher


def leg_cipher(key: bytes, leg: int) -> AESGCM:
    """The AEAD of `leg` under the login's media `key` (its derived leg key), for a hot path
    to keep per leg; ValueError for a key of the wrong size (our bug, not the peer's)."""
    return _ciphers.get((key, leg)) or _cipher(key, leg)


def header_prefix(kind: int, direction: int, leg: int) -> bytes:
    """The first 8 header bytes of `leg`'s packets of `kind` in `direction`; the counter's 8
    big-endian bytes complete the header."""
    if kind not in (KIND_MEDIA, KIND_KEEPALIVE):
        raise ValueError("kind must be 1 (media) or 2 (keepalive)")
    if not 0 <= direction <= DIRECTION_DIRECT_ANSWER:
        raise ValueError("direction out of range")
    if not 0 <= leg <= MAX_LEG:
        raise ValueError("leg out of range")
    return _HEADER.pack(kind, direction, 0, leg, 0)[:8]


def nonce_prefix(direction: int) -> bytes:
    """The first 4 nonce bytes of packets in `direction`; the counter's 8 bytes complete it."""
    if not 0 <= direction <= DIRECTION_DIRECT_ANSWER:
        raise ValueError("direction out of range")
    return _NONCE.pack(direction, 0)[:4]


unpack_header = _HEADER.unpack_from
"""(kind, direction, reserved, leg, counter) of a packet at least `HEADER_SIZE` long: check the
length first (struct.error otherwise), then the fields, as `open_untrusted` does."""


def seal(
    key: bytes, direction: int, leg: int, counter: int, payload: bytes, *, kind: int = KIND_MEDIA
) -> bytes:
    """One sealed packet. The caller owns `counter`: never the same twice per (key, leg,
    direction). Raises ValueError for arguments out of range (our bug, not the peer's)."""
    if direction not in (DIRECTION_TO_RELAY, DIRECTION_FROM_RELAY):
        raise ValueError("direction must be 0 or 1")
    return _seal(key, direction, leg, counter, payload, kind)


def seal_direct(
    key: bytes, direction: int, leg: int, counter: int, payload: bytes, *, kind: int = KIND_MEDIA
) -> bytes:
    """One packet on a direct path between two remote hosts (F4): `direction` is 2 or 3, `leg`
    the receiver's relay leg, `key` the call's direct key. Same rules as `seal` otherwise.

    Apart from `seal` so that a relay leg's code can never seal with a direct direction byte
    by mistake, and the other way round.
    """
    if direction not in (DIRECTION_DIRECT_OFFER, DIRECTION_DIRECT_ANSWER):
        raise ValueError("a direct path's direction is 2 or 3")
    return _seal(key, direction, leg, counter, payload, kind)


def _seal(key: bytes, direction: int, leg: int, counter: int, payload: bytes, kind: int) -> bytes:
    if kind not in (KIND_MEDIA, KIND_KEEPALIVE):
        raise ValueError("kind must be 1 (media) or 2 (keepalive)")
    if not 0 <= leg <= MAX_LEG:
        raise ValueError("leg out of range")
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError("counter out of range")
    header = _HEADER.pack(kind, direction, 0, leg, counter)
    cipher = _ciphers.get((key, leg)) or _cipher(key, leg)
    return header + cipher.encrypt(_NONCE.pack(direction, counter), payload, header)


def seal_keepalive(key: bytes, direction: int, leg: int, counter: int) -> bytes:
    """An authenticated keepalive: it teaches the relay our address and keeps NAT open."""
    return seal(key, direction, leg, counter, b"", kind=KIND_KEEPALIVE)


def peek_leg_untrusted(packet: bytes) -> int:
    """The leg id, before any cryptography, to find the key; raises only WanPacketError.

    Nothing here is authentic until `open_untrusted` has checked the tag.
    """
    if len(packet) < OVERHEAD:
        raise WanPacketError(WanDefect.MALFORMED, "shorter than a sealed packet")
    return int.from_bytes(packet[4:8], "big")


def peek_direction_untrusted(packet: bytes) -> int:
    """The direction byte, before any cryptography, to choose the key (relay or direct);
    raises only WanPacketError. Not authentic until `open_untrusted` has checked the tag."""
    if len(packet) < OVERHEAD:
        raise WanPacketError(WanDefect.MALFORMED, "shorter than a sealed packet")
    return packet[1]


def open_untrusted(key: bytes, packet: bytes, expected_direction: int) -> WanPacket:
    """Check and decrypt one packet; raises only WanPacketError (ValueError for a bad `key`).

    The counter is returned unchecked: the replay window is the caller's, per leg, because only
    the caller knows which leg a packet is for.
    """
    if len(packet) < OVERHEAD:
        raise WanPacketError(WanDefect.MALFORMED, "shorter than a sealed packet")
    kind, direction, reserved, leg, counter = _HEADER.unpack_from(packet)
    if kind != KIND_MEDIA and kind != KIND_KEEPALIVE:
        raise WanPacketError(WanDefect.MALFORMED, f"unknown kind {kind}")
    if reserved:
        raise WanPacketError(WanDefect.MALFORMED, "reserved bits set")
    if direction != expected_direction:
        # A packet reflected back at its sender: refused before spending an AEAD operation.
        raise WanPacketError(WanDefect.WRONG_DIRECTION, f"direction {direction}")
    cipher = _ciphers.get((key, leg)) or _cipher(key, leg)
    try:
        payload = cipher.decrypt(
            _NONCE.pack(direction, counter), packet[HEADER_SIZE:], packet[:HEADER_SIZE]
        )
    except InvalidTag:
        raise WanPacketError(WanDefect.BAD_TAG, "authentication failed") from None
    return WanPacket(leg, counter, kind, payload)


class ReplayWindow:
    """RFC 3711 §3.3.2 sliding window over one sender's counters, `size` packets wide.

    A counter is accepted once, and only if it is newer than ``highest - size``. `check` first
    (it is cheap), open the packet, then `update` with the authenticated counter only, so a
    forged packet cannot move the window (RFC 3711 §3.3: the update follows authentication).
    """

    __slots__ = ("_bits", "_mask", "highest", "size")

    def __init__(self, size: int = DEFAULT_REPLAY_WINDOW) -> None:
        if size < 64:
            raise ValueError("RFC 3711 §3.3.2: the replay window is at least 64 packets")
        self.size = size
        self.highest = -1
        """The highest counter accepted, -1 before the first."""
        self._bits = 0  # bit i set: counter `highest - i` was accepted
        self._mask = (1 << size) - 1

    def check(self, counter: int) -> bool:
        """Would `counter` be accepted (not seen, not too old)?"""
        delta = self.highest - counter
        if delta < 0:
            return True
        if delta >= self.size:
            return False
        return not (self._bits >> delta) & 1

    def update(self, counter: int) -> None:
        """Record an authenticated counter that `check` accepted."""
        delta = counter - self.highest
        if delta > 0:
            self._bits = ((self._bits << delta) | 1) & self._mask if delta < self.size else 1
            self.highest = counter
        else:
            self._bits |= 1 << -delta

    def accept(self, counter: int) -> bool:
        """`check` and, if it passes, `update`: for a counter already authenticated.

        Written out rather than calling the two (it runs for every packet of every leg)."""
        delta = counter - self.highest
        if delta > 0:
            self._bits = ((self._bits << delta) | 1) & self._mask if delta < self.size else 1
            self.highest = counter
            return True
        if -delta >= self.size or (self._bits >> -delta) & 1:
            return False
        self._bits |= 1 << -delta
        return True
