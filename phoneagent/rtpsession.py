"""One call's RTP stream, both ways, as a pure object: packets out per tick, packets in, stats.

This module owns the media side of a call without sockets or clocks: building the audio packet
of each 20 ms tick (G.711 μ-law or A-law, RFC 3551 §4.5.14; sequence and timestamp counters,
one SSRC, RFC 3550 §5.1), interleaving RFC 4733 DTMF events with the audio (the event packets
replace the audio packets of the ticks they fall on; the media clock keeps running), reading
received packets (RTP parse, per-SSRC statistics of RFC 3550 Appendix A, duplicates counted,
DTMF digits reported once each), and playout through the jitter buffer with silence for gaps.
It does not pace, send or record: `media.py` calls `tick` every 20 ms and `receive` for each
datagram.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass

from phoneagent.audio import SILENCE_FRAME
from phoneagent.jitter import JitterBuffer
from phoneagent.tone import FRAME_SAMPLES
from shared.media.dtmf import DigitPressed, DtmfReceiver, DtmfSender, ScheduledPacket
from shared.media.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from shared.media.rtp import RtpPacket, RtpParseError, RtpReceiveStats, parse_rtp_untrusted

PTIME = 0.020
CODECS = {0: "PCMU", 8: "PCMA"}
_DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")
_RECENT = 512  # sequence numbers remembered to tell duplicates apart from new packets


@dataclass(frozen=True, slots=True)
class RtpStatistics:
    codec: str
    packets_sent: int
    packets_received: int
    packets_lost: int
    duplicates: int
    jitter_ms: float
    """RFC 3550 §6.4.1 interarrival jitter, in milliseconds."""
    late: int
    """Packets that came after their playout time (dropped by the jitter buffer)."""
    concealed: int
    """Frames played as silence because their packet never came in time."""
    dtmf_sent: str
    dtmf_received: str


def encode_frame(pcm: bytes, payload_type: int) -> bytes:
    return alaw_encode(pcm) if payload_type == 8 else ulaw_encode(pcm)


def decode_payload(payload: bytes, payload_type: int) -> bytes:
    return alaw_decode(payload) if payload_type == 8 else ulaw_decode(payload)


class RtpSession:
    """See the module docstring. `payload_type` is the negotiated audio codec (0 or 8),
    `dtmf_payload_type` the telephone-event type or None when the peer did not offer it."""

    def __init__(
        self,
        *,
        payload_type: int = 0,
        dtmf_payload_type: int | None = 101,
        ssrc: int | None = None,
        prefill: int = 3,
        max_depth: int = 50,
    ) -> None:
        if payload_type not in CODECS:
            raise ValueError(f"payload type {payload_type} is not G.711")
        self.payload_type = payload_type
        self.dtmf_payload_type = dtmf_payload_type
        self.ssrc = ssrc if ssrc is not None else secrets.randbits(32)
        self._sequence = secrets.randbits(16)  # RFC 3550 §5.1: random initial values
        self._timestamp = secrets.randbits(32)
        self.sending = True
        """False while the call is on hold (we send nothing)."""
        self.packets_sent = 0
        self._digits: deque[str] = deque()
        self._dtmf_packets: deque[RtpPacket] = deque()
        self._dtmf_gap = 0
        self.dtmf_sent = ""
        self._dtmf_sender = (
            DtmfSender(payload_type=dtmf_payload_type, ssrc=self.ssrc, packet_interval=PTIME)
            if dtmf_payload_type is not None
            else None
        )
        # receiving
        self.jitter = JitterBuffer(prefill=prefill, max_depth=max_depth)
        self._dtmf_receiver = DtmfReceiver(payload_type=dtmf_payload_type or -1)
        self._stats: RtpReceiveStats | None = None
        self._remote_ssrc: int | None = None
        self._recent: deque[int] = deque(maxlen=_RECENT)
        self._recent_set: set[int] = set()
        self.packets_received = 0
        self.duplicates = 0
        self.malformed = 0
        self._lost_before = 0  # losses of earlier SSRCs of the peer
        self.dtmf_received = ""
        self.playing = False
        self._last_frame_size = len(SILENCE_FRAME)

    @property
    def codec(self) -> str:
        return CODECS[self.payload_type]

    # -- sending --

    def send_digits(self, digits: str) -> None:
        """Queue DTMF digits (RFC 4733 events of 100 ms, 60 ms apart)."""
        if self._dtmf_sender is None:
            raise ValueError("the other side did not offer telephone-event: no DTMF")
        bad = [d for d in digits if d not in _DTMF_DIGITS]
        if bad:
            raise ValueError(f"not DTMF digits: {''.join(bad)!r}")
        self._digits.extend(digits.upper())

    @property
    def dtmf_pending(self) -> bool:
        return bool(self._digits or self._dtmf_packets)

    def tick(self, pcm: bytes) -> bytes | None:
        """The packet for this 20 ms tick (audio `pcm`, or a DTMF event packet), or None when
        we are not sending. The media clock advances either way."""
        packet = self._next_packet(pcm)
        self._timestamp = (self._timestamp + FRAME_SAMPLES) & 0xFFFFFFFF
        if packet is None:
            return None
        self.packets_sent += 1
        return packet.encode()

    def _next_packet(self, pcm: bytes) -> RtpPacket | None:
        if not self.sending:
            return None
        if not self._dtmf_packets and self._digits and self._dtmf_gap == 0:
            assert self._dtmf_sender is not None
            digit = self._digits.popleft()
            schedule: list[ScheduledPacket] = self._dtmf_sender.digit_packets(
                digit, duration=0.1, timestamp=self._timestamp, sequence=self._sequence
            )
            self._dtmf_packets.extend(p.packet for p in schedule)
            self.dtmf_sent += digit
        if self._dtmf_packets:
            packet = self._dtmf_packets.popleft()
            self._sequence = (packet.sequence + 1) & 0xFFFF
            if not self._dtmf_packets:
                self._dtmf_gap = 3  # audio between two digits, so each is heard as its own
            return packet
        if self._dtmf_gap:
            self._dtmf_gap -= 1
        packet = RtpPacket(
            payload_type=self.payload_type,
            sequence=self._sequence,
            timestamp=self._timestamp,
            ssrc=self.ssrc,
            payload=encode_frame(pcm, self.payload_type),
        )
        self._sequence = (self._sequence + 1) & 0xFFFF
        return packet

    # -- receiving --

    def receive_untrusted(self, data: bytes, now: float) -> bool:
        """Account one received datagram; False when it is not RTP we can use."""
        try:
            packet = parse_rtp_untrusted(data)
        except RtpParseError:
            self.malformed += 1
            return False
        if packet.ssrc != self._remote_ssrc:
            # A new source (the peer restarted its stream, or a re-INVITE changed it).
            if self._stats is not None:
                self._lost_before += max(0, self._stats.lost)
            self._stats = RtpReceiveStats(8000)
            self._remote_ssrc = packet.ssrc
            self._recent.clear()
            self._recent_set.clear()
        assert self._stats is not None
        self.packets_received += 1
        if packet.sequence in self._recent_set:
            self.duplicates += 1
        else:
            if len(self._recent) == self._recent.maxlen:
                self._recent_set.discard(self._recent[0])
            self._recent.append(packet.sequence)
            self._recent_set.add(packet.sequence)
        self._stats.update(packet.sequence, packet.timestamp, now)
        if self.dtmf_payload_type is not None and packet.payload_type == self.dtmf_payload_type:
            for event in self._dtmf_receiver.receive(packet, now=now):
                if isinstance(event, DigitPressed):
                    self.dtmf_received += event.digit
            # The event packet's slot is played as silence (gap concealment).
            self.jitter.push(packet.sequence, b"", None)
            return True
        if packet.payload_type in CODECS:
            self.jitter.push(packet.sequence, packet.payload, packet.payload_type)
            return True
        return False

    def play(self, now: float) -> bytes | None:
        """The next 20 ms to hear (16-bit PCM), or None while nothing has been received (or
        the buffer is refilling after a pause)."""
        for event in self._dtmf_receiver.handle_timer(now):
            if isinstance(event, DigitPressed):
                self.dtmf_received += event.digit
        frame = self.jitter.pop()
        if frame is None:
            return None
        self.playing = True
        if not frame.payload or frame.payload_type is None:
            return bytes(self._last_frame_size)
        pcm = decode_payload(frame.payload, frame.payload_type)
        self._last_frame_size = len(pcm)
        return pcm

    def drain(self) -> list[bytes]:
        """What is still buffered, for the end of a recording."""
        out = []
        for frame in self.jitter.drain():
            if frame.payload and frame.payload_type is not None:
                out.append(decode_payload(frame.payload, frame.payload_type))
            else:
                out.append(bytes(self._last_frame_size))
        return out

    @property
    def packets_lost(self) -> int:
        stats = self._stats
        current = 0
        if stats is not None:
            unique = stats.received - min(self.duplicates, stats.received)
            current = max(0, stats.expected - unique)
        return self._lost_before + current

    def statistics(self) -> RtpStatistics:
        stats = self._stats
        return RtpStatistics(
            codec=self.codec,
            packets_sent=self.packets_sent,
            packets_received=self.packets_received,
            packets_lost=self.packets_lost,
            duplicates=self.duplicates,
            jitter_ms=round((stats.jitter if stats else 0.0) / 8.0, 3),
            late=self.jitter.stats.late,
            concealed=self.jitter.stats.concealed,
            dtmf_sent=self.dtmf_sent,
            dtmf_received=self.dtmf_received,
        )
