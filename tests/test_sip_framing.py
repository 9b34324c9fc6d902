"""Stream framing (RFC 3261 §18.3) and keepalives (RFC 5626 §4.4.1)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.sip.errors import SipParseError
from shared.sip.framing import (
    KEEPALIVE_PING,
    KEEPALIVE_PONG,
    FramerEvent,
    KeepAlivePing,
    KeepAlivePong,
    SipStreamFramer,
    is_datagram_keepalive,
)
from shared.sip.message import (
    SipLimits,
    SipRequest,
    error_response,
    parse_message_untrusted,
)

BODY = b"v=0\r\n\r\nbinary\x00\r\n\r\n"  # CRLFCRLF inside the body: only Content-Length can tell


def message(n: int = 1, body: bytes = BODY) -> bytes:
    return (
        f"MESSAGE sip:bob@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK{n}\r\n"
        f"From: <sip:alice@example.com>;tag={n}\r\n"
        f"To: <sip:bob@example.com>\r\n"
        f"Call-ID: call{n}\r\n"
        f"CSeq: {n} MESSAGE\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"\r\n"
    ).encode() + body


def drain(framer: SipStreamFramer) -> list[FramerEvent]:
    events = []
    while (event := framer.next_message()) is not None:
        events.append(event)
    return events


def feed(framer: SipStreamFramer, data: bytes) -> list[FramerEvent]:
    framer.receive_data(data)
    return drain(framer)


def test_one_message():
    framer = SipStreamFramer()
    assert feed(framer, message()) == [message()]
    assert framer.buffered == 0
    assert framer.messages_received == 1
    msg = parse_message_untrusted(message())
    assert msg.body == BODY


def test_back_to_back_messages_in_one_chunk():
    framer = SipStreamFramer()
    data = message(1) + message(2) + message(3, b"")
    assert feed(framer, data) == [message(1), message(2), message(3, b"")]


def test_every_split_point():
    data = message(1) + message(2)
    for cut in range(len(data) + 1):
        framer = SipStreamFramer()
        events = feed(framer, data[:cut]) + feed(framer, data[cut:])
        assert events == [message(1), message(2)], cut


def test_byte_by_byte():
    data = message(1) + KEEPALIVE_PING + message(2)
    framer = SipStreamFramer()
    events: list[FramerEvent] = []
    for i in range(len(data)):
        events += feed(framer, data[i : i + 1])
    assert events == [message(1), KeepAlivePing(), message(2)]


def test_ping_between_messages_is_reported():
    framer = SipStreamFramer()
    events = feed(framer, KEEPALIVE_PING + message(1) + KEEPALIVE_PING + KEEPALIVE_PING)
    assert events == [KeepAlivePing(), message(1), KeepAlivePing(), KeepAlivePing()]
    assert framer.pings_received == 3


def test_server_waits_for_the_second_half_of_a_split_ping():
    framer = SipStreamFramer()
    assert feed(framer, b"\r\n") == []
    assert framer.buffered == 2
    assert feed(framer, b"\r") == []
    assert feed(framer, b"\n") == [KeepAlivePing()]


def test_server_treats_a_stray_crlf_before_a_message_as_a_pong():
    framer = SipStreamFramer()
    assert feed(framer, b"\r\n") == []
    assert feed(framer, message()) == [KeepAlivePong(), message()]


def test_client_reports_a_pong_at_once():
    framer = SipStreamFramer(client=True)
    assert feed(framer, KEEPALIVE_PONG) == [KeepAlivePong()]
    assert feed(framer, b"\r\n\r") == []
    assert feed(framer, b"\nI") == [KeepAlivePing()]
    assert framer.buffered == 1


def test_missing_content_length_is_an_error_with_the_request():
    framer = SipStreamFramer()
    data = message().replace(b"Content-Length: %d\r\n" % len(BODY), b"")
    framer.receive_data(data)
    with pytest.raises(SipParseError) as info:
        framer.next_message()
    exc = info.value
    assert (exc.status, exc.reason) == (400, "Missing Content-Length on a stream transport")
    assert isinstance(exc.request, SipRequest)
    reply = error_response(exc)
    assert reply is not None and reply.call_id == "call1"
    # The stream cannot be resynchronised: the error sticks.
    framer.receive_data(message())
    with pytest.raises(SipParseError) as again:
        framer.next_message()
    assert again.value is exc


def test_response_without_content_length_cannot_be_answered():
    framer = SipStreamFramer()
    framer.receive_data(b"SIP/2.0 200 OK\r\nCall-ID: x\r\n\r\n")
    with pytest.raises(SipParseError) as info:
        framer.next_message()
    assert info.value.request is None


@pytest.mark.parametrize(
    "header", [b"Content-Length: -1", b"Content-Length: x", b"Content-Length: 1\r\nl: 1"]
)
def test_bad_content_length(header):
    framer = SipStreamFramer()
    framer.receive_data(message(body=b"").replace(b"Content-Length: 0", header))
    with pytest.raises(SipParseError) as info:
        framer.next_message()
    assert info.value.status == 400


def test_compact_and_folded_content_length():
    data = message(body=b"abc").replace(b"Content-Length: 3", b"l :\r\n 3")
    assert feed(SipStreamFramer(), data) == [data]


def test_body_too_large_is_413():
    framer = SipStreamFramer(SipLimits(max_body_size=4))
    framer.receive_data(message())
    with pytest.raises(SipParseError) as info:
        framer.next_message()
    assert info.value.status == 413


def test_message_too_large_is_513():
    framer = SipStreamFramer(SipLimits(max_message_size=200))
    framer.receive_data(message(body=b"x" * 100))
    with pytest.raises(SipParseError) as info:
        framer.next_message()
    assert info.value.status == 513


def test_endless_header_section_is_bounded():
    framer = SipStreamFramer(SipLimits(max_message_size=1000))
    framer.receive_data(b"OPTIONS sip:a@b SIP/2.0\r\n")
    for _ in range(100):
        try:
            framer.receive_data(b"X-Junk: " + b"y" * 20 + b"\r\n")
            assert framer.next_message() is None
        except SipParseError as exc:
            assert exc.status == 513
            assert framer.buffered <= 1100
            return
    raise AssertionError("the framer kept buffering")


def test_eof():
    framer = SipStreamFramer()
    framer.receive_data(message()[:-3])
    assert framer.next_message() is None
    framer.receive_data(b"")
    with pytest.raises(SipParseError, match="closed in the middle"):
        framer.next_message()
    clean = SipStreamFramer()
    clean.receive_data(message())
    clean.receive_data(b"")
    assert drain(clean) == [message()]
    lone = SipStreamFramer()
    lone.receive_data(b"\r\n")
    lone.receive_data(b"")
    assert drain(lone) == [KeepAlivePong()]


def test_datagram_keepalives():
    assert is_datagram_keepalive(b"\r\n\r\n")
    assert is_datagram_keepalive(b"\r\n")
    assert is_datagram_keepalive(b"\x00\x00\x00\x00")
    assert not is_datagram_keepalive(b"")
    assert not is_datagram_keepalive(message())
    assert not is_datagram_keepalive(b"\r\nX")


# --- properties ---------------------------------------------------------------------------

ITEMS = st.lists(
    st.one_of(
        st.just(KEEPALIVE_PING),
        st.builds(message, st.integers(0, 999), st.binary(max_size=40)),
    ),
    max_size=6,
)


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out = []
    pos = 0
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        out.append(data[pos : pos + size])
        pos += size
        i += 1
    return out


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ITEMS, st.lists(st.integers(1, 50), min_size=1, max_size=10))
def test_any_chunking_gives_the_same_events(items, sizes):
    framer = SipStreamFramer()
    events: list[FramerEvent] = []
    for chunk in _chunks(b"".join(items), sizes):
        events += feed(framer, chunk)
    framer.receive_data(b"")
    events += drain(framer)
    assert events == [KeepAlivePing() if item == KEEPALIVE_PING else item for item in items]
    assert framer.buffered == 0


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.builds(message, st.integers(0, 999), st.binary(max_size=40)), max_size=5),
    st.lists(st.booleans(), min_size=5, max_size=5),
    st.lists(st.integers(1, 50), min_size=1, max_size=10),
)
def test_client_sees_each_pong_before_a_message(messages, pongs, sizes):
    items: list[bytes] = []
    for msg, pong in zip(messages, pongs, strict=False):
        if pong:
            items.append(KEEPALIVE_PONG)
        items.append(msg)
    framer = SipStreamFramer(client=True)
    events: list[FramerEvent] = []
    for chunk in _chunks(b"".join(items), sizes):
        events += feed(framer, chunk)
    assert events == [KeepAlivePong() if item == KEEPALIVE_PONG else item for item in items]


def test_a_caller_that_does_not_drain_is_stopped():
    framer = SipStreamFramer(SipLimits(max_message_size=500))
    framer.receive_data(message(1) * 3)
    with pytest.raises(SipParseError) as info:
        framer.receive_data(message(2))
    assert info.value.status == 513
    with pytest.raises(SipParseError):
        framer.next_message()


def test_a_big_read_of_many_messages_is_fine_when_drained():
    framer = SipStreamFramer(SipLimits(max_message_size=500))
    for n in range(5):
        assert feed(framer, message(n) * 4) == [message(n)] * 4
