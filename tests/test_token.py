"""Join tokens (shared.token): round trip, every kind of damage refused clearly, fuzz."""

from __future__ import annotations

import base64
import string
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.token import PREFIX, JoinToken, TokenError, decode_token_untrusted

TOKEN = JoinToken("203.0.113.9", 5090, "branch-lyon", b"s" * 32, bytes(range(32)))
ALPHABET = string.ascii_letters + string.digits + "-_"


def raw_token(fields: object, *, crc: bytes | None = None) -> str:
    """A token around any msgpack content, with a right CRC unless told otherwise."""
    body = msgpack.packb(fields, use_bin_type=True)
    check = zlib.crc32(body).to_bytes(4, "big") if crc is None else crc
    return PREFIX + base64.urlsafe_b64encode(body + check).decode().rstrip("=")


def good_fields(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "h": TOKEN.host,
        "p": TOKEN.port,
        "o": TOKEN.office,
        "s": TOKEN.secret,
        "f": TOKEN.ca_sha256,
    }
    fields.update(changes)
    return fields


def test_round_trip():
    text = TOKEN.encode()
    assert text.startswith(PREFIX)
    assert set(text[len(PREFIX) :]) <= set(ALPHABET), "one copy-pasteable word"
    assert decode_token_untrusted(text) == TOKEN


def test_surrounding_whitespace_is_forgiven():
    assert decode_token_untrusted(f"  {TOKEN.encode()}\n") == TOKEN


def test_hand_built_token_decodes():
    assert decode_token_untrusted(raw_token(good_fields())) == TOKEN


@given(
    host=st.text(min_size=1, max_size=60),
    port=st.integers(1, 65535),
    office=st.text(min_size=1, max_size=63),
    secret=st.binary(min_size=16, max_size=64),
    fingerprint=st.binary(min_size=32, max_size=32),
)
def test_round_trip_property(host, port, office, secret, fingerprint):
    token = JoinToken(host, port, office, secret, fingerprint)
    assert decode_token_untrusted(token.encode()) == token


def test_every_single_character_change_is_refused():
    text = TOKEN.encode()
    for index in range(len(PREFIX), len(text)):
        for char in ALPHABET:
            if char == text[index]:
                continue
            damaged = text[:index] + char + text[index + 1 :]
            with pytest.raises(TokenError):
                decode_token_untrusted(damaged)


@pytest.mark.parametrize("char", ["!", " ", ".", "+", "/", "é"])
def test_stray_character_inside_is_refused(char):
    text = TOKEN.encode()
    for index in (len(PREFIX), len(PREFIX) + 10, len(text) - 1):
        with pytest.raises(TokenError):
            decode_token_untrusted(text[:index] + char + text[index:])


def test_truncated_tokens_are_refused():
    text = TOKEN.encode()
    for length in range(len(text)):
        with pytest.raises(TokenError) as info:
            decode_token_untrusted(text[:length])
        assert str(info.value)


def test_truncated_message_says_to_copy_it_whole():
    text = TOKEN.encode()
    with pytest.raises(TokenError, match="whole"):
        decode_token_untrusted(text[:-7])


@pytest.mark.parametrize("prefix", ["bpx2-", "BPX1-", "bpx1_", "", "token: bpx1-"])
def test_wrong_prefix(prefix):
    text = prefix + TOKEN.encode()[len(PREFIX) :]
    with pytest.raises(TokenError, match="starts with 'bpx1-'"):
        decode_token_untrusted(text)


@pytest.mark.parametrize(
    "garbage",
    ["", "hello", "bpx1-", "bpx1-A", "bpx1-AAAA", "bpx1-%%%%", "bpx1-" + "A" * 400, "\x00\xff"],
)
def test_garbage(garbage):
    with pytest.raises(TokenError):
        decode_token_untrusted(garbage)


def test_wrong_checksum_says_damaged():
    body = msgpack.packb(good_fields(), use_bin_type=True)
    crc = (zlib.crc32(body) ^ 1).to_bytes(4, "big")
    with pytest.raises(TokenError, match="damaged"):
        decode_token_untrusted(raw_token(good_fields(), crc=crc))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ([1, 2, 3], "damaged"),
        ("text", "damaged"),
        (good_fields(h=""), "main host address"),
        (good_fields(h=5), "main host address"),
        (good_fields(p=0), "port"),
        (good_fields(p=65536), "port"),
        (good_fields(p=True), "port"),
        (good_fields(p="5090"), "port"),
        (good_fields(o=""), "office"),
        (good_fields(o=b"lyon"), "office"),
        (good_fields(s=b"short"), "secret"),
        (good_fields(s="s" * 32), "secret"),
        (good_fields(f=b"x" * 31), "fingerprint"),
        (good_fields(f=None), "fingerprint"),
        ({k: v for k, v in good_fields().items() if k != "s"}, "secret"),
    ],
)
def test_content_checked(fields, message):
    with pytest.raises(TokenError, match=message):
        decode_token_untrusted(raw_token(fields))


def test_unknown_extra_fields_are_tolerated():
    # A newer main host may add fields; an older remote host still joins.
    assert decode_token_untrusted(raw_token(good_fields(z=[1, 2]))) == TOKEN


def test_valid_crc_around_non_msgpack_is_refused():
    body = b"\xc1\xc1\xc1"  # 0xc1 is never used in msgpack
    crc = zlib.crc32(body).to_bytes(4, "big")
    text = PREFIX + base64.urlsafe_b64encode(body + crc).decode().rstrip("=")
    with pytest.raises(TokenError, match="damaged"):
        decode_token_untrusted(text)


@given(st.text(max_size=300))
@settings(max_examples=500)
def test_fuzz_text_raises_only_token_error(text):
    try:
        decode_token_untrusted(text)
    except TokenError as exc:
        assert str(exc)


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_fuzz_payload_with_good_crc_raises_only_token_error(body):
    crc = zlib.crc32(body).to_bytes(4, "big")
    text = PREFIX + base64.urlsafe_b64encode(body + crc).decode().rstrip("=")
    try:
        token = decode_token_untrusted(text)
    except TokenError:
        return
    assert isinstance(token, JoinToken)


@given(
    st.dictionaries(
        st.sampled_from(["h", "p", "o", "s", "f", "x"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(),
            st.text(max_size=40),
            st.binary(max_size=40),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
        ),
    )
)
@settings(max_examples=500)
def test_fuzz_fields_raise_only_token_error(fields):
    try:
        token = decode_token_untrusted(raw_token(fields))
    except TokenError:
        return
    assert 0 < token.port < 65536 and len(token.ca_sha256) == 32 and len(token.secret) >= 16


@given(st.data())
@settings(max_examples=300)
def test_fuzz_damaged_real_token_raises_only_token_error(data):
    text = TOKEN.encode()
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(text)), st.text(max_size=3))))
    for index, insert in edits:
        text = text[:index] + insert + text[index + 1 :]
    try:
        token = decode_token_untrusted(text)
    except TokenError:
        return
    assert token == TOKEN  # anything accepted must be the token itself
