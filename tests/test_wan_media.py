"""Tests for shared.media.wan: sealing, opening, tampering, keys per leg, the replay window."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.media import wan
from shared.media.rtp import RtpPacket
from shared.media.wan import (
    DIRECTION_FROM_RELAY,
    DIRECTION_TO_RELAY,
    HEADER_SIZE,
    KIND_KEEPALIVE,
    KIND_MEDIA,
    OVERHEAD,
    ReplayWindow,
    WanDefect,
    WanPacket,
    WanPacketError,
    header_prefix,
    leg_cipher,
    nonce_prefix,
    open_untrusted,
    peek_leg_untrusted,
    seal,
    seal_direct,
    seal_keepalive,
    unpack_header,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
RTP = RtpPacket(payload_type=0, sequence=7, timestamp=160, ssrc=0x1234, payload=b"\xff" * 160)
RTP_BYTES = RTP.encode()

keys = st.binary(min_size=32, max_size=32)
directions = st.sampled_from([DIRECTION_TO_RELAY, DIRECTION_FROM_RELAY])
legs = st.integers(0, 2**32 - 1)
counters = st.integers(0, 2**64 - 1)


def test_round_trip_of_an_rtp_packet() -> None:
    packet = seal(KEY, DIRECTION_TO_RELAY, 42, 5, RTP_BYTES)
    assert len(packet) == len(RTP_BYTES) + OVERHEAD
    assert open_untrusted(KEY, packet, DIRECTION_TO_RELAY) == WanPacket(
        42, 5, KIND_MEDIA, RTP_BYTES
    )
    assert peek_leg_untrusted(packet) == 42


def test_header_layout_is_as_documented() -> None:
    packet = seal(KEY, DIRECTION_FROM_RELAY, 0x01020304, 0x1122334455667788, b"x")
    assert packet[:HEADER_SIZE] == bytes.fromhex("01 01 0000 01020304 1122334455667788")
    assert len(packet) == HEADER_SIZE + 1 + 16


def test_payload_is_encrypted() -> None:
    packet = seal(KEY, DIRECTION_TO_RELAY, 1, 0, RTP_BYTES)
    assert RTP_BYTES[12:40] not in packet


def test_keepalive_is_authenticated_and_empty() -> None:
    packet = seal_keepalive(KEY, DIRECTION_TO_RELAY, 9, 3)
    assert len(packet) == OVERHEAD
    assert open_untrusted(KEY, packet, DIRECTION_TO_RELAY) == WanPacket(9, 3, KIND_KEEPALIVE, b"")
    forged = bytes([KIND_KEEPALIVE]) + packet[1:]
    with pytest.raises(WanPacketError) as info:
        open_untrusted(OTHER_KEY, forged, DIRECTION_TO_RELAY)
    assert info.value.defect is WanDefect.BAD_TAG


def test_empty_media_payload_round_trips() -> None:
    packet = seal(KEY, DIRECTION_FROM_RELAY, 1, 1, b"")
    assert open_untrusted(KEY, packet, DIRECTION_FROM_RELAY).payload == b""


@settings(max_examples=200)
@given(keys, directions, legs, counters, st.binary(max_size=1500), st.booleans())
def test_round_trip_property(
    key: bytes, direction: int, leg: int, counter: int, payload: bytes, keepalive: bool
) -> None:
    kind = KIND_KEEPALIVE if keepalive else KIND_MEDIA
    packet = seal(key, direction, leg, counter, payload, kind=kind)
    assert peek_leg_untrusted(packet) == leg
    assert open_untrusted(key, packet, direction) == WanPacket(leg, counter, kind, payload)


def test_every_single_byte_change_is_refused() -> None:
    packet = seal(KEY, DIRECTION_TO_RELAY, 77, 1000, RTP_BYTES[:40])
    for index in range(len(packet)):
        for flip in (0x01, 0x80, 0xFF):
            tampered = bytearray(packet)
            tampered[index] ^= flip
            with pytest.raises(WanPacketError):
                open_untrusted(KEY, bytes(tampered), DIRECTION_TO_RELAY)


@settings(max_examples=200)
@given(st.binary(min_size=0, max_size=200), st.data())
def test_any_tampering_is_refused(payload: bytes, data: st.DataObject) -> None:
    packet = seal(KEY, DIRECTION_FROM_RELAY, 5, 6, payload)
    index = data.draw(st.integers(0, len(packet) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = bytearray(packet)
    tampered[index] ^= flip
    with pytest.raises(WanPacketError):
        open_untrusted(KEY, bytes(tampered), DIRECTION_FROM_RELAY)


def test_truncated_and_extended_packets_are_refused() -> None:
    packet = seal(KEY, DIRECTION_TO_RELAY, 1, 1, RTP_BYTES)
    for size in range(len(packet)):
        with pytest.raises(WanPacketError):
            open_untrusted(KEY, packet[:size], DIRECTION_TO_RELAY)
    with pytest.raises(WanPacketError) as info:
        open_untrusted(KEY, packet + b"\0", DIRECTION_TO_RELAY)
    assert info.value.defect is WanDefect.BAD_TAG


def test_wrong_key_is_refused() -> None:
    packet = seal(KEY, DIRECTION_TO_RELAY, 1, 1, RTP_BYTES)
    with pytest.raises(WanPacketError) as info:
        open_untrusted(OTHER_KEY, packet, DIRECTION_TO_RELAY)
    assert info.value.defect is WanDefect.BAD_TAG


def test_wrong_direction_is_refused_before_decrypting() -> None:
    packet = seal(KEY, DIRECTION_TO_RELAY, 1, 1, RTP_BYTES)
    with pytest.raises(WanPacketError) as info:
        open_untrusted(KEY, packet, DIRECTION_FROM_RELAY)
    assert info.value.defect is WanDefect.WRONG_DIRECTION
    # Rewriting the direction byte to pass the cheap check still fails authentication.
    reflected = packet[:1] + bytes([DIRECTION_FROM_RELAY]) + packet[2:]
    with pytest.raises(WanPacketError) as info:
        open_untrusted(KEY, reflected, DIRECTION_FROM_RELAY)
    assert info.value.defect is WanDefect.BAD_TAG


def test_the_two_directions_never_share_a_nonce() -> None:
    # Same key, leg, counter and payload, both directions: different ciphertexts (a shared nonce
    # would give the same keystream, hence the same ciphertext for the same plaintext).
    up = seal(KEY, DIRECTION_TO_RELAY, 1, 1, RTP_BYTES)
    down = seal(KEY, DIRECTION_FROM_RELAY, 1, 1, RTP_BYTES)
    assert up[HEADER_SIZE:-16] != down[HEADER_SIZE:-16]


def test_every_leg_has_its_own_keystream() -> None:
    # Two calls of one office, same login key, both at counter 0: the ciphertexts must differ,
    # or GCM would leak the XOR of the two calls' audio.
    first = seal(KEY, DIRECTION_FROM_RELAY, 1, 0, RTP_BYTES)
    second = seal(KEY, DIRECTION_FROM_RELAY, 2, 0, RTP_BYTES)
    assert first[HEADER_SIZE:] != second[HEADER_SIZE:]
    # And a packet moved to another leg (leg id rewritten) does not open.
    moved = second[:4] + first[4:8] + second[8:]
    assert peek_leg_untrusted(moved) == 1
    with pytest.raises(WanPacketError):
        open_untrusted(KEY, moved, DIRECTION_FROM_RELAY)


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("!BBHIQ", 3, 0, 0, 1, 1),  # unknown kind
        struct.pack("!BBHIQ", 0, 0, 0, 1, 1),
        struct.pack("!BBHIQ", 1, 0, 1, 1, 1),  # reserved bits
        struct.pack("!BBHIQ", 1, 2, 0, 1, 1),  # no such direction
    ],
)
def test_malformed_headers(header: bytes) -> None:
    with pytest.raises(WanPacketError) as info:
        open_untrusted(KEY, header + bytes(16), DIRECTION_TO_RELAY)
    assert info.value.defect in (WanDefect.MALFORMED, WanDefect.WRONG_DIRECTION)


def test_seal_refuses_arguments_out_of_range() -> None:
    with pytest.raises(ValueError):
        seal(KEY, 2, 1, 1, b"")
    with pytest.raises(ValueError):
        seal(KEY, 0, -1, 1, b"")
    with pytest.raises(ValueError):
        seal(KEY, 0, 2**32, 1, b"")
    with pytest.raises(ValueError):
        seal(KEY, 0, 1, 2**64, b"")
    with pytest.raises(ValueError):
        seal(KEY, 0, 1, -1, b"")
    with pytest.raises(ValueError):
        seal(KEY, 0, 1, 1, b"", kind=3)
    with pytest.raises(ValueError):
        seal(b"short", 0, 1, 1, b"")


def test_cipher_cache_stays_bounded() -> None:
    for leg in range(wan._CACHE_LIMIT + 10):
        seal(KEY, 0, leg, 0, b"")
    assert len(wan._ciphers) <= wan._CACHE_LIMIT
    packet = seal(KEY, 0, 3, 0, b"a")
    assert open_untrusted(KEY, packet, 0).payload == b"a"


# -- the pieces a hot path builds packets from --------------------------------------------------


@given(
    keys,
    st.sampled_from([0, 1, 2, 3]),
    legs,
    counters,
    st.sampled_from([KIND_MEDIA, KIND_KEEPALIVE]),
    st.binary(max_size=200),
)
def test_pieces_build_exactly_what_seal_builds(
    key: bytes, direction: int, leg: int, counter: int, kind: int, payload: bytes
) -> None:
    sealer = seal if direction < 2 else seal_direct
    expected = sealer(key, direction, leg, counter, payload, kind=kind)
    tail = counter.to_bytes(8, "big")
    header = header_prefix(kind, direction, leg) + tail
    built = header + leg_cipher(key, leg).encrypt(nonce_prefix(direction) + tail, payload, header)
    assert built == expected
    assert unpack_header(built) == (kind, direction, 0, leg, counter)
    opened = leg_cipher(key, leg).decrypt(nonce_prefix(direction) + built[8:16], built[16:], header)
    assert opened == payload


def test_pieces_refuse_arguments_out_of_range() -> None:
    with pytest.raises(ValueError):
        header_prefix(3, 0, 1)
    with pytest.raises(ValueError):
        header_prefix(KIND_MEDIA, 4, 1)
    with pytest.raises(ValueError):
        header_prefix(KIND_MEDIA, 0, 2**32)
    with pytest.raises(ValueError):
        nonce_prefix(-1)
    with pytest.raises(ValueError):
        leg_cipher(b"short", 1)


# -- fuzz: only WanPacketError ----------------------------------------------------------------


@settings(max_examples=500)
@given(st.binary(max_size=120), directions)
def test_fuzz_open_raises_only_wan_packet_error(data: bytes, direction: int) -> None:
    try:
        open_untrusted(KEY, data, direction)
    except WanPacketError:
        pass
    try:
        peek_leg_untrusted(data)
    except WanPacketError:
        pass


@settings(max_examples=300)
@given(st.sampled_from([0, 1, 2, 3, 255]), directions, st.integers(0, 3), st.binary(max_size=64))
def test_fuzz_plausible_headers(kind: int, direction: int, reserved: int, tail: bytes) -> None:
    data = struct.pack("!BBHIQ", kind, direction, reserved, 1, 2) + tail
    with pytest.raises(WanPacketError):
        open_untrusted(KEY, data, direction)


# -- the replay window ------------------------------------------------------------------------


def test_window_accepts_once() -> None:
    window = ReplayWindow()
    assert window.accept(0)
    assert not window.accept(0)
    assert window.accept(5)
    assert window.accept(3)
    assert not window.accept(3)
    assert not window.accept(5)
    assert window.highest == 5


def test_window_refuses_too_old() -> None:
    window = ReplayWindow(64)
    assert window.accept(100)
    assert window.check(37)
    assert not window.check(36)
    assert window.accept(1000)
    assert not window.check(100)
    assert not window.check(936)
    assert window.check(937)


def test_window_check_does_not_update() -> None:
    window = ReplayWindow()
    assert window.check(10)
    assert window.check(10)
    assert window.highest == -1


def test_window_is_at_least_64() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(63)


def test_window_handles_huge_counters() -> None:
    window = ReplayWindow()
    assert window.accept(2**64 - 2)
    assert window.accept(2**64 - 1)
    assert not window.accept(2**64 - 1)
    assert not window.accept(0)


@settings(max_examples=300)
@given(
    st.sampled_from([64, 65, 128, 1024]),
    st.lists(st.integers(0, 3000), max_size=300),
)
def test_window_matches_a_set_model(size: int, sequence: list[int]) -> None:
    # RFC 3711 §3.3.2: accepted exactly when never accepted before and newer than
    # highest - size.
    window = ReplayWindow(size)
    seen: set[int] = set()
    highest = -1
    for counter in sequence:
        expected = counter not in seen and counter > highest - size
        assert window.check(counter) == expected
        assert window.accept(counter) == expected
        if expected:
            seen.add(counter)
            highest = max(highest, counter)
        assert window.highest == highest


@settings(max_examples=100)
@given(st.permutations(list(range(200))), st.integers(0, 60))
def test_window_accepts_any_reordering_within_its_width(order: list[int], shift: int) -> None:
    # Every counter of a burst arrives once, displaced by less than the window: all accepted,
    # and then every duplicate refused.
    window = ReplayWindow(1024)
    for counter in order:
        assert window.accept(counter + shift)
    for counter in order:
        assert not window.accept(counter + shift)
