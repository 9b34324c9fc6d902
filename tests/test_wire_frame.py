"""Tests for shared.wire.frame: the frame layout and the incremental decoder."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.wire.frame import (
    CONTROL_CHANNEL,
    DEFAULT_MAX_BODY,
    HEADER_SIZE,
    ErrorCode,
    Frame,
    FrameDecoder,
    WireError,
    encode_frame,
)
from shared.wire.messages import Heartbeat, encode_message

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
frames = st.builds(Frame, type=u16, channel=u32, body=st.binary(max_size=300), flags=u16)


def encode(frame: Frame) -> bytes:
    return encode_frame(frame.type, frame.body, channel=frame.channel, flags=frame.flags)


def drain(decoder: FrameDecoder) -> list[Frame]:
    out = []
    while (frame := decoder.next_frame_untrusted()) is not None:
        out.append(frame)
    return out


# --- layout ------------------------------------------------------------------------------------


def test_header_layout_is_big_endian_length_type_flags_channel() -> None:
    data = encode_frame(0x0102, b"\xaa\xbb\xcc", channel=0x0A0B0C0D, flags=0x0304)
    assert HEADER_SIZE == 12
    assert data == (
        b"\x00\x00\x00\x03"  # length of the body only, not of the header
        b"\x01\x02"  # type
        b"\x03\x04"  # flags
        b"\x0a\x0b\x0c\x0d"  # channel
        b"\xaa\xbb\xcc"
    )


def test_defaults_are_control_channel_and_no_flags() -> None:
    data = encode_frame(7, b"")
    assert CONTROL_CHANNEL == 0
    assert data == b"\x00\x00\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00"
    decoder = FrameDecoder()
    decoder.feed(data)
    assert decoder.next_frame_untrusted() == Frame(7, CONTROL_CHANNEL, b"", 0)


def test_empty_body_frame_is_a_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(6, b"", channel=9))
    assert drain(decoder) == [Frame(6, 9, b"")]
    assert decoder.buffered == 0


# --- round trips and splitting -----------------------------------------------------------------


@given(frames)
def test_round_trip(frame: Frame) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode(frame))
    assert decoder.next_frame_untrusted() == frame
    assert decoder.next_frame_untrusted() is None
    assert decoder.buffered == 0


@given(st.lists(frames, min_size=1, max_size=3))
def test_split_at_every_byte_boundary(batch: list[Frame]) -> None:
    stream = b"".join(encode(f) for f in batch)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        decoder.feed(stream[:cut])
        got = drain(decoder)
        decoder.feed(stream[cut:])
        got += drain(decoder)
        assert got == batch, cut
        assert decoder.buffered == 0


def test_one_byte_at_a_time() -> None:
    batch = [Frame(1, 0, b"hello"), Frame(2, 5, b""), Frame(300, 0xFFFFFFFF, bytes(range(256)))]
    stream = b"".join(encode(f) for f in batch)
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        got += drain(decoder)
    assert got == batch


@given(st.lists(frames, max_size=30))
def test_many_frames_in_one_chunk(batch: list[Frame]) -> None:
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode(f) for f in batch))
    assert drain(decoder) == batch
    assert decoder.buffered == 0


@given(st.lists(frames, min_size=1, max_size=10), st.data())
def test_random_chunking(batch: list[Frame], data: st.DataObject) -> None:
    stream = b"".join(encode(f) for f in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    got: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.feed(stream[start:end])
        got += drain(decoder)
    assert got == batch


# --- limits ------------------------------------------------------------------------------------


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_BODY == 1 << 20
    assert FrameDecoder().max_body == DEFAULT_MAX_BODY


def test_body_of_exactly_max_body_is_accepted() -> None:
    decoder = FrameDecoder(max_body=100)
    decoder.feed(encode_frame(1, b"x" * 100))
    assert drain(decoder) == [Frame(1, 0, b"x" * 100)]


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    # Only the 12 header bytes have arrived: the decoder must refuse now, not wait for (and
    # buffer) 4 GiB of body first.
    decoder = FrameDecoder(max_body=100)
    decoder.feed(struct.pack(">IHHI", 101, 1, 0, 0))
    assert decoder.buffered == HEADER_SIZE
    with pytest.raises(WireError) as info:
        decoder.next_frame_untrusted()
    assert info.value.code == ErrorCode.TOO_LARGE
    assert "101" in info.value.reason


def test_maximum_u32_length_is_refused_with_default_limit() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff" + b"\x00" * 8)
    with pytest.raises(WireError) as info:
        decoder.next_frame_untrusted()
    assert info.value.code == ErrorCode.TOO_LARGE
    assert str(info.value).startswith("frame too large: ")


def test_oversized_frame_after_good_ones_yields_the_good_ones_first() -> None:
    decoder = FrameDecoder(max_body=10)
    decoder.feed(encode_frame(1, b"ok") + struct.pack(">IHHI", 11, 1, 0, 0))
    assert decoder.next_frame_untrusted() == Frame(1, 0, b"ok")
    with pytest.raises(WireError):
        decoder.next_frame_untrusted()


@given(st.integers(0, HEADER_SIZE - 1))
def test_partial_header_needs_more(n: int) -> None:
    decoder = FrameDecoder(max_body=10)
    decoder.feed(b"\xff" * n)  # would be oversized, but we cannot know that yet
    assert decoder.next_frame_untrusted() is None
    assert decoder.buffered == n


# --- memory: the decoder holds only what it still needs ----------------------------------------


def test_consumed_frames_are_released() -> None:
    decoder = FrameDecoder()
    big = encode_frame(1, b"x" * 50_000)
    for _ in range(20):
        decoder.feed(big)
        assert len(drain(decoder)) == 1
        assert decoder.buffered == 0
        # The storage itself must not grow with the number of frames seen (no leak of
        # consumed bytes): at most one frame's worth stays allocated.
        assert len(decoder._buffer) <= len(big)


def test_partial_frame_keeps_only_its_own_bytes() -> None:
    decoder = FrameDecoder()
    first = encode_frame(1, b"a" * 1000)
    second = encode_frame(2, b"b" * 1000)
    decoder.feed(first + second[:500])
    assert drain(decoder) == [Frame(1, 0, b"a" * 1000)]
    assert decoder.buffered == 500
    assert len(decoder._buffer) == 500
    decoder.feed(second[500:])
    assert drain(decoder) == [Frame(2, 0, b"b" * 1000)]
    assert decoder.buffered == 0


@given(st.lists(frames, min_size=1, max_size=5), st.integers(1, 64))
def test_buffered_never_exceeds_unread_bytes(batch: list[Frame], chunk: int) -> None:
    stream = b"".join(encode(f) for f in batch)
    decoder = FrameDecoder()
    fed = consumed = 0
    for start in range(0, len(stream), chunk):
        piece = stream[start : start + chunk]
        decoder.feed(piece)
        fed += len(piece)
        for frame in drain(decoder):
            consumed += HEADER_SIZE + len(frame.body)
        assert decoder.buffered == fed - consumed
        # Whatever is left is less than one whole frame, or the decoder would have cut it.
        assert decoder.buffered < HEADER_SIZE + max(len(f.body) for f in batch)
        assert len(decoder._buffer) == decoder.buffered


# --- errors ------------------------------------------------------------------------------------


def test_wire_error_carries_code_and_reason() -> None:
    err = WireError(ErrorCode.PROTOCOL, "Login not allowed in state start")
    assert err.code == 5
    assert err.reason == "Login not allowed in state start"
    assert str(err) == "protocol violation: Login not allowed in state start"
    assert str(WireError(999, "x")) == "error: x"


def test_error_codes_are_distinct_and_named() -> None:
    codes = {
        name: value
        for name, value in vars(ErrorCode).items()
        if name.isupper() and isinstance(value, int)
    }
    assert len(set(codes.values())) == len(codes)
    assert set(ErrorCode.NAMES) == set(codes.values())
    assert codes["NORMAL"] == 0


def test_the_documented_example_frame() -> None:
    # docs/wire-protocol.md §2 shows these bytes for Heartbeat(seq=1) on channel 0.
    documented = bytes.fromhex("00000006 0006 0000 00000000 81a3736571 01".replace(" ", ""))
    assert encode_message(Heartbeat(1)) == documented
