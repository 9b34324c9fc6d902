"""Tests for the trunk's per-message fast paths: they must do exactly what the slow ones did.

Covers `FrameDecoder.frames_untrusted` (every complete frame of a read in one pass), the
compiled per-class codecs, `append_message` with a reused Packer, `decode_body_untrusted`, the
session's delivery loop and batched output, and the trio adapter handing out already-decoded
events without a schedule point each (but with enough of them that a flood starves nobody).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from shared.aio.trunk import EVENTS_PER_SCHEDULE_POINT, TrunkConnection
from shared.wire.frame import (
    DEFAULT_MAX_BODY,
    HEADER_SIZE,
    ErrorCode,
    Frame,
    FrameDecoder,
    WireError,
    encode_frame,
)
from shared.wire.messages import (
    MAX_DEPTH,
    MESSAGES,
    AnnouncementReport,
    CallProgress,
    CallRecordInfo,
    CallRecords,
    DirectoryAck,
    DirectoryEntry,
    DirectorySnapshot,
    Heartbeat,
    LanInterface,
    Message,
    OfficeReport,
    UnknownMessage,
    append_message,
    decode_body_untrusted,
    decode_message_untrusted,
    encode_body,
    encode_message,
    message,
    new_packer,
)
from shared.wire.session import Closed, Ignored, LoggedIn, LoginAttempt, Received, TrunkSession
from tests.wirehelpers import SessionPair, any_message, frames_in, message_strategy

# --- frames_untrusted --------------------------------------------------------------------------


def some_frames(n: int) -> list[Frame]:
    return [Frame(300 + i, i, bytes([i]) * i, i % 3) for i in range(n)]


def wire_of(frames: list[Frame]) -> bytes:
    return b"".join(encode_frame(f.type, f.body, channel=f.channel, flags=f.flags) for f in frames)


def as_frames(decoder: FrameDecoder) -> list[Frame]:
    return [Frame(t, c, bytes(b), f) for t, f, c, b in decoder.frames_untrusted()]


def test_one_pass_yields_every_complete_frame_and_keeps_the_partial_one() -> None:
    frames = some_frames(20)
    data = wire_of(frames)
    decoder = FrameDecoder()
    decoder.feed(data[:-3])
    assert as_frames(decoder) == frames[:-1]
    assert decoder.buffered == HEADER_SIZE + len(frames[-1].body) - 3
    decoder.feed(data[-3:])
    assert as_frames(decoder) == frames[-1:]
    assert decoder.buffered == 0


def test_consumed_bytes_are_dropped_once_no_frame_is_left() -> None:
    decoder = FrameDecoder()
    decoder.feed(wire_of(some_frames(30)) + b"\x00\x00")
    as_frames(decoder)
    # Not only counted as read: gone from memory, so the decoder holds one partial frame at most.
    assert len(decoder._buffer) == decoder.buffered == 2


def test_a_caller_that_stops_early_finds_the_rest_later() -> None:
    frames = some_frames(10)
    decoder = FrameDecoder()
    decoder.feed(wire_of(frames))
    taken = []
    for type_code, flags, channel, body in decoder.frames_untrusted():
        taken.append(Frame(type_code, channel, bytes(body), flags))
        if len(taken) == 4:
            break
    assert taken == frames[:4]
    assert decoder.next_frame_untrusted() == frames[4]
    assert as_frames(decoder) == frames[5:]


def test_frames_before_an_oversized_header_are_delivered_first() -> None:
    frames = some_frames(3)
    decoder = FrameDecoder(max_body=100)
    decoder.feed(wire_of(frames) + b"\x00\x00\x00\x65" + bytes(8))  # a body of 101 bytes
    seen = []
    with pytest.raises(WireError) as info:
        for type_code, flags, channel, body in decoder.frames_untrusted():
            seen.append(Frame(type_code, channel, bytes(body), flags))
    assert seen == frames
    assert info.value.code == ErrorCode.TOO_LARGE
    # The bad header stays where it is: asking again gives the same error, nothing else.
    with pytest.raises(WireError):
        decoder.next_frame_untrusted()


def test_a_yielded_body_is_the_callers_own_copy() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(300, b"abc") + encode_frame(301, b"def"))
    bodies = [body for _, _, _, body in decoder.frames_untrusted()]
    bodies[0][:] = b"xyz"
    decoder.feed(encode_frame(302, b"ghi"))
    assert [bytes(b) for b in bodies] == [b"xyz", b"def"]
    assert decoder.next_frame_untrusted() == Frame(302, 0, b"ghi")


@given(
    st.lists(
        st.builds(
            Frame,
            type=st.integers(0, 0xFFFF),
            channel=st.integers(0, 0xFFFFFFFF),
            body=st.binary(max_size=60),
            flags=st.integers(0, 0xFFFF),
        ),
        max_size=12,
    ),
    st.lists(st.integers(1, 50), max_size=20),
)
def test_one_pass_and_one_at_a_time_agree_on_any_split(
    frames: list[Frame], cuts: list[int]
) -> None:
    data = wire_of(frames)
    fast, slow = FrameDecoder(), FrameDecoder()
    got_fast: list[Frame] = []
    got_slow: list[Frame] = []
    pos = 0
    for size in [*cuts, len(data)]:
        chunk = data[pos : pos + size]
        pos += size
        fast.feed(chunk)
        slow.feed(chunk)
        got_fast += as_frames(fast)
        got_slow += iter(slow.next_frame_untrusted, None)
        assert fast.buffered == slow.buffered
    assert got_fast == got_slow == frames


# --- the compiled codecs -----------------------------------------------------------------------


@given(st.lists(any_message(), min_size=1, max_size=8), st.integers(0, 0xFFFFFFFF))
def test_append_message_with_a_reused_packer_is_encode_message(
    msgs: list[Message], channel: int
) -> None:
    packer = new_packer()
    out = bytearray()
    for msg in msgs:
        append_message(out, msg, packer, channel=channel)
        assert encode_body(msg, packer) == encode_body(msg)
    assert bytes(out) == b"".join(encode_message(m, channel=channel) for m in msgs)


@given(any_message(), st.integers(0, 0xFFFFFFFF))
def test_decode_body_untrusted_is_decode_message_untrusted(msg: Message, channel: int) -> None:
    body = encode_body(msg)
    assert decode_body_untrusted(msg.TYPE, channel, bytearray(body)) == msg
    assert decode_message_untrusted(Frame(msg.TYPE, channel, body)) == msg


def test_an_unknown_type_keeps_its_body_as_bytes() -> None:
    code = max(MESSAGES) + 1
    unknown = decode_body_untrusted(code, 5, bytearray(b"\xc1 opaque"))
    assert unknown == UnknownMessage(code, 5, b"\xc1 opaque")
    assert isinstance(unknown, UnknownMessage) and type(unknown.body) is bytes


def test_a_failed_encode_leaves_the_packer_clean() -> None:
    packer = new_packer()
    with pytest.raises((OverflowError, TypeError)):
        append_message(bytearray(), DirectoryAck(2**70), packer)
    out = bytearray()
    with pytest.raises(TypeError):
        append_message(out, CallProgress("c", 180, reason=object()), packer)  # type: ignore[arg-type]
    assert out == b""  # nothing half-written
    append_message(out, Heartbeat(1), packer)
    # docs/wire-protocol.md §2's example frame, byte for byte: no leftover of the failures.
    assert bytes(out) == bytes.fromhex("00000006 0006 0000 00000000 81a3736571 01")


def test_records_and_nested_values_are_sent_as_plain_maps() -> None:
    report = OfficeReport(lan=[LanInterface("eth0", ["192.0.2.1"])], stun_ip=None)
    body = msgpack.unpackb(encode_body(report, new_packer()))
    assert body["lan"] == [{"name": "eth0", "addresses": ["192.0.2.1"]}]
    assert body["stun_ip"] is None
    info = CallRecordInfo("o", "b", 1, "c", "ended", 1.5)
    (plain,) = msgpack.unpackb(encode_body(CallRecords([info])))["records"]
    assert plain == {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}


def test_tuples_go_out_as_arrays_like_lists() -> None:
    entries = (DirectoryEntry("101", "a", "b"),)
    snapshot = DirectorySnapshot("o", "r", 1, 100, 199, entries)  # type: ignore[arg-type]
    decoded = decode_message_untrusted(Frame(DirectorySnapshot.TYPE, 0, encode_body(snapshot)))
    assert isinstance(decoded, DirectorySnapshot) and decoded.entries == list(entries)


def test_a_default_factory_gives_every_decoded_message_its_own_value() -> None:
    first = decode_body_untrusted(OfficeReport.TYPE, 0, msgpack.packb({}))
    second = decode_body_untrusted(OfficeReport.TYPE, 0, msgpack.packb({}))
    assert isinstance(first, OfficeReport) and isinstance(second, OfficeReport)
    assert first.lan == [] and first.lan is not second.lan


def test_an_int_is_accepted_for_a_float_and_becomes_one() -> None:
    body = msgpack.packb({"ext": "1", "contact": "c", "expires_at": 7})
    from shared.wire.messages import RegistrationInfo, RegistrationUpdate

    update = decode_body_untrusted(
        RegistrationUpdate.TYPE,
        0,
        msgpack.packb({"complete": True, "bindings": [msgpack.unpackb(body)]}),
    )
    assert isinstance(update, RegistrationUpdate)
    (binding,) = update.bindings
    assert binding == RegistrationInfo("1", "c", 7.0) and type(binding.expires_at) is float


def bad_reason(cls: type[Message], body: Any) -> str:
    with pytest.raises(WireError) as info:
        decode_body_untrusted(cls.TYPE, 0, msgpack.packb(body))
    assert info.value.code == ErrorCode.BAD_MESSAGE
    return info.value.reason


def test_error_paths_name_list_items_record_fields_and_map_keys() -> None:
    assert bad_reason(OfficeReport, {"lan": [{"name": "a"}, {"addresses": []}]}) == (
        "OfficeReport.lan[1]: required field 'name' is missing"
    )
    assert bad_reason(OfficeReport, {"lan": [{"name": "a"}, 7]}) == (
        "OfficeReport.lan[1]: body is not a map"
    )
    assert bad_reason(AnnouncementReport, {"id": "x", "failed": {"2001": "ok", "2002": 5}}) == (
        "AnnouncementReport.failed.2002: expected str, got int"
    )
    assert bad_reason(CallProgress, {"call_id": "c", "status": "180"}) == (
        "CallProgress.status: expected an integer, got str"
    )
    assert bad_reason(OfficeReport, {"stun_port": True}) == (
        "OfficeReport.stun_port: expected an integer, got bool"
    )


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("where", ["unknown", "known"])
def test_depth_is_counted_in_fields_read_or_not(where: str) -> None:
    name = "future" if where == "unknown" else "extensions"
    # The body map is level 1, so a field may hold MAX_DEPTH - 1 levels of arrays.
    ok = {"complete": True, name: nested(MAX_DEPTH)}
    too_deep = {"complete": True, name: nested(MAX_DEPTH + 1)}
    from shared.wire.messages import RegistrationUpdate

    if where == "unknown":
        assert isinstance(
            decode_body_untrusted(RegistrationUpdate.TYPE, 0, msgpack.packb(ok)),
            RegistrationUpdate,
        )
    assert "nesting deeper than" in bad_reason(RegistrationUpdate, too_deep)


SCALAR_ONLY = [cls for cls in MESSAGES.values() if cls._spec.exact_build is not None]


def test_the_shortcut_exists_for_scalar_messages_only() -> None:
    assert CallProgress in SCALAR_ONLY and Heartbeat in SCALAR_ONLY
    assert OfficeReport not in SCALAR_ONLY  # lists and records need their checkers


@given(st.sampled_from(SCALAR_ONLY).flatmap(message_strategy))
def test_the_shortcut_agrees_with_the_full_build(msg: Message) -> None:
    spec = msg._spec
    body = msgpack.unpackb(encode_body(msg))
    shortcut = spec.exact_build(body)  # type: ignore[misc]
    assert shortcut is None or shortcut == spec.build(body) == msg
    # Anything but exactly what our encoder writes is left to the full build.
    assert spec.exact_build({**body, "later": 1}) is None  # type: ignore[misc]
    if body:
        first = next(iter(body))
        assert spec.exact_build({k: v for k, v in body.items() if k != first}) is None  # type: ignore[misc]
        assert spec.exact_build({**body, first: [body[first]]}) is None  # type: ignore[misc]


def test_a_scalar_message_with_a_deep_unknown_field_is_still_refused() -> None:
    fields = {"call_id": "c", "status": 180, "reason": ""}
    ok = {**fields, "later": nested(MAX_DEPTH)}
    assert decode_body_untrusted(CallProgress.TYPE, 0, msgpack.packb(ok)) == CallProgress("c", 180)
    assert "nesting deeper than" in bad_reason(CallProgress, {**ok, "later": nested(MAX_DEPTH + 1)})
    # A known field nested too deep: the depth error, as before, not a type error.
    too_deep = {**fields, "call_id": nested(MAX_DEPTH + 1)}
    assert "nesting deeper than" in bad_reason(CallProgress, too_deep)
    wrong = {**fields, "call_id": nested(MAX_DEPTH)}
    assert bad_reason(CallProgress, wrong) == "CallProgress.call_id: expected str, got list"


@pytest.fixture
def registry_guard() -> Iterator[None]:
    saved = dict(MESSAGES)
    yield
    MESSAGES.clear()
    MESSAGES.update(saved)


@pytest.mark.usefixtures("registry_guard")
def test_keyword_only_and_non_init_fields_are_refused_at_registration() -> None:
    with pytest.raises(TypeError, match="positional"):

        @message(60001)
        @dataclass(frozen=True, slots=True, kw_only=True)
        class KeywordOnly(Message):
            a: int

    with pytest.raises(TypeError, match="positional"):

        @message(60002)
        @dataclass(frozen=True, slots=True)
        class NotInInit(Message):
            a: int
            b: int = field(default=0, init=False)


@pytest.mark.usefixtures("registry_guard")
def test_a_newly_registered_class_gets_a_working_codec() -> None:
    @message(60003)
    @dataclass(frozen=True, slots=True)
    class Probe(Message):
        name: str
        count: int = 3
        ratio: float | None = None
        tags: list[str] = field(default_factory=list)
        entries: list[DirectoryEntry] = field(default_factory=list)

    full = Probe("p", 1, 0.5, ["a"], [DirectoryEntry("1", "h", "s")])
    assert decode_body_untrusted(60003, 0, encode_body(full, new_packer())) == full
    assert decode_body_untrusted(60003, 0, msgpack.packb({"name": "q"})) == Probe("q")
    assert bad_reason(Probe, {"count": 1}) == "Probe: required field 'name' is missing"


# --- the session: delivery in one pass, output in one piece ------------------------------------


def established() -> SessionPair:
    pair = SessionPair()
    pair.login()
    pair.take(pair.client), pair.take(pair.server)
    return pair


def test_everything_queued_since_the_last_write_goes_out_in_one_piece() -> None:
    pair = established()
    client = pair.client
    assert client.pending_output == 0
    msgs = [CallProgress(f"call-{i}", 180, "Ringing") for i in range(100)]
    for i, msg in enumerate(msgs):
        client.send(msg, channel=i)
    queued = client.pending_output
    data = client.data_to_send()
    assert len(data) == queued > 0
    assert frames_in(data) == msgs
    assert client.pending_output == 0 and client.data_to_send() == b""


def test_one_chunk_with_every_kind_of_frame_is_delivered_in_order() -> None:
    pair = established()
    server = pair.server
    unknown = max(MESSAGES) + 7
    chunk = b"".join(
        [
            encode_message(CallProgress("a", 180), channel=3),
            encode_message(Heartbeat(1)),
            encode_frame(unknown, b"?", channel=9),
            encode_message(DirectoryAck(4)),
            encode_message(CallProgress("b", 183), channel=5),
        ]
    )
    server.receive_data(chunk, pair.now)
    assert list(iter(server.next_event, None)) == [
        Received(CallProgress("a", 180), 3),
        Ignored(UnknownMessage(unknown, 9, b"?")),
        Received(DirectoryAck(4), 0),
        Received(CallProgress("b", 183), 5),
    ]
    assert server.pending_events == 0


def test_a_bad_message_mid_chunk_ends_delivery_there() -> None:
    pair = established()
    server = pair.server
    chunk = (
        encode_message(DirectoryAck(1))
        + encode_frame(DirectoryAck.TYPE, msgpack.packb({"version": "one"}))
        + encode_message(DirectoryAck(3))
    )
    server.receive_data(chunk, pair.now)
    events = list(iter(server.next_event, None))
    assert events[0] == Received(DirectoryAck(1), 0)
    assert isinstance(events[1], Closed) and events[1].code == ErrorCode.BAD_MESSAGE
    assert len(events) == 2
    assert frames_in(server.data_to_send())[-1].code == ErrorCode.BAD_MESSAGE  # type: ignore[union-attr]


def test_an_oversized_frame_mid_chunk_ends_delivery_there() -> None:
    pair = established()
    server = pair.server
    chunk = encode_message(DirectoryAck(1)) + (DEFAULT_MAX_BODY + 1).to_bytes(4, "big") + bytes(8)
    server.receive_data(chunk, pair.now)
    events = list(iter(server.next_event, None))
    assert events[0] == Received(DirectoryAck(1), 0)
    assert isinstance(events[1], Closed) and events[1].code == ErrorCode.TOO_LARGE


def test_a_session_message_in_the_middle_of_application_ones_is_still_the_sessions() -> None:
    pair = established()
    server = pair.server
    from shared.wire.messages import Close, Hello

    server.receive_data(
        encode_message(DirectoryAck(1)) + encode_message(Hello(1, 1, "x")), pair.now
    )
    events = list(iter(server.next_event, None))
    assert events[0] == Received(DirectoryAck(1), 0)
    assert isinstance(events[1], Closed) and events[1].code == ErrorCode.PROTOCOL
    pair = established()
    pair.server.receive_data(
        encode_message(DirectoryAck(1)) + encode_message(Close(0, "bye")), pair.now
    )
    assert list(iter(pair.server.next_event, None)) == [
        Received(DirectoryAck(1), 0),
        Closed(0, "bye", True),
    ]


# --- the trio adapter --------------------------------------------------------------------------


async def connected_pair() -> tuple[TrunkConnection, TrunkConnection]:
    """Two adapters over an in-memory stream, logged in (the server answered by hand)."""
    from trio.testing import memory_stream_pair

    client_stream, server_stream = memory_stream_pair()
    now = trio.current_time()
    secret = b"k" * 32
    client = TrunkConnection(
        client_stream,
        TrunkSession.client(now, office="o", secret=secret, client_nonce=b"c" * 32, software="t"),
    )
    server = TrunkConnection(
        server_stream,
        TrunkSession.server(now, nonce=b"n" * 32, software="t", dead_after=30.0),
    )
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            while not isinstance(event := await server.next_event(), LoggedIn):
                if isinstance(event, LoginAttempt):
                    server.session.complete_login(
                        secret, now=trio.current_time(), public_ip="192.0.2.1", public_port=1,
                        session="s",
                    )  # fmt: skip

        nursery.start_soon(serve)
        while not isinstance(await client.next_event(), LoggedIn):
            pass
    return client, server


async def send_burst(conn: TrunkConnection, count: int) -> list[Message]:
    msgs: list[Message] = [DirectoryAck(i) for i in range(count)]
    for msg in msgs:
        conn.send_nowait(msg)
    await conn.flush()  # one write for all of them
    return msgs


async def test_a_burst_arrives_whole_and_in_order(autojump_clock: Any) -> None:
    client, server = await connected_pair()
    with trio.fail_after(10):
        sent_msgs = await send_burst(client, 1000)
        got = [await server.next_event() for _ in sent_msgs]
    assert got == [Received(m, 0) for m in sent_msgs]


async def test_a_burst_does_not_starve_the_other_tasks(autojump_clock: Any) -> None:
    client, server = await connected_pair()
    ticks = 0
    ticks_seen: list[int] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    count = 20 * EVENTS_PER_SCHEDULE_POINT
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        with trio.fail_after(10):
            await send_burst(client, count)
            for _ in range(count):
                assert isinstance(await server.next_event(), Received)
                ticks_seen.append(ticks)
        nursery.cancel_scope.cancel()
    # The other task ran again and again while the burst was being handed out...
    assert ticks_seen[-1] - ticks_seen[0] >= count // (2 * EVENTS_PER_SCHEDULE_POINT)
    # ...but not once per event: that is the scheduler round trip the fast path saves.
    assert ticks_seen[-1] - ticks_seen[0] <= count // 2


async def test_a_cancelled_caller_loses_no_event(autojump_clock: Any) -> None:
    client, server = await connected_pair()
    sent_msgs = await send_burst(client, 10)
    with trio.fail_after(10):
        first = await server.next_event()  # the read: every frame of the burst is decoded now
    assert server.session.pending_events == 9
    for _ in range(3):
        with trio.CancelScope() as scope:
            scope.cancel()
            await server.next_event()
            raise AssertionError("next_event() did not notice the cancellation")
    rest = [await server.next_event() for _ in range(9)]
    assert [first, *rest] == [Received(m, 0) for m in sent_msgs]


async def test_output_queued_by_the_session_goes_out_before_the_event(
    autojump_clock: Any,
) -> None:
    client, server = await connected_pair()
    await send_burst(client, 3)
    with trio.fail_after(10):
        await server.next_event()
    server.session.send(DirectoryAck(99))  # say, an answer to the first message
    assert server.session.pending_output
    await server.next_event()
    assert server.session.pending_output == 0
    with trio.fail_after(10):
        while not isinstance(event := await client.next_event(), Received):
            pass
    assert event == Received(DirectoryAck(99), 0)


class CountingStream(trio.abc.Stream):
    """A stream that counts the writes made through it (and forwards them)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_send_nowait_queues_and_one_flush_writes_them_all(autojump_clock: Any) -> None:
    client, server = await connected_pair()
    counting = CountingStream(client.stream)
    client.stream = counting
    for i in range(5):
        client.send_nowait(DirectoryAck(i), channel=i)
    assert counting.writes == []  # nothing written yet
    await client.flush()
    assert len(counting.writes) == 1
    assert frames_in(counting.writes[0]) == [DirectoryAck(i) for i in range(5)]
    await client.send(DirectoryAck(5))
    assert len(counting.writes) == 2
    with trio.fail_after(10):
        got = [await server.next_event() for _ in range(6)]
    assert got == [Received(DirectoryAck(i), i if i < 5 else 0) for i in range(6)]


async def test_send_nowait_before_login_is_connection_lost(autojump_clock: Any) -> None:
    from trio.testing import memory_stream_pair

    from shared.aio.trunk import ConnectionLost

    stream, _ = memory_stream_pair()
    session = TrunkSession.client(
        0.0, office="o", secret=b"k" * 32, client_nonce=b"c" * 32, software="t"
    )
    conn = TrunkConnection(stream, session)
    hello = session.pending_output
    with pytest.raises(ConnectionLost, match="not established"):
        conn.send_nowait(DirectoryAck(1))
    assert session.pending_output == hello  # nothing queued


class SlowStream(CountingStream):
    """Each write takes a second (of mock time), so a second writer finds the lock taken."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep(1)
        await super().send_all(data)


async def test_a_second_writer_waits_its_turn_and_nothing_interleaves(autojump_clock: Any) -> None:
    client, server = await connected_pair()
    slow = SlowStream(client.stream)
    client.stream = slow
    order: list[str] = []

    async def writer(name: str, first: int) -> None:
        for i in range(first, first + 3):
            client.send_nowait(DirectoryAck(i))
        await client.flush()
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, "a", 0)
        await trio.testing.wait_all_tasks_blocked()  # a is inside its write, holding the lock
        nursery.start_soon(writer, "b", 3)
    assert order == ["a", "b"]
    assert [frames_in(w) for w in slow.writes] == [
        [DirectoryAck(i) for i in range(3)],
        [DirectoryAck(i) for i in range(3, 6)],
    ]
    with trio.fail_after(10):
        got = [await server.next_event() for _ in range(6)]
    assert got == [Received(DirectoryAck(i), 0) for i in range(6)]


async def test_a_cancelled_flush_writes_nothing_and_keeps_the_frames(autojump_clock: Any) -> None:
    client, server = await connected_pair()
    counting = CountingStream(client.stream)
    client.stream = counting
    client.send_nowait(DirectoryAck(1))
    queued = client.session.pending_output
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.flush()
    assert counting.writes == [] and client.session.pending_output == queued
    await client.flush()
    assert frames_in(counting.writes[0]) == [DirectoryAck(1)]
    with trio.fail_after(10):
        assert await server.next_event() == Received(DirectoryAck(1), 0)
