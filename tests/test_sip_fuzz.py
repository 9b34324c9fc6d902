"""Fuzzing the `_untrusted` SIP parsers: nothing but `SipParseError` may escape.

Mutations of the RFC 4475 vectors (flip, insert, delete, duplicate, truncate, splice in the
characters SIP grammar cares about) go through the whole path a transport uses: parse,
validate, read every typed accessor, build the error reply or a response, encode, re-parse.
Whatever validates must also survive its own round trip unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.sip.errors import SipParseError
from shared.sip.framing import KeepAlivePing, KeepAlivePong, SipStreamFramer
from shared.sip.headers import (
    parse_address_untrusted,
    parse_cseq_untrusted,
    parse_params_untrusted,
    parse_via_untrusted,
    split_comma_untrusted,
    unquote,
)
from shared.sip.message import (
    SipLimits,
    SipRequest,
    SipResponse,
    error_response,
    make_response,
    parse_message_untrusted,
    validate_request_untrusted,
    validate_response_untrusted,
)
from shared.sip.uri import parse_uri_untrusted

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "sip" / "rfc4475"
SAMPLES = [p.read_bytes() for p in sorted(VECTORS.glob("*.dat"))]

# Octets and snippets that SIP's grammar gives meaning to.
INTERESTING = [
    b"\r\n",
    b"\r\n ",
    b"\r",
    b"\n",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b'"',
    b"\\",
    b"<",
    b">",
    b"@",
    b"%",
    b"%0",
    b"%zz",
    b"=",
    b"?",
    b"&",
    b"[",
    b"]",
    b"/",
    b"*",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xe2\x82\xac",
    b"-1",
    b"99999999999999999999",
    b"SIP/2.0",
    b"sip:",
    b"tel:",
    b";tag=",
    b";branch=",
    b";rport",
    b";received=",
    b";expires=",
    b";q=",
    b"Content-Length: ",
    b"l: 5\r\n",
    b"Via: SIP/2.0/UDP [::1]:5060\r\n",
    b"Contact: *\r\n",
    b"\r\n\r\n",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "dup", "truncate", "snippet"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = bytes([draw(st.integers(0, 255))])
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "dup":
            size = draw(st.integers(1, 32))
            data[pos:pos] = data[pos : pos + size]
        elif kind == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.sampled_from(INTERESTING))
    return bytes(data)


def read_everything(msg: SipRequest | SipResponse) -> None:
    """Every accessor a SIP layer might call; each may raise only SipParseError."""
    for name in (
        "call_id",
        "cseq",
        "vias",
        "top_via",
        "branch",
        "from_",
        "to",
        "from_tag",
        "to_tag",
        "contact_is_star",
        "contacts",
        "routes",
        "record_routes",
        "max_forwards",
        "expires",
        "content_length",
        "content_type",
    ):
        try:
            getattr(msg, name)
        except SipParseError:
            pass
    for name in ("Require", "Supported", "Allow"):
        try:
            msg.option_tags(name)
        except SipParseError:
            pass
    try:
        msg.headers.values("Accept")
    except SipParseError:
        pass
    if isinstance(msg, SipRequest):
        try:
            _ = msg.request_uri
        except SipParseError:
            pass
        make_response(msg, 200, to_tag="t1").encode()


def exercise(data: bytes, limits: SipLimits | None = None) -> None:
    """The path a transport takes with a datagram."""
    try:
        msg = (
            parse_message_untrusted(data)
            if limits is None
            else parse_message_untrusted(data, limits)
        )
    except SipParseError as exc:
        assert 100 <= exc.status <= 699
        reply = error_response(exc, to_tag="t1")
        if reply is not None:
            parse_message_untrusted(reply.encode())
        return
    read_everything(msg)
    encoded = msg.encode()
    try:
        if isinstance(msg, SipRequest):
            validate_request_untrusted(msg)
        else:
            validate_response_untrusted(msg)
    except SipParseError as exc:
        reply = error_response(exc, to_tag="t1")
        if reply is not None:
            assert isinstance(parse_message_untrusted(reply.encode()), SipResponse)
        return
    # Valid: our own serialization must parse and validate to the same message.
    again = parse_message_untrusted(encoded)
    if isinstance(again, SipRequest):
        validate_request_untrusted(again)
    else:
        validate_response_untrusted(again)
    assert again.body == msg.body
    assert [(n, v) for n, v in again.headers if n != "Content-Length"] == [
        (n, v) for n, v in msg.headers if n != "Content-Length"
    ]
    assert [str(v) for v in again.vias] == [str(v) for v in msg.vias]
    assert str(again.to) == str(msg.to)
    assert again.encode() == encoded


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(mutated())
def test_mutated_vectors_raise_only_sip_parse_error(data):
    exercise(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_vectors_under_tight_limits(data):
    exercise(data, SipLimits(max_message_size=600, max_header_count=8, max_line_length=60))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_sip_parse_error(data):
    exercise(data)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(mutated(), st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_framer_on_mutated_streams_raises_only_sip_parse_error(data, cuts):
    framer = SipStreamFramer(SipLimits(max_message_size=2000))
    stream = data + b"\r\n\r\n" + data
    pos = 0
    for cut in cuts * 100:
        if pos >= len(stream):
            break
        framer.receive_data(stream[pos : pos + cut])
        pos += cut
        try:
            while (event := framer.next_message()) is not None:
                if isinstance(event, bytes):
                    exercise(event)
                else:
                    assert isinstance(event, KeepAlivePing | KeepAlivePong)
        except SipParseError:
            return
    framer.receive_data(b"")
    try:
        while framer.next_message() is not None:
            pass
    except SipParseError:
        pass


SIP_TEXT = st.text(
    alphabet=st.sampled_from(
        [
            *"sipSIPtel:@;=?&,<>\"\\%[]/ \t.+-_*~'()!0123456789abcdefABCDEFxyz#$",
            *["\x00", "\x7f", "\u00e9", "\r", "\n", "\u2603"],
        ]
    ),
    max_size=60,
)


def _only_parse_errors(func: Callable[[str], object], text: str) -> None:
    try:
        func(text)
    except SipParseError:
        pass


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SIP_TEXT)
def test_value_parsers_raise_only_sip_parse_error(text):
    for func in (
        parse_uri_untrusted,
        parse_address_untrusted,
        parse_via_untrusted,
        parse_cseq_untrusted,
        split_comma_untrusted,
        parse_params_untrusted,
        unquote,
    ):
        _only_parse_errors(func, text)
        _only_parse_errors(func, "sip:" + text)
        _only_parse_errors(func, "SIP/2.0/UDP " + text)
        _only_parse_errors(func, '"' + text)
        _only_parse_errors(func, "<sip:" + text + ">;" + text)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SIP_TEXT)
def test_parsed_uris_and_addresses_round_trip(text):
    for candidate in ("sip:" + text, "tel:" + text, "<sip:" + text + ">", text):
        try:
            uri = parse_uri_untrusted(candidate)
        except SipParseError:
            pass
        else:
            assert parse_uri_untrusted(str(uri)) == uri
        try:
            address = parse_address_untrusted(candidate)
        except SipParseError:
            pass
        else:
            assert parse_address_untrusted(str(address)) == address
