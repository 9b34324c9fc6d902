"""Tests for shared.media.g711 against the G.711 tables and companding properties."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.media.g711 import (
    alaw_decode,
    alaw_encode,
    alaw_from_linear,
    alaw_to_linear,
    ulaw_decode,
    ulaw_encode,
    ulaw_from_linear,
    ulaw_to_linear,
)

ALL_SAMPLES = range(-32768, 32768)


def pcm(*samples: int) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def unpcm(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 2}h", data))


# -- ITU-T G.711 reference values ------------------------------------------------------------


def test_ulaw_reference_values() -> None:
    # G.711 Table 2: code words are transmitted with all bits inverted; 0xFF is +0, 0x7F is -0,
    # the extreme outputs are ±8031 in 14-bit units (±32124 in 16-bit units).
    assert ulaw_to_linear(0xFF) == 0
    assert ulaw_to_linear(0x7F) == 0
    assert ulaw_to_linear(0x80) == 8031 * 4
    assert ulaw_to_linear(0x00) == -8031 * 4
    assert ulaw_from_linear(0) == 0xFF
    assert ulaw_from_linear(-1) == 0x7F
    assert ulaw_from_linear(32767) == 0x80
    assert ulaw_from_linear(-32768) == 0x00


def test_ulaw_decoder_output_formula() -> None:
    # G.711 Table 2b: in segment s with step m, the decoder output is (2m + 33) * 2^s - 33
    # (14-bit units), positive when the transmitted sign bit is 1.
    for code in range(256):
        inverted = code ^ 0xFF
        sign = -1 if inverted & 0x80 else 1
        segment = (inverted >> 4) & 7
        step = inverted & 0x0F
        magnitude = ((2 * step + 33) << segment) - 33
        assert ulaw_to_linear(code) == sign * magnitude * 4, hex(code)


def test_alaw_reference_values() -> None:
    # G.711 Table 1: even bits inverted (0x55); 0xD5 is the first positive level (+1 in 13-bit
    # units = +8), the extremes are ±4032 (±32256).
    assert alaw_to_linear(0xD5) == 8
    assert alaw_to_linear(0x55) == -8
    assert alaw_to_linear(0xAA) == 4032 * 8
    assert alaw_to_linear(0x2A) == -4032 * 8
    assert alaw_from_linear(0) == 0xD5
    assert alaw_from_linear(-1) == 0x55
    assert alaw_from_linear(32767) == 0xAA
    assert alaw_from_linear(-32768) == 0x2A


def test_alaw_decoder_output_formula() -> None:
    # G.711 Table 1b: segment 0 outputs 2m + 1, segment s >= 1 outputs (2m + 33) * 2^(s-1)
    # (13-bit units); the sign bit 1 is positive.
    for code in range(256):
        raw = code ^ 0x55
        sign = 1 if raw & 0x80 else -1
        segment = (raw >> 4) & 7
        step = raw & 0x0F
        magnitude = 2 * step + 1 if segment == 0 else (2 * step + 33) << (segment - 1)
        assert alaw_to_linear(code) == sign * magnitude * 8, hex(code)


# -- companding properties ---------------------------------------------------------------------

LAWS: list[tuple[str, Callable[[int], int], Callable[[int], int], int]] = [
    ("ulaw", ulaw_from_linear, ulaw_to_linear, 2),
    ("alaw", alaw_from_linear, alaw_to_linear, 3),
]


@pytest.mark.parametrize(("name", "compress", "expand", "shift"), LAWS)
def test_decoder_levels_are_distinct_and_sorted_by_code(
    name: str, compress: Callable[[int], int], expand: Callable[[int], int], shift: int
) -> None:
    levels = {expand(code) for code in range(256)}
    # μ-law has +0 and -0, A-law has 256 distinct levels.
    assert len(levels) == (255 if name == "ulaw" else 256)


@pytest.mark.parametrize(("name", "compress", "expand", "shift"), LAWS)
def test_encode_of_decode_is_identity(
    name: str, compress: Callable[[int], int], expand: Callable[[int], int], shift: int
) -> None:
    for code in range(256):
        expected = 0xFF if (name == "ulaw" and code == 0x7F) else code
        assert compress(expand(code)) == expected, hex(code)


def half_step(name: str, code: int) -> int:
    """Half the quantization interval around the decoder level of ``code`` (16-bit units).

    G.711 Tables 1 and 2: the decoder output is the middle of its interval; μ-law intervals in
    segment s are 2^(s+1) 14-bit units wide, A-law intervals 2^max(s, 1) 13-bit units.
    """
    if name == "ulaw":
        segment = ((code ^ 0xFF) >> 4) & 7
        return (1 << (segment + 1)) * 4 // 2
    segment = ((code ^ 0x55) >> 4) & 7
    return (1 << max(segment, 1)) * 8 // 2


@pytest.mark.parametrize(("name", "compress", "expand", "shift"), LAWS)
def test_decoded_value_lies_in_its_interval(
    name: str, compress: Callable[[int], int], expand: Callable[[int], int], shift: int
) -> None:
    """Exhaustively: every sample decodes to the middle of the interval it falls in.

    The encoder sees only the top 14 (μ-law) or 13 (A-law) bits of the one's complement
    magnitude, hence the slack of one dropped unit; beyond the largest level it saturates.
    """
    top = expand(0x80 if name == "ulaw" else 0xAA)
    slack = 1 << shift
    for sample in ALL_SAMPLES:
        code = compress(sample)
        error = abs(expand(code) - sample)
        if abs(sample) <= top:
            assert error <= half_step(name, code) + slack, sample
        else:
            assert abs(expand(code)) == top, sample


@pytest.mark.parametrize(("name", "compress", "expand", "shift"), LAWS)
def test_encoder_is_monotonic_and_symmetric(
    name: str, compress: Callable[[int], int], expand: Callable[[int], int], shift: int
) -> None:
    previous = -(1 << 20)
    for sample in ALL_SAMPLES:
        value = expand(compress(sample))
        assert value >= previous, sample
        previous = value
        # One's complement symmetry (as G.191's reference encoders): ~x mirrors x.
        assert compress(~sample) == compress(sample) ^ 0x80, sample


def test_bulk_encoders_match_the_scalar_functions_exhaustively() -> None:
    data = pcm(*ALL_SAMPLES)
    assert ulaw_encode(data) == bytes(ulaw_from_linear(s) for s in ALL_SAMPLES)
    assert alaw_encode(data) == bytes(alaw_from_linear(s) for s in ALL_SAMPLES)


def test_bulk_decoders_match_the_scalar_functions() -> None:
    codes = bytes(range(256))
    assert unpcm(ulaw_decode(codes)) == [ulaw_to_linear(c) for c in codes]
    assert unpcm(alaw_decode(codes)) == [alaw_to_linear(c) for c in codes]


def test_empty_and_odd_input() -> None:
    assert ulaw_encode(b"") == b""
    assert alaw_decode(b"") == b""
    with pytest.raises(ValueError):
        ulaw_encode(b"\x00")
    with pytest.raises(ValueError):
        alaw_encode(b"\x00\x00\x00")


def test_silence_frame() -> None:
    silence = bytes(320)
    assert ulaw_encode(silence) == b"\xff" * 160
    assert alaw_encode(silence) == b"\xd5" * 160
    assert ulaw_decode(b"\xff" * 160) == silence


@given(codes=st.binary(max_size=400))
def test_codes_round_trip(codes: bytes) -> None:
    assert alaw_encode(alaw_decode(codes)) == codes
    assert ulaw_encode(ulaw_decode(codes)) == codes.replace(b"\x7f", b"\xff")


@given(samples=st.lists(st.integers(-32768, 32767), max_size=200))
def test_requantizing_is_stable(samples: list[int]) -> None:
    data = pcm(*samples)
    for encode, decode in ((ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)):
        once = decode(encode(data))
        assert len(once) == len(data)
        assert decode(encode(once)) == once


@given(samples=st.lists(st.integers(-32768, 32767), min_size=1, max_size=200))
def test_error_is_bounded_relative_to_amplitude(samples: list[int]) -> None:
    # Logarithmic companding: the error is at most about 1/16 of the amplitude (6.25%: four
    # step bits per segment), plus the small fixed steps near zero.
    for encode, decode, floor in ((ulaw_encode, ulaw_decode, 8), (alaw_encode, alaw_decode, 16)):
        out = unpcm(decode(encode(pcm(*samples))))
        for x, y in zip(samples, out, strict=True):
            assert abs(x - y) <= max(floor, abs(x) / 16 + floor), (x, y)
