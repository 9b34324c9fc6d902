"""Helpers for the trunk wire tests: a client and a server session talking without sockets.

`SessionPair` is h11's `ConnectionPair` for the trunk: it shuttles the bytes each `TrunkSession`
queues into the other one, keeps each side's events, and owns the fake clock (`now`). Time only
moves when a test says so, and timers fire in order, so heartbeat and timeout behaviour can be
checked exactly. It also answers the server's `LoginAttempt` from an in-memory office table, the
way the main host's adapter answers it from its store.

The module also holds the hypothesis strategies derived from the message dataclasses, so that a
message class the catalogue grows later is covered by the round-trip and fuzz tests without
anybody writing a strategy for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from typing import Any

from hypothesis import strategies as st

from shared.wire.frame import FrameDecoder
from shared.wire.messages import MESSAGES, RECORDS, Message, UnknownMessage
from shared.wire.messages import decode_message_untrusted as decode_message
from shared.wire.session import Closed, Event, LoginAttempt, TrunkSession

OFFICE = "branch-lyon"
SECRET = b"s3cret-s3cret-s3cret-s3cret-32by"
CLIENT_NONCE = b"c" * 32
SERVER_NONCE = b"n" * 32
CA_CERT = b"0\x82\x01\x0a fake CA certificate DER"
CA_SHA256 = hashlib.sha256(CA_CERT).digest()
START = 1000.0

MSGPACK_INT_MIN = -(2**63)
MSGPACK_INT_MAX = 2**64 - 1


class SessionPair:
    """A client and a server session, connected by a perfect (or cut) pipe, with a fake clock.

    `link_up = False` makes the pipe drop everything both ways: the peer hears silence, which is
    how a dead path (a NAT that forgot us, a pulled cable) looks to a TCP connection.
    """

    def __init__(
        self,
        *,
        now: float = START,
        office: str = OFFICE,
        secret: bytes = SECRET,
        offices: dict[str, bytes] | None = None,
        client_nonce: bytes = CLIENT_NONCE,
        server_nonce: bytes = SERVER_NONCE,
        ca_cert: bytes = CA_CERT,
        ca_sha256: bytes | None = CA_SHA256,
        heartbeat_interval: float = 1.0,
        dead_after: float = 4.0,
        directory_version: int = 0,
        boot_id: str = "boot-1",
        auto_login: bool = True,
        public_ip: str = "198.51.100.7",
        public_port: int = 40001,
    ) -> None:
        self.now = now
        self.offices = {OFFICE: SECRET} if offices is None else offices
        self.auto_login = auto_login
        self.public_ip = public_ip
        self.public_port = public_port
        self.link_up = True
        self.client = TrunkSession.client(
            now,
            office=office,
            secret=secret,
            client_nonce=client_nonce,
            software="remotehost/test",
            ca_sha256=ca_sha256,
            directory_version=directory_version,
            boot_id=boot_id,
        )
        self.server = TrunkSession.server(
            now,
            nonce=server_nonce,
            software="mainhost/test",
            ca_cert=ca_cert,
            heartbeat_interval=heartbeat_interval,
            dead_after=dead_after,
        )
        self.events: dict[int, list[Event]] = {id(self.client): [], id(self.server): []}
        # Every byte each side wrote, in order, whether or not the link delivered it.
        self.wire: dict[int, bytearray] = {
            id(self.client): bytearray(),
            id(self.server): bytearray(),
        }

    def other(self, side: TrunkSession) -> TrunkSession:
        return self.server if side is self.client else self.client

    def _collect(self, side: TrunkSession) -> bool:
        """Move `side`'s new events into `self.events`; answer a LoginAttempt if asked to."""
        moved = False
        while (event := side.next_event()) is not None:
            moved = True
            self.events[id(side)].append(event)
            if side is self.server and self.auto_login and isinstance(event, LoginAttempt):
                side.complete_login(
                    self.offices.get(event.office),
                    now=self.now,
                    public_ip=self.public_ip,
                    public_port=self.public_port,
                    session="sess-1",
                )
        return moved

    def pump(self) -> None:
        """Deliver queued bytes both ways until neither side has anything left to say."""
        for _ in range(1000):
            progressed = False
            for side in (self.client, self.server):
                progressed |= self._collect(side)
                data = side.data_to_send()
                if not data:
                    continue
                progressed = True
                self.wire[id(side)] += data
                if self.link_up:
                    self.other(side).receive_data(data, self.now)
            if not progressed:
                return
        raise AssertionError("the sessions never stopped talking")

    def take(self, side: TrunkSession) -> list[Event]:
        """The events `side` produced since the last `take`, oldest first."""
        self.pump()
        events = self.events[id(side)]
        self.events[id(side)] = []
        return events

    def login(self) -> None:
        """Run the handshake to completion and check both sides got there."""
        self.pump()
        for side in (self.client, self.server):
            assert side.state.value == "established", (side.role, self.events[id(side)])

    def advance(self, seconds: float) -> None:
        """Move the clock forward, firing every due timer of both sides in time order."""
        target = self.now + seconds
        for _ in range(100_000):
            timers = [
                (timer, i, side)
                for i, side in enumerate((self.client, self.server))
                if (timer := side.get_timer()) is not None and timer <= target
            ]
            if not timers:
                break
            timer, _, side = min(timers, key=lambda t: (t[0], t[1]))
            self.now = max(self.now, timer)
            side.handle_timer(self.now)
            # A timer that does not move after firing would spin the adapter's loop forever.
            after = side.get_timer()
            assert after is None or after > timer, f"{side.role} timer stuck at {timer}"
            self.pump()
        else:
            raise AssertionError("timers kept firing")
        self.now = target
        self.pump()

    def closed_event(self, side: TrunkSession) -> Closed:
        """The one Closed event `side` produced (it must be its last event)."""
        events = self.events[id(side)]
        closes = [e for e in events if isinstance(e, Closed)]
        assert len(closes) == 1, events
        assert events[-1] is closes[0], events
        return closes[0]


def frames_in(data: bytes) -> list[Message | UnknownMessage]:
    """Decode a byte stream we produced ourselves; any error here is a bug in the sender."""
    decoder = FrameDecoder()
    decoder.feed(data)
    out: list[Message | UnknownMessage] = []
    while (frame := decoder.next_frame_untrusted()) is not None:
        out.append(decode_message(frame))
    assert decoder.buffered == 0, "trailing partial frame"
    return out


# --- Strategies derived from the dataclasses ---------------------------------------------------


def strategy_for(hint: Any) -> st.SearchStrategy[Any]:
    """A strategy for any value the wire codec can carry for a field of type `hint`."""
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(MSGPACK_INT_MIN, MSGPACK_INT_MAX)
    if hint is float:
        # NaN is a valid wire value but not equal to itself; the round trip test checks it apart.
        return st.floats(allow_nan=False)
    if hint is str:
        return st.text(max_size=20)
    if hint is bytes:
        return st.binary(max_size=40)
    if hint in RECORDS:
        return record_strategy(hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return st.none() | strategy_for(inner)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), strategy_for(args[1]), max_size=3)
    raise TypeError(f"no strategy for field type {hint!r}: teach tests/wirehelpers.py about it")


def _fields_strategies(cls: type[Any]) -> dict[str, st.SearchStrategy[Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)}


def record_strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    return st.builds(cls, **_fields_strategies(cls))


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    return st.builds(cls, **_fields_strategies(cls))


def any_message() -> st.SearchStrategy[Message]:
    """Any registered message, with any field values (registry read at call time)."""
    return st.one_of([message_strategy(cls) for _, cls in sorted(MESSAGES.items())])
