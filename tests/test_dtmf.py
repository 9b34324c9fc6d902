"""Tests for shared.media.dtmf: RFC 4733 payload codec, sender schedule, receiver dedup."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.media.dtmf import (
    DIGIT_EVENTS,
    DigitPressed,
    DigitReleased,
    DtmfParseError,
    DtmfReceiver,
    DtmfSender,
    TelephoneEvent,
    parse_telephone_event_untrusted,
)
from shared.media.rtp import RtpPacket, parse_rtp_untrusted

SSRC = 0x11223344


def test_payload_layout() -> None:
    # RFC 4733 §2.3: event (8) | E R volume(6) | duration (16).
    assert TelephoneEvent(5, end=False, volume=10, duration=400).encode() == b"\x05\x0a\x01\x90"
    assert TelephoneEvent(11, end=True, volume=63, duration=0xFFFF).encode() == b"\x0b\xbf\xff\xff"


def test_parse_ignores_reserved_bit_and_trailing_octets() -> None:
    tone = parse_telephone_event_untrusted(b"\x0a\xca\x03\x20" + b"junk")
    assert tone == TelephoneEvent(10, end=True, volume=10, duration=800)
    assert tone.digit == "*"


def test_parse_rejects_short() -> None:
    for payload in (b"", b"\x01", b"\x01\x02\x03"):
        with pytest.raises(DtmfParseError):
            parse_telephone_event_untrusted(payload)


def test_encode_validates() -> None:
    for bad in (
        TelephoneEvent(256),
        TelephoneEvent(1, volume=64),
        TelephoneEvent(1, duration=70000),
        TelephoneEvent(-1),
    ):
        with pytest.raises(ValueError):
            bad.encode()


def test_digit_table() -> None:
    # RFC 4733 Table 7.
    assert DIGIT_EVENTS["0"] == 0
    assert DIGIT_EVENTS["9"] == 9
    assert DIGIT_EVENTS["*"] == 10
    assert DIGIT_EVENTS["#"] == 11
    assert DIGIT_EVENTS["D"] == 15
    assert TelephoneEvent(16).digit == "!"
    assert TelephoneEvent(17).digit is None


events = st.builds(
    TelephoneEvent,
    st.integers(0, 255),
    st.booleans(),
    st.integers(0, 63),
    st.integers(0, 0xFFFF),
)


@given(event=events)
def test_round_trip(event: TelephoneEvent) -> None:
    assert parse_telephone_event_untrusted(event.encode()) == event


@given(payload=st.binary(max_size=12))
def test_fuzz_parse_raises_only_parse_error(payload: bytes) -> None:
    try:
        tone = parse_telephone_event_untrusted(payload)
    except DtmfParseError:
        return
    assert tone.encode()[:1] == payload[:1]


# -- sender ------------------------------------------------------------------------------------


def test_sender_schedule_follows_rfc4733() -> None:
    sender = DtmfSender(payload_type=101, ssrc=SSRC, packet_interval=0.05)
    scheduled = sender.digit_packets("5", duration=0.2, timestamp=16000, sequence=65534)
    packets = [item.packet for item in scheduled]
    tones = [parse_telephone_event_untrusted(p.payload) for p in packets]
    # 200 ms at 8 kHz is 1600 units; updates every 400 units, then the end packet three times.
    assert [t.duration for t in tones] == [400, 800, 1200, 1600, 1600, 1600]
    assert [t.end for t in tones] == [False, False, False, True, True, True]
    assert {t.event for t in tones} == {5}
    assert [p.marker for p in packets] == [True] + [False] * 5
    assert {p.timestamp for p in packets} == {16000}
    assert [p.sequence for p in packets] == [65534, 65535, 0, 1, 2, 3]
    assert {p.payload_type for p in packets} == {101}
    assert {p.ssrc for p in packets} == {SSRC}
    assert [item.offset for item in scheduled] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2, 0.25])
    for packet in packets:
        assert parse_rtp_untrusted(packet.encode()) == packet


def test_sender_short_digit_is_only_end_packets() -> None:
    sender = DtmfSender(ssrc=SSRC, packet_interval=0.05)
    packets = [s.packet for s in sender.digit_packets("#", duration=0.03, timestamp=0, sequence=0)]
    assert len(packets) == 3
    assert packets[0].marker
    assert all(parse_telephone_event_untrusted(p.payload).end for p in packets)


def test_sender_rejects_bad_input() -> None:
    sender = DtmfSender(ssrc=SSRC)
    with pytest.raises(ValueError):
        sender.digit_packets("x", duration=0.1, timestamp=0, sequence=0)
    with pytest.raises(ValueError):
        sender.digit_packets("1", duration=0, timestamp=0, sequence=0)
    with pytest.raises(ValueError):
        sender.digit_packets("1", duration=9.0, timestamp=0, sequence=0)
    with pytest.raises(ValueError):
        DtmfSender(ssrc=SSRC, payload_type=8)
    with pytest.raises(ValueError):
        DtmfSender(ssrc=SSRC, packet_interval=0)


def test_sender_lowercase_and_flash() -> None:
    sender = DtmfSender(ssrc=SSRC)
    packet = sender.digit_packets("a", duration=0.1, timestamp=0, sequence=0)[0].packet
    assert parse_telephone_event_untrusted(packet.payload).event == 12
    packet = sender.digit_packets("!", duration=0.1, timestamp=0, sequence=0)[0].packet
    assert parse_telephone_event_untrusted(packet.payload).event == 16


# -- receiver ----------------------------------------------------------------------------------


def digit_stream(digits: str, *, sender: DtmfSender | None = None) -> list[RtpPacket]:
    sender = sender or DtmfSender(ssrc=SSRC, packet_interval=0.02)
    packets: list[RtpPacket] = []
    timestamp = 1000
    sequence = 500
    for digit in digits:
        scheduled = sender.digit_packets(
            digit, duration=0.1, timestamp=timestamp, sequence=sequence
        )
        packets += [s.packet for s in scheduled]
        sequence += len(scheduled)
        timestamp += 8000  # next digit a second later
    return packets


def run(receiver: DtmfReceiver, packets: list[RtpPacket]) -> list[DigitPressed | DigitReleased]:
    out: list[DigitPressed | DigitReleased] = []
    for index, packet in enumerate(packets):
        out += receiver.receive(packet, now=index * 0.02)
    return out + receiver.flush()


def pressed(events: list[DigitPressed | DigitReleased]) -> str:
    return "".join(e.digit for e in events if isinstance(e, DigitPressed))


def test_receiver_clean_stream() -> None:
    events = run(DtmfReceiver(), digit_stream("123#"))
    assert pressed(events) == "123#"
    released = [e for e in events if isinstance(e, DigitReleased)]
    assert [e.digit for e in released] == list("123#")
    assert {e.duration for e in released} == {800}
    # Each press comes before its release.
    assert [type(e).__name__ for e in events] == ["DigitPressed", "DigitReleased"] * 4


def test_receiver_same_digit_twice() -> None:
    assert pressed(run(DtmfReceiver(), digit_stream("55"))) == "55"


def test_receiver_lost_start_and_lost_ends() -> None:
    packets = digit_stream("78")
    first_end = next(
        i for i, p in enumerate(packets) if parse_telephone_event_untrusted(p.payload).end
    )
    # Drop the start of "7" and all three of its end packets.
    kept = [p for i, p in enumerate(packets) if i != 0 and not first_end <= i < first_end + 3]
    events = run(DtmfReceiver(), kept)
    assert pressed(events) == "78"
    released = [e for e in events if isinstance(e, DigitReleased)]
    assert [e.digit for e in released] == ["7", "8"]
    # The release of "7" came when "8" began, with the longest duration seen.
    assert released[0].duration == 640


def test_receiver_ignores_other_payload_types_and_garbage() -> None:
    receiver = DtmfReceiver(payload_type=101)
    audio = RtpPacket(
        payload_type=0, sequence=1, timestamp=1, ssrc=SSRC, payload=b"\x05\x00\x00\x00"
    )
    assert receiver.receive(audio, now=0.0) == []
    short = RtpPacket(payload_type=101, sequence=1, timestamp=1, ssrc=SSRC, payload=b"\x05")
    unknown = RtpPacket(
        payload_type=101, sequence=2, timestamp=1, ssrc=SSRC, payload=b"\x40\x00\x00\x10"
    )
    assert receiver.receive(short, now=0.0) == []
    assert receiver.receive(unknown, now=0.0) == []
    assert receiver.ignored == 2


def test_receiver_late_duplicate_of_finished_event() -> None:
    packets = digit_stream("12")
    receiver = DtmfReceiver()
    events = run(receiver, packets)
    # A straggler of "1" arrives long after: nothing new.
    assert receiver.receive(packets[1], now=10.0) == []
    assert pressed(events) == "12"


def test_receiver_flush_without_digit() -> None:
    assert DtmfReceiver().flush() == []


@settings(max_examples=150)
@given(
    digits=st.text(alphabet="0123456789*#ABCD", min_size=1, max_size=8),
    seed=st.integers(0, 2**32),
    drop=st.floats(0, 0.5),
    dup=st.floats(0, 0.5),
)
def test_terrible_network_each_digit_once(digits: str, seed: int, drop: float, dup: float) -> None:
    """Drop, duplicate and reorder within a digit: each digit that left any packet is reported
    exactly once, in order, and released exactly once."""
    rng = random.Random(seed)
    packets = digit_stream(digits)
    by_digit: list[list[RtpPacket]] = []
    for packet in packets:
        if not by_digit or by_digit[-1][0].timestamp != packet.timestamp:
            by_digit.append([])
        by_digit[-1].append(packet)
    delivered: list[RtpPacket] = []
    expected = ""
    for digit, group in zip(digits, by_digit, strict=True):
        kept = [p for p in group if rng.random() >= drop]
        kept += [p for p in kept if rng.random() < dup]
        rng.shuffle(kept)
        if kept:
            expected += digit
        delivered += kept
    events = run(DtmfReceiver(), delivered)
    assert pressed(events) == expected
    released = [e.digit for e in events if isinstance(e, DigitReleased)]
    assert "".join(released) == expected


@given(payloads=st.lists(st.binary(max_size=6), max_size=20), ts=st.integers(0, 3))
def test_fuzz_receiver_never_raises(payloads: list[bytes], ts: int) -> None:
    receiver = DtmfReceiver()
    for i, payload in enumerate(payloads):
        packet = RtpPacket(
            payload_type=101, sequence=i, timestamp=(i * ts) % 3, ssrc=SSRC, payload=payload
        )
        for event in receiver.receive(packet, now=float(i)):
            assert event.digit
    receiver.flush()


def test_receiver_timer_releases_a_digit_whose_end_was_lost() -> None:
    packets = [p for p in digit_stream("9") if not parse_telephone_event_untrusted(p.payload).end]
    receiver = DtmfReceiver(hold_timeout=0.5)
    assert receiver.get_timer() is None
    events = []
    for index, packet in enumerate(packets):
        events += receiver.receive(packet, now=1.0 + index * 0.02)
    assert events == [DigitPressed("9", 9, 1000)]
    last = 1.0 + (len(packets) - 1) * 0.02
    assert receiver.get_timer() == pytest.approx(last + 0.5)
    assert receiver.handle_timer(last + 0.4) == []
    assert receiver.handle_timer(last + 0.5) == [DigitReleased("9", 9, 1000, 640)]
    assert receiver.get_timer() is None
    assert receiver.handle_timer(last + 10) == []
    # A straggler of the released digit does not press it again.
    assert receiver.receive(packets[-1], now=last + 11) == []


def test_receiver_timer_is_pushed_by_updates() -> None:
    receiver = DtmfReceiver(hold_timeout=0.5)
    packets = digit_stream("1")
    receiver.receive(packets[0], now=0.0)
    assert receiver.get_timer() == 0.5
    receiver.receive(packets[1], now=0.3)
    assert receiver.get_timer() == 0.8
    assert receiver.handle_timer(0.6) == []
    released = receiver.receive(packets[-1], now=0.7)
    assert [type(e) for e in released] == [DigitReleased]
    assert receiver.get_timer() is None
