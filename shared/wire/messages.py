"""Trunk messages: a registry of frozen dataclasses keyed by type code, and their msgpack codec.

This module owns what each type code means and how a message body is encoded and checked. A
message body is a msgpack map from field name to value. Decoding is strict about what it needs and
lenient about what it does not know, so that a main host and its remote hosts can be upgraded at
different times:

- an unknown type code decodes to `UnknownMessage` (kept, not fatal: hyperframe's ExtensionFrame);
- unknown fields in a known message are ignored; a missing field takes its default;
- a field of the wrong type, a missing required field, nesting deeper than `MAX_DEPTH` or a body
  that is not msgpack raise `WireError(BAD_MESSAGE)`.

Every message crosses the trunk through this codec, so it is compiled: registering a class
generates its decoder and encoder as straight-line Python (see `_Spec`), and a message in exactly
the shape our encoder writes is decoded without the general checks (which give the same result).
The module is long because it holds both the codec and the whole catalogue, which reads best as
one list.

It does not know connection state: which message may come when is `session.py`'s business.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

from shared.wire.frame import HEADER, ErrorCode, Frame, WireError, encode_frame

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
MAX_DEPTH = 8


class Message:
    """Base of every registered message; subclasses are frozen dataclasses with a TYPE code."""

    __slots__ = ()
    TYPE: ClassVar[int]
    _spec: ClassVar[_Spec]


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A frame whose type this version does not know: kept so it can be logged, then ignored."""

    type: int
    channel: int
    body: bytes


MESSAGES: dict[int, type[Message]] = {}
RECORDS: set[type[Any]] = set()

M = TypeVar("M", bound=type[Message])
R = TypeVar("R", bound=type[Any])
_MISSING: Any = dataclasses.MISSING


class _Bad(Exception):
    """A decoded value is wrong; `path` collects where ("[0]", ".addresses") on the way out.

    The checkers build no path while a value is fine: the path of a value deep in a directory
    costs a string per item, which only an error needs.
    """

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.path: list[str] = []  # innermost first

    def wire_error(self, where: str) -> WireError:
        return WireError(
            ErrorCode.BAD_MESSAGE, f"{where}{''.join(reversed(self.path))}: {self.what}"
        )


Check = Callable[[Any], Any]


def _checker(hint: Any) -> Check:
    """Build a function that checks (and, for records, converts) one decoded value."""
    if hint is Any:
        return lambda v: v
    if hint is bool:

        def check_bool(v: Any) -> Any:
            if not isinstance(v, bool):
                raise _Bad(f"expected a boolean, got {type(v).__name__}")
            return v

        return check_bool
    if hint is int:

        def check_int(v: Any) -> Any:
            if isinstance(v, bool) or not isinstance(v, int):
                raise _Bad(f"expected an integer, got {type(v).__name__}")
            return v

        return check_int
    if hint is float:

        def check_float(v: Any) -> Any:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _Bad(f"expected a number, got {type(v).__name__}")
            return float(v)

        return check_float
    if hint in (str, bytes):

        def check_scalar(v: Any) -> Any:
            if not isinstance(v, hint):
                raise _Bad(f"expected {hint.__name__}, got {type(v).__name__}")
            return v

        return check_scalar
    if hint in RECORDS:
        build: Check = hint._spec.build
        return build
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        check_inner = _checker(inner)
        return lambda v: None if v is None else check_inner(v)
    if origin is list:
        check_item = _checker(args[0])

        def check_list(v: Any) -> Any:
            if not isinstance(v, list):
                raise _Bad(f"expected a list, got {type(v).__name__}")
            try:
                return [check_item(item) for item in v]
            except _Bad as exc:
                exc.path.append(f"[{_first_bad(check_item, v)}]")
                raise

        return check_list
    if origin is dict:
        check_value = _checker(args[1])

        def check_dict(v: Any) -> Any:
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                raise _Bad("expected a map with string keys")
            try:
                return {k: check_value(item) for k, item in v.items()}
            except _Bad as exc:
                exc.path.append(f".{_first_bad(check_value, v.values(), list(v))}")
                raise

        return check_dict
    raise TypeError(f"no wire checker for type {hint!r}")


def _first_bad(check: Check, values: Any, keys: list[Any] | None = None) -> Any:
    """The index (or key) of the first value `check` refuses: the error path, found again."""
    for i, value in enumerate(values):
        try:
            check(value)
        except _Bad:
            return i if keys is None else keys[i]
    return "?"


# The types whose decoded value is used as is when msgpack gives exactly that type (msgpack
# builds no subclasses): the decoder's fast path skips the checker call for them.
_EXACT = {bool: bool, int: int, float: float, str: str, bytes: bytes}
# Values of these field types are sent as they are; anything else goes through _plain().
_PLAIN_SCALARS = (bool, int, float, str, bytes)


@dataclass(frozen=True, slots=True)
class _Spec:
    """How one registered class is decoded and encoded, compiled once at registration.

    `build(body)` turns a decoded msgpack map into an instance (raising _Bad), `body_map(obj)`
    turns an instance into the map to pack. Both are generated as straight-line Python source,
    one statement per field, the way `dataclasses` writes `__init__`: a loop over a field table
    costs several times more per message, and the trunk decodes and encodes every message.
    """

    build: Callable[[Any], Any]
    body_map: Callable[[Any], dict[str, Any]]
    # For a class of scalar fields only: the instance if the body is exactly what our own
    # encoder writes (every field, each of exactly its type, nothing else), else None. Such a
    # body is one level deep, so it needs no depth walk either.
    exact_build: Callable[[Any], Any] | None


def _optional_inner(hint: Any) -> Any:
    """T for `T | None`, else None."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and len(typing.get_args(hint)) == 2:
            return inner[0]
    return None


def _slow_path(
    name: str, check: Check, default: Any, factory: Callable[[], Any] | None
) -> Callable[[Any], Any]:
    """One field's value when it is missing or not simply of its exact type; raise _Bad."""

    def slow(value: Any) -> Any:
        if value is _MISSING:
            if factory is not None:
                return factory()
            if default is _MISSING:
                raise _Bad(f"required field '{name}' is missing")
            return default
        try:
            return check(value)
        except _Bad as exc:
            exc.path.append(f".{name}")
            raise

    return slow


def _compile(cls: type[Any]) -> _Spec:
    hints = typing.get_type_hints(cls)
    namespace: dict[str, Any] = {"cls": cls, "_Bad": _Bad, "_MISSING": _MISSING, "_plain": _plain}
    build = [
        "def build(body):",
        "    if not isinstance(body, dict):",
        "        raise _Bad('body is not a map')",
        "    get = body.get",
    ]
    args = []
    items = []
    fields = dataclasses.fields(cls)
    exact_build = [
        "def exact_build(body):",
        f"    if type(body) is not dict or len(body) != {len(fields)}:",
        "        return None",
        "    get = body.get",
    ]
    for i, f in enumerate(fields):
        if not f.init or f.kw_only:
            # build() passes the fields by position, in declaration order.
            raise TypeError(f"{cls.__name__}.{f.name}: a wire field must be a positional one")
        hint = hints[f.name]
        factory = None if f.default_factory is dataclasses.MISSING else f.default_factory
        namespace[f"slow{i}"] = _slow_path(f.name, _checker(hint), f.default, factory)
        build.append(f"    v{i} = get({f.name!r}, _MISSING)")
        exact = _EXACT.get(hint) or _EXACT.get(_optional_inner(hint))
        if exact is not None:
            namespace[f"exact{i}"] = exact
            build.append(f"    if type(v{i}) is not exact{i}:")
            build.append(f"        v{i} = slow{i}(v{i})")
            exact_build.append(f"    v{i} = get({f.name!r})")
            exact_build.append(f"    if type(v{i}) is not exact{i}:")
            exact_build.append("        return None")
        else:
            build.append(f"    v{i} = slow{i}(v{i})")
            exact_build = []  # a field that needs its checker: no shortcut for this class
        args.append(f"v{i}")
        plain = hint in _PLAIN_SCALARS or _optional_inner(hint) in _PLAIN_SCALARS
        items.append(f"{f.name!r}: msg.{f.name}" if plain else f"{f.name!r}: _plain(msg.{f.name})")
    build.append(f"    return cls({', '.join(args)})")
    if exact_build:
        exact_build.append(f"    return cls({', '.join(args)})")
    source = "\n".join(
        [*build, "", *exact_build, "", "def body_map(msg):", f"    return {{{', '.join(items)}}}"]
    )
    exec(compile(source + "\n", f"<wire codec for {cls.__qualname__}>", "exec"), namespace)
    return _Spec(namespace["build"], namespace["body_map"], namespace.get("exact_build"))


def record(cls: R) -> R:
    """Register a frozen dataclass used as a nested value inside messages."""
    cls._spec = _compile(cls)
    RECORDS.add(cls)
    return cls


def message(code: int) -> Callable[[M], M]:
    """Register a message class under a type code (codes are forever: never reuse one)."""

    def register(cls: M) -> M:
        if code in MESSAGES:
            raise ValueError(f"type code {code} already used by {MESSAGES[code].__name__}")
        cls.TYPE = code
        cls._spec = _compile(cls)
        MESSAGES[code] = cls
        return cls

    return register


def _plain(value: Any) -> Any:
    if type(value) in RECORDS:
        return value._spec.body_map(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def new_packer() -> msgpack.Packer:
    """A Packer for `encode_body`: one per session, reused for every message it sends.

    `msgpack.packb` makes (and allocates a buffer for) a new Packer on every call; reusing one
    takes that out of the per-message cost. A Packer is not shared between threads.
    """
    return msgpack.Packer(use_bin_type=True)


def encode_body(msg: Message, packer: msgpack.Packer | None = None) -> bytes:
    body = msg._spec.body_map(msg)
    packed: bytes = msgpack.packb(body, use_bin_type=True) if packer is None else packer.pack(body)
    return packed


def encode_message(msg: Message, *, channel: int = 0) -> bytes:
    return encode_frame(msg.TYPE, encode_body(msg), channel=channel)


def append_message(
    out: bytearray, msg: Message, packer: msgpack.Packer, *, channel: int = 0
) -> None:
    """Append `msg`'s frame to `out`: `encode_message` without building the frame's bytes."""
    body = encode_body(msg, packer)
    out += HEADER.pack(len(body), msg.TYPE, 0, channel)
    out += body


_CONTAINERS = frozenset((dict, list))  # what msgpack decodes a map and an array to


def _depth_ok(value: Any, limit: int) -> bool:
    # The common body is one map of scalars: answered in C, without the walk's stack.
    if type(value) is dict and _CONTAINERS.isdisjoint(map(type, value.values())):
        return True
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item)
    return True


def decode_message_untrusted(frame: Frame) -> Message | UnknownMessage:
    """Decode a frame's body into its registered message; raise only WireError."""
    return decode_body_untrusted(frame.type, frame.channel, frame.body)


def decode_body_untrusted(
    type_code: int, channel: int, body: bytes | bytearray
) -> Message | UnknownMessage:
    """Decode one frame's body, given as its parts (the session's path); raise only WireError."""
    cls = MESSAGES.get(type_code)
    if cls is None:
        return UnknownMessage(type_code, channel, bytes(body))
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            # unpackb() derives its max_*_len limits from len(body) by itself.
        )
    except Exception as exc:  # msgpack raises many kinds: all of them are the peer's fault
        raise _bad(cls.__name__, f"body is not valid msgpack ({type(exc).__name__})") from None
    spec = cls._spec
    if spec.exact_build is not None:
        exact: Message | None = spec.exact_build(value)
        if exact is not None:
            return exact
    if not _depth_ok(value, MAX_DEPTH):
        raise _bad(cls.__name__, f"nesting deeper than {MAX_DEPTH}")
    try:
        result: Message = spec.build(value)
    except _Bad as exc:
        raise exc.wire_error(cls.__name__) from None
    return result


def _bad(where: str, what: str) -> WireError:
    return WireError(ErrorCode.BAD_MESSAGE, f"{where}: {what}")


# --- The catalogue ---------------------------------------------------------------------------
# Control channel (0). Type codes 1-99 are the trunk's own; 100-199 directory and office state;
# 200-299 are reserved for call signalling on per-call channels (a later protocol version).


@message(1)
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Remote host -> main host, first frame: which protocol versions it speaks."""

    version: int
    min_version: int
    software: str


@message(2)
@dataclass(frozen=True, slots=True)
class Challenge(Message):
    """Main host -> remote host: the chosen version, a fresh nonce, and the CA certificate."""

    version: int
    nonce: bytes
    software: str
    ca_cert: bytes = b""


@message(3)
@dataclass(frozen=True, slots=True)
class Login(Message):
    """Remote host -> main host: proof of the office secret (HMAC, the secret is never sent)."""

    office: str
    client_nonce: bytes
    proof: bytes
    directory_version: int = 0
    boot_id: str = ""


@message(4)
@dataclass(frozen=True, slots=True)
class LoginOk(Message):
    """Main host -> remote host: logged in; the public address the main host sees."""

    session: str
    server_proof: bytes
    public_ip: str
    public_port: int
    heartbeat_interval: float
    dead_after: float


@message(5)
@dataclass(frozen=True, slots=True)
class LoginRefused(Message):
    reason: str
    retry_after: float = 0.0


@message(6)
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    seq: int


@message(7)
@dataclass(frozen=True, slots=True)
class Close(Message):
    """Either side, last frame: why the connection ends (an ErrorCode and a sentence)."""

    code: int
    reason: str


@record
@dataclass(frozen=True, slots=True)
class LanInterface:
    name: str
    addresses: list[str] = field(default_factory=list)


@message(100)
@dataclass(frozen=True, slots=True)
class OfficeReport(Message):
    """Remote host -> main host: what the office knows about its own network."""

    lan: list[LanInterface] = field(default_factory=list)
    nat_type: str = "unknown"
    stun_ip: str | None = None
    stun_port: int | None = None
    address_changed_from: str | None = None
    software: str = ""


@record
@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """One extension as the remote host mirrors it: digest hashes, never the password."""

    ext: str
    ha1_md5: str
    ha1_sha256: str
    name: str = ""


@message(101)
@dataclass(frozen=True, slots=True)
class DirectorySnapshot(Message):
    """Main host -> remote host: the office's whole directory at `version`."""

    office: str
    realm: str
    version: int
    ext_first: int
    ext_last: int
    entries: list[DirectoryEntry] = field(default_factory=list)


@message(102)
@dataclass(frozen=True, slots=True)
class DirectoryDelta(Message):
    """Main host -> remote host: the changes from `base_version` to `version`."""

    base_version: int
    version: int
    put: list[DirectoryEntry] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)


@message(103)
@dataclass(frozen=True, slots=True)
class DirectoryAck(Message):
    """Remote host -> main host: the mirror on disk is now at `version`."""

    version: int


@record
@dataclass(frozen=True, slots=True)
class RegistrationInfo:
    """One registered contact of one extension, as the main host shows it."""

    ext: str
    contact: str
    expires_at: float
    source: str = ""
    user_agent: str = ""
    reachable: bool = True


@message(104)
@dataclass(frozen=True, slots=True)
class RegistrationUpdate(Message):
    """Remote host -> main host: registrations. `complete`: this is all of them (at login);
    otherwise the bindings of each extension in `extensions` are replaced by those given."""

    complete: bool
    extensions: list[str] = field(default_factory=list)
    bindings: list[RegistrationInfo] = field(default_factory=list)


# --- Calls (type codes 200-299) ----------------------------------------------------------------
# Each call travels on its own channel, so many calls share the trunk without reading each
# other's bodies: the remote host numbers the calls it starts with odd channels, the main host
# with even ones. `call_id` is the call's stable id across every hop and in the call records.


@message(200)
@dataclass(frozen=True, slots=True)
class CallSetup(Message):
    """A new call to `callee` (a dialled number); `codecs` like "PCMU/8000", best first."""

    call_id: str
    caller: str
    callee: str
    codecs: list[str] = field(default_factory=list)
    caller_name: str = ""
    origin_office: str = ""


@message(201)
@dataclass(frozen=True, slots=True)
class CallProgress(Message):
    """Ringing (180) or early media (183) from the far end."""

    call_id: str
    status: int
    reason: str = ""


@message(202)
@dataclass(frozen=True, slots=True)
class CallAnswer(Message):
    """The far end answered, with the codec chosen from the offer."""

    call_id: str
    codec: str
    ptime: int = 20


@message(203)
@dataclass(frozen=True, slots=True)
class CallEnd(Message):
    """Either side: the call is over. `status` 0 is a normal hangup; otherwise the SIP status
    of the failure (486, 480, 404, 487 for a cancel, 503 ...) and a reason a person can read."""

    call_id: str
    status: int = 0
    reason: str = ""


@message(204)
@dataclass(frozen=True, slots=True)
class CallHold(Message):
    call_id: str
    on_hold: bool


@message(205)
@dataclass(frozen=True, slots=True)
class CallInfo(Message):
    """An in-dialog request body passed through (SIP INFO and the like)."""

    call_id: str
    method: str
    content_type: str = ""
    body: bytes = b""


@message(206)
@dataclass(frozen=True, slots=True)
class MediaLeg(Message):
    """Main host -> remote host: send this call's WAN media to the relay, tagged with `leg`."""

    call_id: str
    leg: int
    relay_port: int
    relay_host: str = ""


@message(210)
@dataclass(frozen=True, slots=True)
class GrantRequest(Message):
    """Remote host -> main host: may `caller` call `callee` inside the office?"""

    call_id: str
    caller: str
    callee: str


@message(211)
@dataclass(frozen=True, slots=True)
class GrantReply(Message):
    call_id: str
    granted: bool
    reason: str = ""


# --- System information to phones (F8), control channel ------------------------------------


@message(105)
@dataclass(frozen=True, slots=True)
class Announcement(Message):
    """Main host -> remote host: a text for phones (all registered ones, or `extensions`),
    to be delivered as SIP MESSAGE until `expires_at` (Unix time), also to phones that
    register later. Sent again after every login while it has not expired."""

    id: str
    text: str
    expires_at: float
    extensions: list[str] = field(default_factory=list)
    sender: str = ""


@message(106)
@dataclass(frozen=True, slots=True)
class AnnouncementReport(Message):
    """Remote host -> main host: where an announcement got to so far (cumulative)."""

    id: str
    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


# --- Call records (F15), control channel ---------------------------------------------------


@record
@dataclass(frozen=True, slots=True)
class CallRecordInfo:
    """One event of one call as an office saw it. (`office`, `boot_id`, `seq`) is its key:
    `seq` counts up from 1 within one boot epoch of the remote host, so a record sent twice
    is stored once and a missing number is a visible gap."""

    office: str
    boot_id: str
    seq: int
    call_id: str
    event: str  # started, ringing, answered, ended
    at: float
    caller: str = ""
    callee: str = ""
    direction: str = ""  # local, outbound, inbound
    status: int = 0
    reason: str = ""


@message(107)
@dataclass(frozen=True, slots=True)
class CallRecords(Message):
    """Remote host -> main host: call records from its disk, in `seq` order; sent again until
    acknowledged (storing is idempotent by key)."""

    records: list[CallRecordInfo] = field(default_factory=list)


@message(108)
@dataclass(frozen=True, slots=True)
class CallRecordsAck(Message):
    """Main host -> remote host: every record of (`office`, `boot_id`) up to `up_to_seq` is
    stored durably; the remote host may forget them."""

    office: str
    boot_id: str
    up_to_seq: int


# --- Direct media between offices (F4), on the call's channel -------------------------------


@message(207)
@dataclass(frozen=True, slots=True)
class DirectPath(Message):
    """Main host -> remote host: try this call's audio host to host (§9b). Both offices get
    the same `key`; each is told the other's public address (as the relay latched it), the
    other's relay leg to tag packets with, and its own direction byte (2 caller, 3 callee)."""

    call_id: str
    peer_ip: str
    peer_port: int
    peer_leg: int
    key: bytes
    direction: int
