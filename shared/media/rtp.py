"""RTP packets (RFC 3550 §5.1) and receive statistics (RFC 3550 Appendix A).

This module owns the RTP fixed header codec, the RTP/RTCP discrimination of a multiplexed port
(RFC 5761 §4) and the per-source sequence, loss and jitter bookkeeping that feeds RTCP reception
reports. It does not parse RTCP packets, open sockets, pace sending or know codecs.

The parse path is on the relay's hot path (100k packets/s): one ``struct.unpack_from`` for the
fixed header, no regular expressions, and slices only where the packet has them.
``peek_rtp_header_untrusted`` reads only the fixed header (about 0.6 µs) for a relay that
forwards the bytes unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "ReceptionReport",
    "RtpExtension",
    "RtpHeader",
    "RtpPacket",
    "RtpParseError",
    "RtpReceiveStats",
    "is_rtcp",
    "is_rtp_or_rtcp",
    "parse_rtp_untrusted",
    "peek_rtp_header_untrusted",
]

RTP_VERSION = 2
_HEADER = struct.Struct("!BBHII")
_EXTENSION = struct.Struct("!HH")
HEADER_SIZE = _HEADER.size  # 12


class RtpParseError(Exception):
    """The bytes are not a well-formed RTP packet (the sender's fault)."""


@dataclass(frozen=True, slots=True)
class RtpExtension:
    """RFC 3550 §5.3.1 header extension: a 16-bit profile word and whole 32-bit words."""

    profile: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension: RtpExtension | None = None
    padding: int = 0
    """Number of padding octets at the end (including the count octet), 0 for none."""

    def encode(self) -> bytes:
        """The packet's bytes; raises ValueError for fields out of range."""
        if not 0 <= self.payload_type <= 127:
            raise ValueError("payload type out of range")
        if len(self.csrcs) > 15:
            raise ValueError("at most 15 CSRCs")
        if not 0 <= self.padding <= 255:
            raise ValueError("padding out of range")
        first = (
            (RTP_VERSION << 6)
            | (0x20 if self.padding else 0)
            | (0x10 if self.extension is not None else 0)
            | len(self.csrcs)
        )
        second = (0x80 if self.marker else 0) | self.payload_type
        try:
            parts = [_HEADER.pack(first, second, self.sequence, self.timestamp, self.ssrc)]
            if self.csrcs:
                parts.append(struct.pack(f"!{len(self.csrcs)}I", *self.csrcs))
        except struct.error as exc:
            raise ValueError(f"RTP field out of range: {exc}") from None
        if self.extension is not None:
            data = self.extension.data
            if len(data) % 4 or len(data) > 0xFFFF * 4:
                raise ValueError("extension data must be whole 32-bit words")
            if not 0 <= self.extension.profile <= 0xFFFF:
                raise ValueError("extension profile out of range")
            parts.append(_EXTENSION.pack(self.extension.profile, len(data) // 4))
            parts.append(data)
        parts.append(self.payload)
        if self.padding:
            # RFC 3550 §5.1: the last padding octet counts the padding, itself included.
            parts.append(bytes(self.padding - 1) + bytes((self.padding,)))
        return b"".join(parts)


def parse_rtp_untrusted(data: bytes) -> RtpPacket:
    """Parse one RTP packet; raises only RtpParseError."""
    size = len(data)
    if size < HEADER_SIZE:
        raise RtpParseError("shorter than the RTP header")
    first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != RTP_VERSION:
        raise RtpParseError("not RTP version 2")
    offset = HEADER_SIZE
    csrc_count = first & 0x0F
    csrcs: tuple[int, ...] = ()
    if csrc_count:
        offset += 4 * csrc_count
        if offset > size:
            raise RtpParseError("CSRC list runs past the packet")
        csrcs = struct.unpack_from(f"!{csrc_count}I", data, HEADER_SIZE)
    extension = None
    if first & 0x10:
        if offset + 4 > size:
            raise RtpParseError("extension header runs past the packet")
        profile, words = _EXTENSION.unpack_from(data, offset)
        offset += 4
        end = offset + 4 * words
        if end > size:
            raise RtpParseError("extension runs past the packet")
        extension = RtpExtension(profile, bytes(data[offset:end]))
        offset = end
    padding = 0
    end = size
    if first & 0x20:
        padding = data[-1]
        # RFC 3550 §5.1: the count includes itself, so 0 is invalid.
        if padding == 0 or offset + padding > size:
            raise RtpParseError("bad padding count")
        end -= padding
    return RtpPacket(
        payload_type=second & 0x7F,
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        payload=bytes(data[offset:end]),
        marker=bool(second & 0x80),
        csrcs=csrcs,
        extension=extension,
        padding=padding,
    )


class RtpHeader(NamedTuple):
    """The fixed-header fields a relay looks at, without copying the payload."""

    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int


def peek_rtp_header_untrusted(data: bytes) -> RtpHeader:
    """The fixed header of an RTP packet (the relay's fast path); raises only RtpParseError.

    Checks only the length and the version: CSRCs, extension and padding are not looked at.
    """
    if len(data) < HEADER_SIZE:
        raise RtpParseError("shorter than the RTP header")
    first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != RTP_VERSION:
        raise RtpParseError("not RTP version 2")
    return RtpHeader(second & 0x7F, second > 0x7F, sequence, timestamp, ssrc)


def is_rtp_or_rtcp(data: bytes) -> bool:
    """RFC 7983 §7: a first octet in 128..191 is RTP or RTCP (not STUN, DTLS, ZRTP)."""
    return len(data) >= 8 and 128 <= data[0] <= 191


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 §4: on a shared port, RTCP is a second octet of 192..223 (PT 64..95 + M)."""
    return len(data) >= 8 and 192 <= data[1] <= 223


# ---------------------------------------------------------------------------------------------
# RFC 3550 Appendix A.1 / A.3 / A.8

_RTP_SEQ_MOD = 1 << 16
_MAX_DROPOUT = 3000
_MAX_MISORDER = 100
_MIN_SEQUENTIAL = 2


@dataclass(frozen=True, slots=True)
class ReceptionReport:
    """The figures of one RTCP report block (RFC 3550 §6.4.1)."""

    fraction_lost: int
    """Lost fraction since the previous report, in 1/256 units (0..255)."""
    cumulative_lost: int
    """Clamped to the 24-bit signed field; negative with duplicates."""
    extended_highest_sequence: int
    jitter: int
    """Interarrival jitter in timestamp units."""


class RtpReceiveStats:
    """Sequence validation, loss and jitter for one SSRC, fed packet by packet.

    ``clock_rate`` converts arrival times (seconds, any clock, an input) into timestamp units for
    the jitter estimate. Until ``MIN_SEQUENTIAL`` packets arrive in sequence the source is on
    probation (A.1) and packets are reported as not valid.
    """

    def __init__(self, clock_rate: int) -> None:
        if clock_rate <= 0:
            raise ValueError("clock_rate must be positive")
        self.clock_rate = clock_rate
        self.max_seq = 0
        self.cycles = 0
        self.base_seq = 0
        self.bad_seq = _RTP_SEQ_MOD + 1
        self.probation = _MIN_SEQUENTIAL
        self.received = 0
        self.expected_prior = 0
        self.received_prior = 0
        self._transit: float | None = None
        self._jitter = 0.0
        self._started = False

    def _init_seq(self, seq: int) -> None:
        self.base_seq = seq
        self.max_seq = seq
        self.bad_seq = _RTP_SEQ_MOD + 1
        self.cycles = 0
        self.received = 0
        self.received_prior = 0
        self.expected_prior = 0

    def update(self, sequence: int, timestamp: int, arrival: float) -> bool:
        """Account one packet; return False for a packet to discard (probation, far jump)."""
        valid = self._update_seq(sequence)
        if valid:
            self._update_jitter(timestamp, arrival)
        return valid

    def _update_seq(self, seq: int) -> bool:
        # RFC 3550 A.1, update_seq().
        if not self._started:
            self._started = True
            self._init_seq(seq)
            self.max_seq = (seq - 1) % _RTP_SEQ_MOD
            self.probation = _MIN_SEQUENTIAL
        udelta = (seq - self.max_seq) % _RTP_SEQ_MOD
        if self.probation:
            # Only a run of sequential packets makes the source valid.
            if seq == (self.max_seq + 1) % _RTP_SEQ_MOD:
                self.probation -= 1
                self.max_seq = seq
                if self.probation == 0:
                    self._init_seq(seq)
                    self.received += 1
                    return True
            else:
                self.probation = _MIN_SEQUENTIAL - 1
                self.max_seq = seq
            return False
        if udelta < _MAX_DROPOUT:
            # In order, with a permissible gap.
            if seq < self.max_seq:
                self.cycles += _RTP_SEQ_MOD
            self.max_seq = seq
        elif udelta <= _RTP_SEQ_MOD - _MAX_MISORDER:
            # A very large jump: twice in a row means the sender restarted its sequence.
            if seq == self.bad_seq:
                self._init_seq(seq)
            else:
                self.bad_seq = (seq + 1) % _RTP_SEQ_MOD
                return False
        # else: duplicate or reordered packet, counted below.
        self.received += 1
        return True

    def _update_jitter(self, timestamp: int, arrival: float) -> None:
        # RFC 3550 A.8: J += (|D| - J) / 16, D the change of relative transit time.
        transit = arrival * self.clock_rate - timestamp
        if self._transit is not None:
            d = transit - self._transit
            # Timestamps wrap at 2**32: take the shortest distance.
            d = (d + 2**31) % 2**32 - 2**31
            self._jitter += (abs(d) - self._jitter) / 16
        self._transit = transit

    @property
    def extended_max_sequence(self) -> int:
        return self.cycles + self.max_seq

    @property
    def expected(self) -> int:
        # RFC 3550 A.3; nothing is expected from a source still on probation.
        if not self._started or self.probation:
            return 0
        return self.extended_max_sequence - self.base_seq + 1

    @property
    def lost(self) -> int:
        return self.expected - self.received

    @property
    def jitter(self) -> float:
        return self._jitter

    def report(self) -> ReceptionReport:
        """Figures for a report block; starts a new interval for fraction_lost (A.3)."""
        expected = self.expected
        expected_interval = expected - self.expected_prior
        self.expected_prior = expected
        received_interval = self.received - self.received_prior
        self.received_prior = self.received
        lost_interval = expected_interval - received_interval
        if expected_interval == 0 or lost_interval <= 0:
            fraction = 0
        else:
            fraction = (lost_interval << 8) // expected_interval
        # RFC 3550 §6.4.1: cumulative loss is a 24-bit signed field; clamp.
        lost = max(-(1 << 23), min(self.lost, (1 << 23) - 1))
        return ReceptionReport(
            fraction_lost=min(fraction, 255),
            cumulative_lost=lost,
            extended_highest_sequence=self.extended_max_sequence & 0xFFFFFFFF,
            jitter=int(self._jitter),
        )
