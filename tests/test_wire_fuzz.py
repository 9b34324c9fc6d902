"""Fuzz tests for the trunk: whatever bytes a peer sends, only our own error comes out.

- `FrameDecoder.next_frame_untrusted` and `decode_message_untrusted` raise nothing but
  `WireError` (never IndexError, struct.error, UnicodeDecodeError, KeyError, TypeError, ...).
- `TrunkSession.receive_data` raises nothing at all: every error of the peer becomes a Close.
- What the decoder accepts has exactly the declared field types, so code above it can trust them.

Inputs are random bytes, random msgpack structures under the right field names, and valid
conversations with bytes flipped, inserted, deleted, duplicated or cut.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.wire.frame import HEADER_SIZE, ErrorCode, Frame, FrameDecoder, WireError, encode_frame
from shared.wire.messages import (
    MESSAGES,
    RECORDS,
    DirectoryAck,
    DirectoryEntry,
    DirectorySnapshot,
    Heartbeat,
    LanInterface,
    Message,
    OfficeReport,
    UnknownMessage,
    decode_message_untrusted,
    encode_body,
    encode_message,
)
from shared.wire.session import Closed, Event, State, TrunkSession
from tests.test_wire_session import client_in, server_in
from tests.wirehelpers import SessionPair, any_message, frames_in

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODES = sorted(MESSAGES)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
msgpack_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.binary(max_size=4), children, max_size=4)
    ),
    max_leaves=25,
)


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def decode_or_wire_error(frame: Frame) -> Message | UnknownMessage | None:
    try:
        return decode_message_untrusted(frame)
    except WireError as exc:
        assert exc.code == ErrorCode.BAD_MESSAGE
        assert exc.reason  # a reason a human can read in the log
        return None


def conforms(value: Any, hint: Any) -> bool:
    """Is `value` exactly of the declared field type (bool is not int, records are records)?"""
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return type(value) is float
    if hint in (str, bytes):
        return type(value) is hint
    if hint in RECORDS:
        return type(value) is hint and _fields_conform(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return value is None or conforms(value, next(a for a in args if a is not type(None)))
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and conforms(v, args[1]) for k, v in value.items()
        )
    raise AssertionError(f"unexpected field type {hint!r}")


def _fields_conform(obj: Any) -> bool:
    hints = typing.get_type_hints(type(obj))
    return all(conforms(getattr(obj, f.name), hints[f.name]) for f in dataclasses.fields(obj))


def has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list):
        return any(has_nan(v) for v in value)
    if isinstance(value, dict):
        return any(has_nan(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(has_nan(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False


# --- the frame decoder -------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 300), st.lists(st.integers(1, 50), max_size=10))
def test_frame_decoder_random_bytes(data: bytes, max_body: int, chunks: list[int]) -> None:
    decoder = FrameDecoder(max_body=max_body)
    position = 0
    for size in [*chunks, len(data)]:
        decoder.feed(data[position : position + size])
        position += size
        try:
            while (frame := decoder.next_frame_untrusted()) is not None:
                assert len(frame.body) <= max_body
                decode_or_wire_error(frame)
        except WireError as exc:
            assert exc.code == ErrorCode.TOO_LARGE
            return
    assert decoder.buffered < HEADER_SIZE + max_body + 1


@FUZZ
@given(st.sampled_from(CODES), st.binary(max_size=200))
def test_decode_random_bodies_of_every_registered_type(code: int, body: bytes) -> None:
    decode_or_wire_error(Frame(code, 0, body))


@FUZZ
@given(st.sampled_from(CODES), msgpack_values)
def test_decode_random_msgpack_of_every_registered_type(code: int, value: Any) -> None:
    decode_or_wire_error(Frame(code, 0, pack(value)))


@st.composite
def damaged_bodies(draw: st.DrawFn) -> tuple[type[Message], Any]:
    """A valid message's body map with some fields replaced, removed or added at random."""
    msg = draw(any_message())
    body: dict[Any, Any] = msgpack.unpackb(encode_body(msg), raw=False)
    for name in list(body):
        action = draw(st.sampled_from(["keep", "keep", "replace", "delete"]))
        if action == "replace":
            body[name] = draw(msgpack_values)
        elif action == "delete":
            del body[name]
    body.update(draw(st.dictionaries(st.text(max_size=6), msgpack_values, max_size=3)))
    return type(msg), body


@FUZZ
@given(damaged_bodies())
def test_whatever_decodes_has_exactly_the_declared_types(case: tuple[type[Message], Any]) -> None:
    cls, body = case
    decoded = decode_or_wire_error(Frame(cls.TYPE, 0, pack(body)))
    if decoded is None:
        return
    assert type(decoded) is cls
    assert _fields_conform(decoded), decoded
    # And it re-encodes: nothing the peer sent can make our own encoder fail later.
    again = decode_message_untrusted(Frame(cls.TYPE, 0, encode_body(decoded)))
    if not has_nan(decoded):
        assert again == decoded


def test_deep_nesting_built_by_hand_is_bad_message() -> None:
    # Deeper than msgpack's own packer allows, so it is written byte by byte.
    for opener in (b"\x91", b"\x81\xa1k"):
        body = b"\x81\xa3seq" + opener * 100_000 + b"\x01"
        assert decode_or_wire_error(Frame(Heartbeat.TYPE, 0, body)) is None


def test_huge_declared_sizes_with_tiny_bodies_are_bad_message() -> None:
    for body in (
        b"\xdd\xff\xff\xff\xff",  # array 32 of 4 billion items
        b"\xdf\xff\xff\xff\xff",  # map 32
        b"\xdb\xff\xff\xff\xff",  # str 32
        b"\xc6\xff\xff\xff\xff",  # bin 32
        b"\xc9\xff\xff\xff\xff\x01",  # ext 32
    ):
        for code in CODES:
            assert decode_or_wire_error(Frame(code, 0, body)) is None


# --- sessions: nothing escapes receive_data ----------------------------------------------------

SESSION_STATES = [
    ("server", State.START),
    ("server", State.CHALLENGED),
    ("server", State.VERIFYING),
    ("server", State.ESTABLISHED),
    ("client", State.HELLO_SENT),
    ("client", State.LOGIN_SENT),
    ("client", State.ESTABLISHED),
]


def session_in(which: tuple[str, State]) -> TrunkSession:
    role, state = which
    session = server_in(state) if role == "server" else client_in(state)
    while session.next_event() is not None:
        pass
    session.data_to_send()
    return session


def feed_chunks(session: TrunkSession, data: bytes, chunks: list[int], now: float) -> list[Event]:
    """Feed `data` in the given chunk sizes; receive_data must never raise."""
    position = 0
    for size in [*chunks, len(data)]:
        piece = data[position : position + size]
        position += size
        if piece:
            session.receive_data(piece, now)
    return list(iter(session.next_event, None))


def check_consistent(session: TrunkSession, events: list[Event]) -> None:
    closes = [e for e in events if isinstance(e, Closed)]
    assert len(closes) <= 1
    if closes:
        assert events[-1] is closes[0]
    assert session.closed == bool(closes)
    assert (session.get_timer() is None) == session.closed
    # What the session queued is well-formed: our own decoder reads it without error.
    decoder = FrameDecoder()
    decoder.feed(session.data_to_send())
    while (frame := decoder.next_frame_untrusted()) is not None:
        decode_message_untrusted(frame)
    assert decoder.buffered == 0


@FUZZ
@given(
    st.sampled_from(SESSION_STATES),
    st.binary(max_size=300),
    st.lists(st.integers(1, 40), max_size=8),
)
def test_session_random_bytes(which: tuple[str, State], data: bytes, chunks: list[int]) -> None:
    session = session_in(which)
    events = feed_chunks(session, data, chunks, now=1000.5)
    check_consistent(session, events)


@FUZZ
@given(
    st.sampled_from(SESSION_STATES),
    st.lists(
        st.tuples(any_message(), st.integers(0, 0xFFFFFFFF))
        | st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=20)),
        max_size=6,
    ),
    st.lists(st.integers(1, 40), max_size=8),
)
def test_session_random_valid_frames(
    which: tuple[str, State], items: list[tuple[Any, Any]], chunks: list[int]
) -> None:
    session = session_in(which)
    data = b""
    for first, second in items:
        if isinstance(first, int):
            data += encode_frame(first, pack(second) if first in MESSAGES else second)
        else:
            data += encode_message(first, channel=second)
    events = feed_chunks(session, data, chunks, now=1000.5)
    check_consistent(session, events)


def _conversation() -> tuple[bytes, bytes]:
    """What a client and a server wrote in one good session with some traffic."""
    pair = SessionPair()
    pair.login()
    pair.client.send(OfficeReport([LanInterface("eth0", ["192.0.2.10"])], "full-cone"))
    pair.server.send(
        DirectorySnapshot("branch-lyon", "pbx", 4, 100, 199, [DirectoryEntry("101", "a", "b")])
    )
    pair.client.send(DirectoryAck(4), channel=7)
    pair.advance(2.5)
    pair.client.close(ErrorCode.SHUTDOWN, "bye")
    pair.pump()
    return bytes(pair.wire[id(pair.client)]), bytes(pair.wire[id(pair.server)])


CLIENT_STREAM, SERVER_STREAM = _conversation()


@st.composite
def mutated(draw: st.DrawFn, stream: bytes) -> bytes:
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "duplicate", "cut"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xC1, 0x91, 0xDF]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "duplicate":
            end = min(len(data), at + draw(st.integers(1, 40)))
            data[at:at] = data[at:end]
        else:
            del data[at:]
    return bytes(data)


@FUZZ
@given(mutated(CLIENT_STREAM), st.lists(st.integers(1, 64), max_size=8))
def test_server_with_a_mutated_client_stream(data: bytes, chunks: list[int]) -> None:
    server = session_in(("server", State.START))
    events = feed_chunks(server, data, chunks, now=1000.5)
    # A LoginAttempt may come out of it: answer it, the session must still hold together.
    if server.state is State.VERIFYING:
        server.complete_login(b"k" * 32, now=1001.0, public_ip="x", public_port=1, session="s")
        events += list(iter(server.next_event, None))
    server.handle_timer(1000.5 + 1e6)
    events += list(iter(server.next_event, None))
    check_consistent(server, events)
    assert server.closed


@FUZZ
@given(mutated(SERVER_STREAM), st.lists(st.integers(1, 64), max_size=8))
def test_client_with_a_mutated_server_stream(data: bytes, chunks: list[int]) -> None:
    client = session_in(("client", State.HELLO_SENT))
    events = feed_chunks(client, data, chunks, now=1000.5)
    client.handle_timer(1000.5 + 1e6)
    events += list(iter(client.next_event, None))
    check_consistent(client, events)
    assert client.closed


@FUZZ
@given(st.sampled_from(SESSION_STATES), mutated(CLIENT_STREAM + SERVER_STREAM))
def test_any_session_with_mutated_traffic(which: tuple[str, State], data: bytes) -> None:
    session = session_in(which)
    events = feed_chunks(session, data, [], now=1000.5)
    check_consistent(session, events)


def test_the_unmutated_conversation_is_sound() -> None:
    # The fuzz above starts from these streams: they must hold a whole session, every kind of
    # frame the trunk has today, so that mutations reach every state.
    client_said = [type(m).__name__ for m in frames_in(CLIENT_STREAM)]
    server_said = [type(m).__name__ for m in frames_in(SERVER_STREAM)]
    assert client_said == [
        "Hello",
        "Login",
        "OfficeReport",
        "DirectoryAck",
        "Heartbeat",
        "Heartbeat",
        "Close",
    ]
    assert server_said == ["Challenge", "LoginOk", "DirectorySnapshot", "Heartbeat", "Heartbeat"]
