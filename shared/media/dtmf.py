"""RFC 4733 telephone-events: the payload codec and a pure sender and receiver for DTMF digits.

This module owns the 4-octet event payload (RFC 4733 §2.3), the packet schedule of one digit
(start with the marker bit, duration updates, the end packet sent three times, §2.5.1) and the
reduction of a received packet stream, with losses, duplicates and reordering, to one press and
one release per digit (§2.5.2). It does not negotiate the payload type (SDP does), own the RTP
sequence/timestamp counters of the audio stream (the caller hands them in) or send anything.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from shared.media.rtp import RtpPacket

__all__ = [
    "DIGIT_EVENTS",
    "DigitPressed",
    "DigitReleased",
    "DtmfParseError",
    "DtmfReceiver",
    "DtmfSender",
    "ScheduledPacket",
    "TelephoneEvent",
    "parse_telephone_event_untrusted",
]

_EVENT = struct.Struct("!BBH")

# RFC 4733 §3.2 Table 7: DTMF named events.
DIGIT_EVENTS: dict[str, int] = {
    **{str(digit): digit for digit in range(10)},
    "*": 10,
    "#": 11,
    "A": 12,
    "B": 13,
    "C": 14,
    "D": 15,
}
EVENT_DIGITS: dict[int, str] = {code: digit for digit, code in DIGIT_EVENTS.items()}
FLASH_EVENT = 16  # RFC 4733 §3.2: hook flash; reported with the digit "!" as SIPp and others do
EVENT_DIGITS[FLASH_EVENT] = "!"


class DtmfParseError(Exception):
    """The payload is not a telephone-event (the sender's fault)."""


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """RFC 4733 §2.3 payload: event code, end bit, volume (-dBm0, 0..63), duration."""

    event: int
    end: bool = False
    volume: int = 10
    duration: int = 0
    """In RTP timestamp units since the event began."""

    def encode(self) -> bytes:
        if not 0 <= self.event <= 255:
            raise ValueError("event out of range")
        if not 0 <= self.volume <= 63:
            raise ValueError("volume out of range")
        if not 0 <= self.duration <= 0xFFFF:
            raise ValueError("duration out of range")
        # The R bit is reserved: sent as 0, ignored on receipt.
        return _EVENT.pack(self.event, (0x80 if self.end else 0) | self.volume, self.duration)

    @property
    def digit(self) -> str | None:
        return EVENT_DIGITS.get(self.event)


def parse_telephone_event_untrusted(payload: bytes) -> TelephoneEvent:
    """Parse the first event of a telephone-event payload; raises only DtmfParseError.

    RFC 4733 §2.3: a payload carries one event; a longer payload (RFC 2198 redundancy is
    negotiated separately) is read for its first 4 octets.
    """
    if len(payload) < 4:
        raise DtmfParseError("telephone-event payload shorter than 4 octets")
    event, flags, duration = _EVENT.unpack_from(payload)
    return TelephoneEvent(
        event=event, end=bool(flags & 0x80), volume=flags & 0x3F, duration=duration
    )


@dataclass(frozen=True, slots=True)
class ScheduledPacket:
    """A packet to send ``offset`` seconds after the digit starts."""

    offset: float
    packet: RtpPacket


class DtmfSender:
    """Builds the RTP packets of one digit (RFC 4733 §2.5.1).

    The first packet carries the marker bit; every packet of the event has the event's start
    timestamp and a growing duration; the end packet goes out three times (§2.5.1.4) with new
    sequence numbers but the same timestamp and duration.
    """

    def __init__(
        self,
        *,
        payload_type: int = 101,
        ssrc: int,
        clock_rate: int = 8000,
        packet_interval: float = 0.05,
        volume: int = 10,
    ) -> None:
        if not 96 <= payload_type <= 127:
            raise ValueError("telephone-event uses a dynamic payload type (96..127)")
        if packet_interval <= 0:
            raise ValueError("packet_interval must be positive")
        self.payload_type = payload_type
        self.ssrc = ssrc
        self.clock_rate = clock_rate
        self.packet_interval = packet_interval
        self.volume = volume

    def digit_packets(
        self, digit: str, *, duration: float, timestamp: int, sequence: int
    ) -> list[ScheduledPacket]:
        """The packets of ``digit`` lasting ``duration`` seconds.

        ``timestamp`` is the RTP timestamp of the event start (the media clock now) and
        ``sequence`` the next sequence number of the stream; the caller advances its own
        counters by ``len(result)`` sequence numbers afterwards.
        """
        event = DIGIT_EVENTS.get(digit.upper())
        if event is None and digit == "!":
            event = FLASH_EVENT
        if event is None:
            raise ValueError(f"not a DTMF digit: {digit!r}")
        total = round(duration * self.clock_rate)
        if not 0 < total <= 0xFFFF:
            # RFC 4733 §2.5.1.3 splits longer events into segments; a key press never needs it.
            raise ValueError("duration must be positive and fit 16 bits of timestamp units")
        step = max(1, round(self.packet_interval * self.clock_rate))
        durations = list(range(step, total, step))
        # The first packet reports the time elapsed so far; the end packet the full length.
        schedule: list[tuple[int, bool]] = [(d, False) for d in durations]
        schedule += [(total, True)] * 3
        packets = []
        for index, (elapsed, end) in enumerate(schedule):
            payload = TelephoneEvent(event, end=end, volume=self.volume, duration=elapsed)
            packet = RtpPacket(
                payload_type=self.payload_type,
                sequence=(sequence + index) & 0xFFFF,
                timestamp=timestamp & 0xFFFFFFFF,
                ssrc=self.ssrc,
                payload=payload.encode(),
                marker=index == 0,
            )
            packets.append(ScheduledPacket(offset=index * self.packet_interval, packet=packet))
        return packets


@dataclass(frozen=True, slots=True)
class DigitPressed:
    digit: str
    event: int
    timestamp: int
    """RTP timestamp of the event start: the event's identity in the stream."""


@dataclass(frozen=True, slots=True)
class DigitReleased:
    digit: str
    event: int
    timestamp: int
    duration: int
    """In timestamp units; the longest seen if the end packets were all lost."""


DtmfEvent = DigitPressed | DigitReleased


class DtmfReceiver:
    """Turns telephone-event packets into one press and one release per digit (RFC 4733 §2.5.2).

    An event is identified by its RTP timestamp (§2.5.1.2: all packets of one event carry the
    start timestamp). A press is reported on the first packet of a new event, whether or not it
    had the marker (the start may be lost); a release on its first end packet, or when a newer
    event begins while it has not ended, or when its packets stop for ``hold_timeout`` seconds
    (all end packets lost and nothing follows: see get_timer/handle_timer). Recently finished
    events are remembered (bounded) so late duplicates and the repeated end packets report
    nothing.
    """

    def __init__(
        self, *, payload_type: int = 101, remember: int = 32, hold_timeout: float = 0.5
    ) -> None:
        self.payload_type = payload_type
        self.hold_timeout = hold_timeout
        self._current: tuple[int, int, int, int] | None = None  # ssrc, timestamp, event, duration
        self._last_packet = 0.0
        self._finished: deque[tuple[int, int]] = deque(maxlen=remember)
        self.ignored = 0
        """Packets dropped: malformed payloads and unknown events."""

    def receive(self, packet: RtpPacket, *, now: float) -> list[DtmfEvent]:
        """Account one packet of the stream (other payload types are ignored)."""
        if packet.payload_type != self.payload_type:
            return []
        try:
            tone = parse_telephone_event_untrusted(packet.payload)
        except DtmfParseError:
            self.ignored += 1
            return []
        digit = tone.digit
        if digit is None:
            self.ignored += 1
            return []
        key = (packet.ssrc, packet.timestamp)
        if key in self._finished:
            return []
        events: list[DtmfEvent] = []
        current = self._current
        self._last_packet = now
        if current is not None and (current[0], current[1]) == key:
            duration = max(current[3], tone.duration)
            self._current = (current[0], current[1], current[2], duration)
        else:
            if current is not None:
                # A new event began before the previous one's end arrived: all its end
                # packets were lost.
                events.append(self._release(current))
            events.append(DigitPressed(digit, tone.event, packet.timestamp))
            self._current = (packet.ssrc, packet.timestamp, tone.event, tone.duration)
        if tone.end:
            assert self._current is not None
            events.append(self._release(self._current))
        return events

    def _release(self, current: tuple[int, int, int, int]) -> DigitReleased:
        ssrc, timestamp, event, duration = current
        self._finished.append((ssrc, timestamp))
        self._current = None
        return DigitReleased(EVENT_DIGITS[event], event, timestamp, duration)

    def get_timer(self) -> float | None:
        """When to call handle_timer: the time a held digit is given up, or None."""
        if self._current is None:
            return None
        return self._last_packet + self.hold_timeout

    def handle_timer(self, now: float) -> list[DtmfEvent]:
        """Release a held digit whose packets stopped (its end packets were all lost)."""
        deadline = self.get_timer()
        if deadline is None or now < deadline:
            return []
        return self.flush()

    def flush(self) -> list[DtmfEvent]:
        """Release a digit still held (the stream ended or timed out without end packets)."""
        if self._current is None:
            return []
        return [self._release(self._current)]
