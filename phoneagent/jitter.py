"""The receive jitter buffer: RTP packets in arrival order, audio frames out in sequence order.

This module owns one pure class, `JitterBuffer`: it extends 16-bit RTP sequence numbers
(RFC 3550 §A.1: wrap-around), reorders, drops duplicates and packets that come after their
turn to play has passed, fills gaps with a "lost" frame the caller conceals (with silence),
waits for a few packets before it starts playing (the prefill absorbs network jitter), and stays
within `max_depth` frames whatever the sender does (a jump far ahead resynchronises instead of
queueing thousands of silent frames). It does not decode audio, read the clock or pace playout:
the caller pops one frame every packet interval.
"""

from __future__ import annotations

from dataclasses import dataclass

_SEQ_MOD = 1 << 16


@dataclass(frozen=True, slots=True)
class Frame:
    """One packet interval of audio to play: `payload` None means it was lost (conceal it)."""

    sequence: int
    """Extended sequence number (RFC 3550 §A.1: cycles * 65536 + seq)."""
    payload: bytes | None
    payload_type: int | None = None


@dataclass(slots=True)
class JitterStatistics:
    pushed: int = 0
    played: int = 0
    concealed: int = 0
    """Frames handed out as lost (gaps)."""
    late: int = 0
    """Packets that arrived after their frame had been played or concealed."""
    duplicates: int = 0
    overflow: int = 0
    """Frames dropped unplayed to stay within max_depth."""
    underruns: int = 0
    """Pops that found nothing to play after playing had started."""


class JitterBuffer:
    """Reorders RTP payloads for playout; see the module docstring."""

    def __init__(self, *, prefill: int = 3, max_depth: int = 50) -> None:
        if not 1 <= prefill <= max_depth:
            raise ValueError("need 1 <= prefill <= max_depth")
        self.prefill = prefill
        self.max_depth = max_depth
        self._frames: dict[int, tuple[bytes, int | None]] = {}
        self._next: int | None = None
        """The extended sequence number of the next frame to play, once playing started."""
        self._reference: int | None = None
        """The extended number of the newest packet: what 16-bit numbers are extended against."""
        self._playing = False
        self.stats = JitterStatistics()

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def next_sequence(self) -> int | None:
        return self._next

    def _extend(self, sequence: int) -> int:
        reference = self._reference
        if reference is None:
            return sequence
        # The extended number closest to the newest one seen (within half the sequence space).
        delta = (sequence - reference) % _SEQ_MOD
        if delta >= _SEQ_MOD // 2:
            delta -= _SEQ_MOD
        return reference + delta

    def push(self, sequence: int, payload: bytes, payload_type: int | None = None) -> bool:
        """Accept one packet's payload; False when it was dropped (late, duplicate)."""
        self.stats.pushed += 1
        ext = self._extend(sequence & 0xFFFF)
        if self._next is not None and ext < self._next:
            self.stats.late += 1
            return False
        if ext in self._frames:
            self.stats.duplicates += 1
            return False
        if self._reference is None or ext > self._reference:
            self._reference = ext
        self._frames[ext] = (payload, payload_type)
        self._bound()
        return True

    def _bound(self) -> None:
        """Keep the span from the next frame to the newest within max_depth frames."""
        newest = self._reference
        assert newest is not None
        oldest_allowed = newest - self.max_depth + 1
        start = self._next if self._next is not None else min(self._frames)
        if start >= oldest_allowed:
            return
        # Drop what cannot be played in time; playing resumes at the oldest allowed frame.
        for ext in [e for e in self._frames if e < oldest_allowed]:
            del self._frames[ext]
            self.stats.overflow += 1
        if self._next is not None:
            self._next = oldest_allowed

    def pop(self) -> Frame | None:
        """The next frame to play, or None: not started yet (prefill) or nothing buffered."""
        if not self._playing:
            if len(self._frames) < self.prefill:
                return None
            self._playing = True
            if self._next is None:
                self._next = min(self._frames)
        assert self._next is not None
        if not self._frames:
            # Underrun: wait for the prefill again rather than play silence into a pause.
            self.stats.underruns += 1
            self._playing = False
            return None
        ext = self._next
        self._next = ext + 1
        stored = self._frames.pop(ext, None)
        if stored is None:
            self.stats.concealed += 1
            return Frame(ext, None)
        self.stats.played += 1
        return Frame(ext, stored[0], stored[1])

    def drain(self) -> list[Frame]:
        """Every frame still buffered, gaps included (the stream ended)."""
        out: list[Frame] = []
        if not self._frames:
            return out
        if self._next is None:
            self._next = min(self._frames)
        self._playing = True
        while self._frames:
            frame = self.pop()
            assert frame is not None
            out.append(frame)
        return out
