"""Tests for shared.wire.messages: the registry, the msgpack codec and its strictness."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.wire.frame import ErrorCode, Frame, FrameDecoder, WireError, encode_frame
from shared.wire.messages import (
    MAX_DEPTH,
    MESSAGES,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    RECORDS,
    Challenge,
    Close,
    DirectoryAck,
    DirectoryDelta,
    DirectoryEntry,
    DirectorySnapshot,
    Heartbeat,
    Hello,
    LanInterface,
    Login,
    LoginOk,
    LoginRefused,
    Message,
    OfficeReport,
    UnknownMessage,
    decode_message_untrusted,
    encode_body,
    encode_message,
    message,
)
from tests.wirehelpers import any_message, message_strategy, strategy_for

REGISTERED = sorted(MESSAGES.items())
CLASSES = [cls for _, cls in REGISTERED]


def frame_of(cls: type[Message], body: Any, *, raw: bool = False, channel: int = 0) -> Frame:
    data = body if raw else msgpack.packb(body, use_bin_type=True)
    return Frame(cls.TYPE, channel, data)


def decode(cls: type[Message], body: Any, *, raw: bool = False) -> Message | UnknownMessage:
    return decode_message_untrusted(frame_of(cls, body, raw=raw))


def bad_message(cls: type[Message], body: Any, *, raw: bool = False) -> WireError:
    with pytest.raises(WireError) as info:
        decode(cls, body, raw=raw)
    assert info.value.code == ErrorCode.BAD_MESSAGE
    return info.value


def plain(msg: Message) -> dict[str, Any]:
    result: dict[str, Any] = msgpack.unpackb(encode_body(msg), raw=False)
    return result


def fields_of(cls: type[Any]) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(cls)


def hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def required(cls: type[Any]) -> list[str]:
    return [
        f.name
        for f in fields_of(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


# --- registry ----------------------------------------------------------------------------------


def test_catalogue_codes() -> None:
    # Codes are forever: a peer of another version relies on them. Changing one is a new protocol.
    expected = {
        1: Hello,
        2: Challenge,
        3: Login,
        4: LoginOk,
        5: LoginRefused,
        6: Heartbeat,
        7: Close,
        100: OfficeReport,
        101: DirectorySnapshot,
        102: DirectoryDelta,
        103: DirectoryAck,
    }
    for code, cls in expected.items():
        assert MESSAGES[code] is cls
        assert code == cls.TYPE


def test_type_codes_are_unique_and_fit_the_frame() -> None:
    assert len({cls.TYPE for cls in CLASSES}) == len(CLASSES)
    assert len(set(CLASSES)) == len(CLASSES)
    for code, cls in REGISTERED:
        assert code == cls.TYPE
        assert 0 < code <= 0xFFFF
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen


@pytest.fixture
def registry_guard() -> Iterator[None]:
    saved = dict(MESSAGES)
    yield
    MESSAGES.clear()
    MESSAGES.update(saved)


@pytest.mark.usefixtures("registry_guard")
def test_reusing_a_type_code_is_refused() -> None:
    with pytest.raises(ValueError, match="already used by Heartbeat"):

        @message(Heartbeat.TYPE)
        @dataclass(frozen=True, slots=True)
        class Impostor(Message):
            seq: int

    assert MESSAGES[Heartbeat.TYPE] is Heartbeat


@pytest.mark.usefixtures("registry_guard")
def test_a_new_message_class_is_decodable_once_registered() -> None:
    @message(60999)
    @dataclass(frozen=True, slots=True)
    class Future(Message):
        n: int
        tags: list[str] = dataclasses.field(default_factory=list)

    frame = Frame(60999, 3, msgpack.packb({"n": 5}))
    assert decode_message_untrusted(frame) == Future(5, [])


def test_protocol_versions() -> None:
    assert 1 <= MIN_PROTOCOL_VERSION <= PROTOCOL_VERSION


def test_every_field_type_has_a_strategy() -> None:
    # If the lead adds a field of a type the strategies do not know, this names it.
    for cls in [*CLASSES, *RECORDS]:
        for name, hint in hints(cls).items():
            if name.startswith("_") or name == "TYPE":
                continue
            strategy_for(hint)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_every_message_round_trips(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    channel = data.draw(st.integers(0, 0xFFFFFFFF))
    decoder = FrameDecoder()
    decoder.feed(encode_message(msg, channel=channel))
    frame = decoder.next_frame_untrusted()
    assert frame is not None
    assert (frame.type, frame.channel) == (cls.TYPE, channel)
    decoded = decode_message_untrusted(frame)
    assert decoded == msg
    assert type(decoded) is cls


@given(any_message())
def test_encoding_is_deterministic(msg: Message) -> None:
    decoded = decode_message_untrusted(Frame(msg.TYPE, 0, encode_body(msg)))
    assert isinstance(decoded, Message)
    assert encode_body(decoded) == encode_body(msg)


def test_body_is_a_map_of_field_names() -> None:
    msg = OfficeReport(
        lan=[LanInterface("eth0", ["192.0.2.10", "fe80::1"])],
        nat_type="port-restricted",
        stun_ip="203.0.113.9",
        stun_port=3478,
    )
    assert plain(msg) == {
        "lan": [{"name": "eth0", "addresses": ["192.0.2.10", "fe80::1"]}],
        "nat_type": "port-restricted",
        "stun_ip": "203.0.113.9",
        "stun_port": 3478,
        "address_changed_from": None,
        "software": "",
    }


def test_bytes_travel_as_msgpack_bin_and_text_as_str() -> None:
    body = encode_body(Challenge(1, b"\x00\xff" * 8, "mainhost", b"DER"))
    unpacked = msgpack.unpackb(body, raw=True)
    assert unpacked[b"nonce"] == b"\x00\xff" * 8
    assert unpacked[b"software"] == b"mainhost"
    # bin 8 (0xc4) for bytes, a fixstr (0xa0-0xbf) for text
    assert b"\xc4\x10" + b"\x00\xff" * 8 in body
    assert b"\xa8mainhost" in body


def test_nan_float_survives() -> None:
    decoded = decode(LoginRefused, {"reason": "x", "retry_after": math.nan})
    assert isinstance(decoded, LoginRefused)
    assert math.isnan(decoded.retry_after)


def test_integer_for_a_float_field_becomes_a_float() -> None:
    decoded = decode(LoginRefused, {"reason": "busy", "retry_after": 30})
    assert decoded == LoginRefused("busy", 30.0)
    assert isinstance(decoded, LoginRefused)
    assert type(decoded.retry_after) is float


# --- forward compatibility ---------------------------------------------------------------------


@given(
    st.integers(0, 0xFFFF).filter(lambda code: code not in MESSAGES),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=100),
)
def test_unknown_type_is_kept_with_its_body(code: int, channel: int, body: bytes) -> None:
    # Not decoded at all: even a body that is not msgpack is fine, the type code says skip it.
    assert decode_message_untrusted(Frame(code, channel, body)) == UnknownMessage(
        code, channel, body
    )


def test_unknown_type_in_a_stream_does_not_disturb_the_next_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(4242, b"\xc1 not msgpack") + encode_message(Heartbeat(3)))
    first, second = decoder.next_frame_untrusted(), decoder.next_frame_untrusted()
    assert first is not None and second is not None
    assert decode_message_untrusted(first) == UnknownMessage(4242, 0, b"\xc1 not msgpack")
    assert decode_message_untrusted(second) == Heartbeat(3)


@given(
    any_message(),
    st.dictionaries(st.text(min_size=1, max_size=10), st.integers(-(2**63), 2**63) | st.text()),
)
def test_unknown_fields_are_ignored(msg: Message, extra: dict[str, Any]) -> None:
    body = plain(msg)
    extra = {f"x-{k}": v for k, v in extra.items()}  # never collides with a real field
    decoded = decode(type(msg), {**extra, **body})
    assert decoded == msg


def test_unknown_field_in_a_nested_record_is_ignored() -> None:
    body = {
        "office": "o",
        "realm": "r",
        "version": 3,
        "ext_first": 100,
        "ext_last": 199,
        "entries": [{"ext": "101", "ha1_md5": "m", "ha1_sha256": "s", "color": "blue"}],
    }
    assert decode(DirectorySnapshot, body) == DirectorySnapshot(
        "o", "r", 3, 100, 199, [DirectoryEntry("101", "m", "s")]
    )


def test_bytes_keys_are_not_field_names() -> None:
    # A str key is a field name; a bin key with the same bytes is an unknown field.
    body = msgpack.packb({b"seq": 1, "seq": 2}, use_bin_type=True)
    assert decode(Heartbeat, body, raw=True) == Heartbeat(2)
    bad_message(Heartbeat, msgpack.packb({b"seq": 1}, use_bin_type=True), raw=True)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_missing_optional_fields_take_their_defaults(cls: type[Message]) -> None:
    msg = _example(cls)
    body = {name: value for name, value in plain(msg).items() if name in required(cls)}
    decoded = decode(cls, body)
    assert isinstance(decoded, cls)
    for f in fields_of(cls):
        if f.name in required(cls):
            assert getattr(decoded, f.name) == getattr(msg, f.name)
        elif f.default is not dataclasses.MISSING:
            assert getattr(decoded, f.name) == f.default
        else:
            assert getattr(decoded, f.name) == typing.cast(Callable[[], Any], f.default_factory)()


def test_default_lists_are_not_shared() -> None:
    first = decode(OfficeReport, {})
    second = decode(OfficeReport, {})
    assert isinstance(first, OfficeReport) and isinstance(second, OfficeReport)
    assert first.lan == [] and first.lan is not second.lan


# --- strictness: whatever is wrong is the peer's fault, BAD_MESSAGE ----------------------------


def _example(cls: type[Message]) -> Message:
    """A message with every field set to a value that differs from its default."""
    values: dict[str, Any] = {}
    for name, hint in hints(cls).items():
        if name not in {f.name for f in fields_of(cls)}:
            continue
        values[name] = _value_for(hint)
    return cls(**values)


def _value_for(hint: Any) -> Any:
    if hint is bool:
        return True
    if hint is int:
        return 7
    if hint is float:
        return 2.5
    if hint is str:
        return "text"
    if hint is bytes:
        return b"\x01" * 16
    if hint in RECORDS:
        return hint(**{f.name: _value_for(hints(hint)[f.name]) for f in dataclasses.fields(hint)})
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return [_value_for(args[0])]
    if origin is dict:
        return {"k": _value_for(args[1])}
    inner = [a for a in args if a is not type(None)]
    return _value_for(inner[0])


def _wrong_values(hint: Any) -> list[Any]:
    """Plain msgpack values that a field of type `hint` must refuse."""
    if hint is bool:
        return [0, 1, "true", 1.0, None, [], {}]
    if hint is int:
        return [True, False, 1.5, "1", b"\x01", None, [], {}]
    if hint is float:
        return [True, "1.0", b"1", None, [], {}]
    if hint is str:
        return [1, b"text", True, None, [], {}]
    if hint is bytes:
        return ["bytes", 1, True, None, [], {}]
    if hint in RECORDS:
        wrong: list[Any] = [1, "x", [], None]
        fields = dataclasses.fields(hint)
        if required(hint):
            wrong.append({})
        for f in fields:
            good = {g.name: _plain_value(hints(hint)[g.name]) for g in fields}
            wrong += [{**good, f.name: bad} for bad in _wrong_values(hints(hint)[f.name])[:2]]
        return wrong
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return ["x", 1, {}, None, *[[bad] for bad in _wrong_values(args[0])[:3]]]
    if origin is dict:
        return [[], "x", None, *[{"k": bad} for bad in _wrong_values(args[1])[:3]]]
    inner = [a for a in args if a is not type(None)]
    return [v for v in _wrong_values(inner[0]) if v is not None]


def _plain_value(hint: Any) -> Any:
    value = _value_for(hint)
    if type(value) in RECORDS:
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, list) and value and type(value[0]) in RECORDS:
        return [{f.name: getattr(v, f.name) for f in dataclasses.fields(v)} for v in value]
    return value


def _wrong_cases() -> list[tuple[type[Message], str, Any]]:
    cases = []
    for cls in CLASSES:
        for f in fields_of(cls):
            for bad in _wrong_values(hints(cls)[f.name]):
                cases.append((cls, f.name, bad))
    return cases


@pytest.mark.parametrize(
    ("cls", "name", "bad"),
    _wrong_cases(),
    ids=lambda v: v.__name__ if isinstance(v, type) else repr(v)[:20],
)
def test_wrong_type_is_bad_message(cls: type[Message], name: str, bad: Any) -> None:
    body = plain(_example(cls))
    # The example itself decodes: only the one field we break makes it fail.
    assert decode(cls, body) == _example(cls)
    err = bad_message(cls, {**body, name: bad})
    assert cls.__name__ in err.reason
    assert name in err.reason


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_missing_required_field_is_bad_message(cls: type[Message]) -> None:
    body = plain(_example(cls))
    for name in required(cls):
        err = bad_message(cls, {k: v for k, v in body.items() if k != name})
        assert f"required field '{name}' is missing" in err.reason


def test_bool_is_not_an_integer() -> None:
    # msgpack has a real boolean type; Python's bool is an int subclass, so this needs a check.
    err = bad_message(Heartbeat, {"seq": True})
    assert "Heartbeat.seq" in err.reason and "bool" in err.reason
    bad_message(LoginOk, {**plain(_example(LoginOk)), "heartbeat_interval": False})


def test_wrong_type_deep_in_a_record_names_the_path() -> None:
    body = {"lan": [{"name": "eth0", "addresses": ["192.0.2.1", 5]}]}
    err = bad_message(OfficeReport, body)
    assert "OfficeReport.lan[0].addresses[1]" in err.reason


@pytest.mark.parametrize(
    "body",
    [[1], "seq", 7, None, True, b"map", 1.5],
    ids=repr,
)
def test_body_that_is_not_a_map_is_bad_message(body: Any) -> None:
    err = bad_message(Heartbeat, body)
    assert "not a map" in err.reason


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # empty body
        b"\xc1",  # the one byte msgpack never uses
        b"\x81\xa3seq",  # map with a key and no value (truncated)
        b"\x81\xa3seq\x01\x01",  # a whole map and then extra data
        b"\x81\xa3se",  # truncated string
        b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion entries
        b"\x81\xa3seq\xd9\x03\xff\xfe\xfd",  # str that is not UTF-8
        b"\x81\x01\x01",  # integer map key
        b"\x81\x91\x01\x01",  # array as map key
        b"\x81\xa3seq\xd4\xff\x01",  # timestamp ext with a bad length
        b"\x81\xa3seq\xc7\x05\x01",  # ext 8 claiming 5 bytes of data, none there
    ],
    ids=lambda b: b.hex() or "empty",
)
def test_body_that_is_not_msgpack_is_bad_message(raw: bytes) -> None:
    err = bad_message(Heartbeat, raw, raw=True)
    assert err.reason.startswith("Heartbeat: body is not valid msgpack")


def test_extension_types_are_wrong_types() -> None:
    # ext 8, type 5, no data: valid msgpack, but no field of ours is an extension type.
    err = bad_message(Heartbeat, b"\x81\xa3seq\xc7\x00\x05", raw=True)
    assert "ExtType" in err.reason


@given(st.binary(max_size=40))
def test_arbitrary_bytes_never_raise_anything_but_wire_error(raw: bytes) -> None:
    for cls in CLASSES:
        try:
            decode(cls, raw, raw=True)
        except WireError as exc:
            assert exc.code == ErrorCode.BAD_MESSAGE


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_up_to_max_depth_is_accepted() -> None:
    # The body map itself is level 1; an unknown field may carry MAX_DEPTH - 1 more levels.
    assert decode(Heartbeat, {"seq": 1, "x": _nested(MAX_DEPTH - 1)}) == Heartbeat(1)
    assert decode(Heartbeat, {"seq": 1, "x": {"a": _nested(MAX_DEPTH - 2)}}) == Heartbeat(1)


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 5, 2000])
def test_nesting_deeper_than_max_depth_is_bad_message(depth: int) -> None:
    # Even in a field nobody reads: the whole body is checked before any field is.
    # Built by hand: msgpack's own packer refuses to nest this deep.
    raw = b"\x82\xa3seq\x01\xa1x" + b"\x91" * depth + b"\x01"
    err = bad_message(Heartbeat, raw, raw=True)
    assert err.code == ErrorCode.BAD_MESSAGE


def test_deep_maps_count_too() -> None:
    value: Any = 1
    for _ in range(MAX_DEPTH):
        value = {"k": value}
    bad_message(Heartbeat, {"seq": 1, "x": value})


def test_depth_inside_a_real_field_counts() -> None:
    nested_addresses: Any = ["192.0.2.1"]
    for _ in range(MAX_DEPTH):
        nested_addresses = [nested_addresses]
    err = bad_message(OfficeReport, {"lan": [{"name": "eth0", "addresses": nested_addresses}]})
    assert f"deeper than {MAX_DEPTH}" in err.reason


def test_real_messages_are_well_within_the_depth_limit() -> None:
    # The deepest catalogue value (OfficeReport.lan[].addresses[]) is level 4: room to grow.
    msg = OfficeReport(lan=[LanInterface("eth0", ["192.0.2.1"])])
    assert decode_message_untrusted(Frame(OfficeReport.TYPE, 0, encode_body(msg))) == msg


def test_nan_heartbeat_seq_and_huge_ints() -> None:
    assert decode(Heartbeat, {"seq": 2**64 - 1}) == Heartbeat(2**64 - 1)
    assert decode(Heartbeat, {"seq": -(2**63)}) == Heartbeat(-(2**63))
    bad_message(Heartbeat, {"seq": math.nan})


# --- the written protocol matches the code -----------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-protocol.md"


def _type_name(hint: Any) -> str:
    """How docs/wire-protocol.md writes a field type."""
    if isinstance(hint, type):
        return hint.__name__
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[str, {_type_name(args[1])}]"
    inner = [a for a in args if a is not type(None)]
    return f"{_type_name(inner[0])} \\| None"


def _documented_messages() -> dict[tuple[str, int], list[tuple[str, str]]]:
    documented: dict[tuple[str, int], list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in DOC.read_text().splitlines():
        if heading := re.match(r"^\*\*(\w+) \((\d+)\)\*\*", line):
            current = documented.setdefault((heading[1], int(heading[2])), [])
        elif line.startswith("#"):
            current = None
        elif current is not None and (row := re.match(r"^\| `(\w+)` \| (.+?) \| ", line)):
            current.append((row[1], row[2]))
    return documented


def test_every_message_is_documented_with_its_fields() -> None:
    # When a message class is added to the catalogue, docs/wire-protocol.md §4 must say so.
    documented = _documented_messages()
    registered = {(cls.__name__, code): cls for code, cls in REGISTERED}
    assert set(documented) == set(registered), "docs/wire-protocol.md §4 and MESSAGES differ"
    for key, cls in registered.items():
        expected = [(f.name, _type_name(hints(cls)[f.name])) for f in fields_of(cls)]
        assert documented[key] == expected, f"{cls.__name__}: fields in the doc differ"


def test_every_record_is_documented_with_its_fields() -> None:
    text = DOC.read_text()
    for rec in RECORDS:
        match = re.search(rf"Record \*\*{rec.__name__}\*\*:(.+?)\n\n", text, re.S)
        assert match, f"record {rec.__name__} is not described in docs/wire-protocol.md"
        for f in fields_of(rec):
            assert f"`{f.name}` {_type_name(hints(rec)[f.name])}" in match[1].replace("\n", " ")
