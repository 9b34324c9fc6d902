"""Tests for shared.media.rtp: header codec, RTP/RTCP demux, RFC 3550 Appendix A statistics."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.media.rtp import (
    RtpExtension,
    RtpPacket,
    RtpParseError,
    RtpReceiveStats,
    is_rtcp,
    is_rtp_or_rtcp,
    parse_rtp_untrusted,
    peek_rtp_header_untrusted,
)

# A PCMU packet as a capture shows it: V=2, PT=0, seq 0x1234, ts 0xdeadbeef, SSRC 0x01020304.
PCMU_BYTES = bytes.fromhex("80001234deadbeef01020304") + b"\xff" * 160


def test_parse_plain_packet() -> None:
    packet = parse_rtp_untrusted(PCMU_BYTES)
    assert packet == RtpPacket(
        payload_type=0,
        sequence=0x1234,
        timestamp=0xDEADBEEF,
        ssrc=0x01020304,
        payload=b"\xff" * 160,
    )
    assert packet.encode() == PCMU_BYTES


def test_parse_marker_csrc_extension_padding() -> None:
    data = (
        bytes([0x80 | 0x20 | 0x10 | 2, 0x80 | 101])
        + struct.pack("!HII", 7, 8000, 99)
        + struct.pack("!II", 11, 22)
        + struct.pack("!HH", 0xBEDE, 1)
        + b"\x10\xaa\x00\x00"
        + b"\x01\x02\x03\x04"
        + b"\x00\x00\x03"
    )
    packet = parse_rtp_untrusted(data)
    assert packet.marker
    assert packet.payload_type == 101
    assert packet.sequence == 7
    assert packet.timestamp == 8000
    assert packet.ssrc == 99
    assert packet.csrcs == (11, 22)
    assert packet.extension == RtpExtension(0xBEDE, b"\x10\xaa\x00\x00")
    assert packet.payload == b"\x01\x02\x03\x04"
    assert packet.padding == 3
    assert packet.encode() == data


def test_parse_accepts_memoryview_and_bytearray() -> None:
    assert parse_rtp_untrusted(memoryview(PCMU_BYTES)).payload == b"\xff" * 160  # type: ignore[arg-type]
    assert parse_rtp_untrusted(bytearray(PCMU_BYTES)).sequence == 0x1234  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "short"),
        (b"\x80\x00" + bytes(9), "short"),
        (b"\x40\x00" + bytes(10), "version 1"),
        (b"\xc0\x00" + bytes(10), "version 3"),
        (b"\x81\x00" + bytes(10), "CSRC past end"),
        (b"\x90\x00" + bytes(10), "extension header past end"),
        (b"\x90\x00" + bytes(10) + b"\x00\x00\x00\x02" + bytes(4), "extension past end"),
        (b"\xa0\x00" + bytes(10), "padding count 0"),
        (b"\xa0\x00" + bytes(10) + b"\x00\x05", "padding longer than payload"),
    ],
)
def test_parse_rejects(data: bytes, why: str) -> None:
    with pytest.raises(RtpParseError):
        parse_rtp_untrusted(data)


def test_encode_validates() -> None:
    with pytest.raises(ValueError):
        RtpPacket(payload_type=128, sequence=0, timestamp=0, ssrc=0).encode()
    with pytest.raises(ValueError):
        RtpPacket(payload_type=0, sequence=70000, timestamp=0, ssrc=0).encode()
    with pytest.raises(ValueError):
        RtpPacket(payload_type=0, sequence=0, timestamp=2**32, ssrc=0).encode()
    with pytest.raises(ValueError):
        RtpPacket(payload_type=0, sequence=0, timestamp=0, ssrc=0, csrcs=(1,) * 16).encode()
    with pytest.raises(ValueError):
        RtpPacket(
            payload_type=0, sequence=0, timestamp=0, ssrc=0, extension=RtpExtension(1, b"abc")
        ).encode()
    with pytest.raises(ValueError):
        RtpPacket(payload_type=0, sequence=0, timestamp=0, ssrc=0, padding=256).encode()


packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127),
    sequence=st.integers(0, 0xFFFF),
    timestamp=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=64),
    marker=st.booleans(),
    csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15).map(tuple),
    extension=st.none()
    | st.builds(
        RtpExtension,
        st.integers(0, 0xFFFF),
        st.binary(max_size=16).map(lambda b: b + bytes(-len(b) % 4)),
    ),
    padding=st.integers(0, 255),
)


@given(packet=packets)
def test_round_trip(packet: RtpPacket) -> None:
    data = packet.encode()
    assert parse_rtp_untrusted(data) == packet
    assert is_rtp_or_rtcp(data)


@given(data=st.binary(max_size=80))
def test_fuzz_parse_raises_only_parse_error(data: bytes) -> None:
    try:
        packet = parse_rtp_untrusted(data)
    except RtpParseError:
        return
    assert packet.encode() == data


@given(data=st.binary(max_size=40))
def test_fuzz_peek_raises_only_parse_error(data: bytes) -> None:
    try:
        header = peek_rtp_header_untrusted(data)
    except RtpParseError:
        assert len(data) < 12 or data[0] >> 6 != 2
        return
    assert 0 <= header.payload_type <= 127


@given(packet=packets)
def test_peek_agrees_with_parse(packet: RtpPacket) -> None:
    header = peek_rtp_header_untrusted(packet.encode())
    assert header == (
        packet.payload_type,
        packet.marker,
        packet.sequence,
        packet.timestamp,
        packet.ssrc,
    )
    assert header.ssrc == packet.ssrc
    assert header.marker is packet.marker


@given(packet=packets, cut=st.integers(0, 200), flip=st.integers(0, 255))
def test_fuzz_mangled_packets(packet: RtpPacket, cut: int, flip: int) -> None:
    data = bytearray(packet.encode())
    if data:
        data[cut % len(data)] ^= flip
    for candidate in (bytes(data), bytes(data[:cut])):
        try:
            parse_rtp_untrusted(candidate)
        except RtpParseError:
            pass


def test_rtcp_discrimination() -> None:
    # RFC 5761 §4: SR (200) and RR (201) second octets are RTCP; PT 0/8/101 with or without
    # the marker are RTP.
    rr = bytes.fromhex("81c90007") + bytes(28)
    sr = bytes.fromhex("80c80006") + bytes(24)
    assert is_rtcp(rr)
    assert is_rtcp(sr)
    assert is_rtp_or_rtcp(rr)
    for pt in (0, 8, 101, 0x80 | 0, 0x80 | 101, 0x80 | 63, 96 | 0x80):
        data = bytes([0x80, pt]) + bytes(10)
        assert not is_rtcp(data), pt
    assert not is_rtcp(b"\x81\xc9")
    # STUN (first octet 0/1) and DTLS (20..63) are neither.
    assert not is_rtp_or_rtcp(b"\x00\x01" + bytes(18))
    assert not is_rtp_or_rtcp(b"\x16\xfe\xfd" + bytes(10))


# -- receive statistics ------------------------------------------------------------------------


def feed(stats: RtpReceiveStats, seqs: list[int], *, start: float = 0.0) -> list[bool]:
    results = []
    for i, seq in enumerate(seqs):
        results.append(stats.update(seq, seq * 160, start + i * 0.02))
    return results


def test_probation_then_valid() -> None:
    stats = RtpReceiveStats(8000)
    assert stats.expected == 0
    assert feed(stats, [100, 101, 102]) == [False, True, True]
    assert stats.received == 2
    assert stats.expected == 2
    assert stats.lost == 0
    assert stats.extended_max_sequence == 102


def test_probation_restarts_on_gap() -> None:
    stats = RtpReceiveStats(8000)
    assert feed(stats, [10, 20, 21, 22]) == [False, False, True, True]
    assert stats.received == 2


def test_loss_counted() -> None:
    stats = RtpReceiveStats(8000)
    feed(stats, [1, 2, 3, 5, 6, 9, 10])
    assert stats.expected == 10 - 2 + 1
    assert stats.received == 6
    assert stats.lost == 3
    report = stats.report()
    assert report.cumulative_lost == 3
    assert report.fraction_lost == (3 << 8) // 9
    assert report.extended_highest_sequence == 10
    # No new packets: the next interval has no loss.
    assert stats.report().fraction_lost == 0


def test_sequence_wrap_counts_cycles() -> None:
    stats = RtpReceiveStats(8000)
    feed(stats, [65534, 65535, 0, 1])
    assert stats.cycles == 1 << 16
    assert stats.extended_max_sequence == (1 << 16) + 1
    assert stats.lost == 0


def test_duplicates_make_loss_negative() -> None:
    stats = RtpReceiveStats(8000)
    feed(stats, [1, 2, 3, 3, 3])
    assert stats.lost == -2
    assert stats.report().cumulative_lost == -2


def test_reordered_packet_is_counted_not_lost() -> None:
    stats = RtpReceiveStats(8000)
    feed(stats, [1, 2, 4, 3, 5])
    assert stats.lost == 0
    assert stats.extended_max_sequence == 5


def test_large_jump_needs_two_packets() -> None:
    stats = RtpReceiveStats(8000)
    feed(stats, [1, 2, 3])
    assert stats.update(40000, 0, 1.0) is False
    assert stats.extended_max_sequence == 3
    # The sender restarted: the next packet in sequence after the jump resets the state.
    assert stats.update(40001, 0, 1.02) is True
    assert stats.extended_max_sequence == 40001
    assert stats.received == 1


def test_jitter_zero_for_perfect_timing() -> None:
    stats = RtpReceiveStats(8000)
    for i in range(50):
        stats.update(i, i * 160, 10.0 + i * 0.02)
    assert stats.jitter == pytest.approx(0.0, abs=1e-6)


def test_jitter_follows_rfc3550_a8() -> None:
    stats = RtpReceiveStats(8000)
    arrivals = [0.0, 0.020, 0.045, 0.060, 0.081, 0.100]
    expected = 0.0
    previous = None
    for i, arrival in enumerate(arrivals):
        stats.update(i, i * 160, arrival)
        transit = arrival * 8000 - i * 160
        if i >= 2:  # the first packet is on probation, the second starts the estimate
            expected += (abs(transit - previous) - expected) / 16  # type: ignore[operator]
        if i >= 1:
            previous = transit
    assert stats.jitter == pytest.approx(expected)
    assert stats.report().jitter == int(expected)


def test_jitter_survives_timestamp_wrap() -> None:
    stats = RtpReceiveStats(8000)
    base = 2**32 - 320
    for i in range(6):
        stats.update(i, (base + i * 160) % 2**32, i * 0.02)
    assert stats.jitter == pytest.approx(0.0, abs=1e-6)


def test_invalid_clock_rate() -> None:
    with pytest.raises(ValueError):
        RtpReceiveStats(0)


@settings(max_examples=100)
@given(
    seed=st.integers(0, 2**32),
    start=st.integers(0, 0xFFFF),
    drop=st.floats(0, 0.3),
    dup=st.floats(0, 0.2),
)
def test_terrible_network_accounting(seed: int, start: int, drop: float, dup: float) -> None:
    """Property: with loss, duplication and light reordering, lost = sent - received."""
    rng = random.Random(seed)
    count = 400
    sent = [(start + i) % 65536 for i in range(count)]
    # The first two packets and the last one always arrive (probation and a known maximum).
    arriving = sent[:2] + [s for s in sent[2:-1] if rng.random() >= drop] + sent[-1:]
    with_dups: list[int] = []
    for i, seq in enumerate(arriving):
        with_dups.append(seq)
        if i >= 2 and rng.random() < dup:
            with_dups.append(seq)
    # Swap some neighbours (but keep the first two and the last in place).
    for i in range(2, len(with_dups) - 2):
        if rng.random() < 0.05:
            with_dups[i], with_dups[i + 1] = with_dups[i + 1], with_dups[i]
    stats = RtpReceiveStats(8000)
    for i, seq in enumerate(with_dups):
        stats.update(seq, 0, i * 0.02)
    delivered = len(with_dups) - 1  # the first packet is absorbed by probation
    assert stats.received == delivered
    assert stats.expected == count - 1
    assert stats.lost == (count - 1) - delivered
    # The sequence is validated (base_seq) at the second packet, and counted from there.
    assert stats.extended_max_sequence == (start + 1) % 65536 + count - 2
    report = stats.report()
    assert 0 <= report.fraction_lost <= 255
