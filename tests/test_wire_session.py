"""Tests for shared.wire.session: the trunk handshake, heartbeats, close, as conversations.

Most tests run a client and a server session against each other through `SessionPair` (no
sockets, a fake clock). Where a test needs a peer that misbehaves, it plays that peer by hand
with `feed()`, writing exactly the frames a broken or hostile peer would write.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shared.wire import session as session_module
from shared.wire.frame import ErrorCode, FrameDecoder, encode_frame
from shared.wire.messages import (
    MESSAGES,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Challenge,
    Close,
    DirectoryAck,
    DirectoryEntry,
    DirectorySnapshot,
    Heartbeat,
    Hello,
    Login,
    LoginOk,
    LoginRefused,
    Message,
    OfficeReport,
    UnknownMessage,
    encode_body,
    encode_message,
)
from shared.wire.session import (
    HANDSHAKE_TIMEOUT,
    Closed,
    Event,
    Ignored,
    LocalProtocolError,
    LoggedIn,
    LoginAttempt,
    LoginRejected,
    Received,
    Role,
    State,
    TrunkSession,
    login_proof,
    server_proof,
)
from tests.wirehelpers import (
    CA_CERT,
    CA_SHA256,
    CLIENT_NONCE,
    OFFICE,
    SECRET,
    SERVER_NONCE,
    START,
    SessionPair,
    any_message,
    frames_in,
)

WRONG_SECRET = b"not-the-secret-not-the-secret-!!"


# --- playing one side by hand ------------------------------------------------------------------


def new_client(**kwargs: Any) -> TrunkSession:
    args: dict[str, Any] = {
        "office": OFFICE,
        "secret": SECRET,
        "client_nonce": CLIENT_NONCE,
        "software": "remotehost/test",
        "ca_sha256": CA_SHA256,
        **kwargs,
    }
    return TrunkSession.client(START, **args)


def new_server(**kwargs: Any) -> TrunkSession:
    args: dict[str, Any] = {"nonce": SERVER_NONCE, "software": "mainhost/test", **kwargs}
    return TrunkSession.server(START, ca_cert=CA_CERT, **args)


def events_of(side: TrunkSession) -> list[Event]:
    return list(iter(side.next_event, None))


def feed(side: TrunkSession, *msgs: Message, now: float = START, channel: int = 0) -> list[Event]:
    side.receive_data(b"".join(encode_message(m, channel=channel) for m in msgs), now)
    return events_of(side)


def sent(side: TrunkSession) -> list[Message | UnknownMessage]:
    return frames_in(side.data_to_send())


def good_login(**kwargs: Any) -> Login:
    proof = login_proof(SECRET, OFFICE, SERVER_NONCE, CLIENT_NONCE)
    return Login(**{"office": OFFICE, "client_nonce": CLIENT_NONCE, "proof": proof, **kwargs})


def good_login_ok(**kwargs: Any) -> LoginOk:
    args: dict[str, Any] = {
        "session": "s1",
        "server_proof": server_proof(SECRET, OFFICE, SERVER_NONCE, CLIENT_NONCE),
        "public_ip": "203.0.113.5",
        "public_port": 5060,
        "heartbeat_interval": 1.0,
        "dead_after": 4.0,
        **kwargs,
    }
    return LoginOk(**args)


def server_in(state: State) -> TrunkSession:
    """A server session brought into `state` by a well-behaved client played by hand."""
    server = new_server()
    if state is State.START:
        return server
    # Each step drains what the server said, so a test sees only what it provokes.
    feed(server, Hello(PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, "test"))
    server.data_to_send()
    if state is State.CHALLENGED:
        return server
    feed(server, good_login())
    if state is State.VERIFYING:
        return server
    server.complete_login(SECRET, now=START, public_ip="192.0.2.1", public_port=1, session="s")
    events_of(server)
    server.data_to_send()
    assert server.state is state
    return server


def client_in(state: State) -> TrunkSession:
    """A client session brought into `state` by a well-behaved server played by hand."""
    client = new_client()
    client.data_to_send()
    if state is State.HELLO_SENT:
        return client
    feed(client, Challenge(PROTOCOL_VERSION, SERVER_NONCE, "test", CA_CERT))
    client.data_to_send()
    if state is State.LOGIN_SENT:
        return client
    feed(client, good_login_ok())
    client.data_to_send()
    assert client.state is state
    return client


def assert_closed_with(side: TrunkSession, events: list[Event], code: int, *, sends: bool) -> None:
    """`side` ended with `code`, said so in its last event, and sent (or not) a Close frame."""
    assert side.state is State.CLOSED
    assert events, "no Closed event"
    last = events[-1]
    assert isinstance(last, Closed)
    assert (last.code, last.by_peer) == (code, False), last
    out = sent(side)
    if sends:
        assert out and out[-1] == Close(code, last.reason), out
    else:
        assert not any(isinstance(m, Close) for m in out), out
    assert side.get_timer() is None


# --- the happy path ----------------------------------------------------------------------------


def test_full_login() -> None:
    pair = SessionPair(directory_version=41, boot_id="boot-7", heartbeat_interval=2.5, dead_after=9)
    pair.login()
    assert pair.take(pair.server) == [
        LoginAttempt(OFFICE, 41, "boot-7"),
        LoggedIn(OFFICE, "sess-1", "198.51.100.7", 40001, 41, "boot-7"),
    ]
    assert pair.take(pair.client) == [LoggedIn(OFFICE, "sess-1", "198.51.100.7", 40001)]
    # The client adopts the server's heartbeat settings; both know each other's software.
    assert (pair.client.heartbeat_interval, pair.client.dead_after) == (2.5, 9.0)
    assert pair.client.peer_software == "mainhost/test"
    assert pair.server.peer_software == "remotehost/test"
    assert pair.client.ca_cert == CA_CERT
    assert pair.client.version == pair.server.version == PROTOCOL_VERSION
    assert pair.server.office == OFFICE


def test_handshake_bytes_follow_the_documented_formulas() -> None:
    pair = SessionPair()
    pair.login()
    hello, login = frames_in(bytes(pair.wire[id(pair.client)]))
    challenge, login_ok = frames_in(bytes(pair.wire[id(pair.server)]))
    assert hello == Hello(PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, "remotehost/test")
    assert challenge == Challenge(PROTOCOL_VERSION, SERVER_NONCE, "mainhost/test", CA_CERT)
    # docs/wire-protocol.md, computed here independently of session.py.
    label = b"|" + OFFICE.encode() + b"|" + SERVER_NONCE + CLIENT_NONCE
    assert login == Login(
        OFFICE,
        CLIENT_NONCE,
        hmac.new(SECRET, b"bpx-login-v1" + label, hashlib.sha256).digest(),
        0,
        "boot-1",
    )
    assert isinstance(login_ok, LoginOk)
    assert login_ok.server_proof == hmac.new(SECRET, b"bpx-server-v1" + label, "sha256").digest()
    assert login_ok.server_proof != login.proof  # a reflected proof can never pass


def test_secret_never_travels() -> None:
    pair = SessionPair()
    pair.login()
    for side in (pair.client, pair.server):
        assert SECRET not in bytes(pair.wire[id(side)])


def test_messages_flow_both_ways_after_login() -> None:
    pair = SessionPair()
    pair.login()
    pair.take(pair.client), pair.take(pair.server)
    snapshot = DirectorySnapshot(
        "branch-lyon", "pbx", 3, 100, 199, [DirectoryEntry("101", "a", "b")]
    )
    pair.server.send(snapshot)
    pair.client.send(DirectoryAck(3))
    assert pair.take(pair.client) == [Received(snapshot, 0)]
    assert pair.take(pair.server) == [Received(DirectoryAck(3), 0)]


@given(any_message(), st.integers(0, 0xFFFFFFFF))
def test_received_events_carry_message_and_channel(msg: Message, channel: int) -> None:
    if isinstance(msg, Hello | Challenge | Login | LoginOk | LoginRefused | Heartbeat | Close):
        return  # the session's own vocabulary, tested apart
    pair = SessionPair()
    pair.login()
    pair.take(pair.server)
    pair.client.send(msg, channel=channel)
    assert pair.take(pair.server) == [Received(msg, channel)]
    assert pair.server.state is State.ESTABLISHED


def test_many_frames_in_one_chunk_all_arrive_in_order() -> None:
    pair = SessionPair()
    pair.login()
    pair.take(pair.server)
    for i in range(50):
        pair.client.send(DirectoryAck(i), channel=i % 3)
    assert pair.take(pair.server) == [Received(DirectoryAck(i), i % 3) for i in range(50)]


def test_byte_at_a_time_login() -> None:
    client, server = new_client(), new_server()
    for _ in range(4):
        for a, b in ((client, server), (server, client)):
            for byte in a.data_to_send():
                b.receive_data(bytes([byte]), START)
        for event in events_of(server):
            if isinstance(event, LoginAttempt):
                assert server.complete_login(
                    SECRET, now=START, public_ip="192.0.2.9", public_port=9, session="s"
                )
    assert client.state is server.state is State.ESTABLISHED


@given(
    office=st.text(min_size=1, max_size=30),
    secret=st.binary(min_size=16, max_size=64),
    client_nonce=st.binary(min_size=16, max_size=64),
    server_nonce=st.binary(min_size=16, max_size=64),
    other=st.binary(min_size=16, max_size=64),
)
def test_login_works_for_any_office_secret_and_nonces(
    office: str, secret: bytes, client_nonce: bytes, server_nonce: bytes, other: bytes
) -> None:
    # Office names are UTF-8 and may hold the "|" separator; nonces may be any length >= 16.
    pair = SessionPair(
        office=office,
        secret=secret,
        offices={office: secret},
        client_nonce=client_nonce,
        server_nonce=server_nonce,
    )
    pair.login()
    assert pair.server.office == office
    if other != secret:
        wrong = SessionPair(
            office=office,
            secret=other,
            offices={office: secret},
            client_nonce=client_nonce,
            server_nonce=server_nonce,
        )
        wrong.pump()
        assert wrong.client.closed and wrong.server.closed
        assert isinstance(wrong.take(wrong.client)[0], LoginRejected)


def test_replaced_session_hears_why() -> None:
    pair = SessionPair()
    pair.login()
    pair.take(pair.client)
    pair.server.close(ErrorCode.REPLACED, "")
    assert pair.take(pair.client) == [
        Closed(ErrorCode.REPLACED, "replaced by a newer login", by_peer=True)
    ]


# --- refused logins ----------------------------------------------------------------------------


def test_wrong_secret() -> None:
    pair = SessionPair(secret=WRONG_SECRET)
    pair.pump()
    assert pair.take(pair.client) == [
        LoginRejected("wrong office name or secret", 1.0),
        Closed(ErrorCode.AUTH_FAILED, "wrong office name or secret", by_peer=True),
    ]
    server_events = pair.take(pair.server)
    assert server_events == [
        LoginAttempt(OFFICE, 0, "boot-1"),
        LoginRejected("wrong office name or secret"),
        Closed(ErrorCode.AUTH_FAILED, "login refused", by_peer=False),
    ]
    assert pair.client.closed and pair.server.closed
    assert frames_in(bytes(pair.wire[id(pair.server)]))[-1] == LoginRefused(
        "wrong office name or secret", 1.0
    )


def test_unknown_office_looks_exactly_like_a_wrong_secret() -> None:
    # Nobody may learn office names by trying them: the bytes on the wire are the same.
    wrong_secret = SessionPair(secret=WRONG_SECRET)
    wrong_secret.pump()
    unknown_office = SessionPair(offices={})
    unknown_office.pump()
    assert (
        wrong_secret.wire[id(wrong_secret.server)] == unknown_office.wire[id(unknown_office.server)]
    )
    assert wrong_secret.take(wrong_secret.client) == unknown_office.take(unknown_office.client)
    assert wrong_secret.take(wrong_secret.server) == unknown_office.take(unknown_office.server)


def test_unknown_office_is_refused_even_with_the_zero_key_proof() -> None:
    # complete_login(None) hashes with a dummy key (same work as a real check); a client that
    # guesses that dummy key must still be refused.
    server = server_in(State.CHALLENGED)
    zero_proof = login_proof(b"\0" * 32, "ghost", SERVER_NONCE, CLIENT_NONCE)
    feed(server, Login("ghost", CLIENT_NONCE, zero_proof))
    assert not server.complete_login(None, now=START, public_ip="x", public_port=1, session="s")
    assert sent(server) == [LoginRefused("wrong office name or secret", 1.0)]


@pytest.mark.parametrize("what", ["office", "client_nonce", "proof"])
def test_any_changed_login_field_breaks_the_proof(what: str) -> None:
    server = server_in(State.CHALLENGED)
    login = good_login()
    changed = {
        "office": Login("branch-nice", login.client_nonce, login.proof),
        "client_nonce": Login(OFFICE, b"d" * 32, login.proof),
        "proof": Login(OFFICE, login.client_nonce, bytes(32)),
    }[what]
    feed(server, changed)
    secret = SECRET
    assert not server.complete_login(secret, now=START, public_ip="x", public_port=1, session="s")


def test_replayed_login_fails_against_a_fresh_nonce() -> None:
    first = SessionPair(server_nonce=b"1" * 32)
    first.login()
    captured = bytes(
        first.wire[id(first.client)]
    )  # the Hello and the Login, as an eavesdropper saw them

    def replay(nonce: bytes) -> bool:
        server = new_server(nonce=nonce)
        server.receive_data(captured, START)
        (attempt,) = events_of(server)
        assert attempt == LoginAttempt(OFFICE, 0, "boot-1")
        return server.complete_login(SECRET, now=START, public_ip="x", public_port=1, session="s")

    assert replay(b"1" * 32)  # control: the same server nonce would accept it...
    assert not replay(b"2" * 32)  # ...which is why every connection gets a fresh one


def test_client_rejects_a_server_that_does_not_know_the_secret() -> None:
    client = client_in(State.LOGIN_SENT)
    impostor_proof = server_proof(WRONG_SECRET, OFFICE, SERVER_NONCE, CLIENT_NONCE)
    events = feed(client, good_login_ok(server_proof=impostor_proof))
    assert events[0] == LoginRejected("the main host could not prove it knows the secret")
    assert_closed_with(client, events, ErrorCode.AUTH_FAILED, sends=True)
    assert not any(isinstance(e, LoggedIn) for e in events)


def test_client_rejects_its_own_proof_reflected_back() -> None:
    client = client_in(State.LOGIN_SENT)
    events = feed(client, good_login_ok(server_proof=good_login().proof))
    assert_closed_with(client, events, ErrorCode.AUTH_FAILED, sends=True)


def test_ca_fingerprint_mismatch_is_rejected_before_any_proof_is_sent() -> None:
    pair = SessionPair(ca_sha256=hashlib.sha256(b"some other CA").digest())
    pair.pump()
    client_events = pair.take(pair.client)
    assert client_events == [
        LoginRejected("the main host's CA does not match the pinned fingerprint"),
        Closed(ErrorCode.AUTH_FAILED, "CA fingerprint mismatch", by_peer=False),
    ]
    # The client said Hello and goodbye; it never computed or sent a Login for that server.
    assert frames_in(bytes(pair.wire[id(pair.client)])) == [
        Hello(PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, "remotehost/test"),
        Close(ErrorCode.AUTH_FAILED, "CA fingerprint mismatch"),
    ]
    assert pair.take(pair.server)[-1] == Closed(
        ErrorCode.AUTH_FAILED, "CA fingerprint mismatch", by_peer=True
    )


def test_server_without_ca_fails_a_pinned_client() -> None:
    pair = SessionPair(ca_cert=b"")
    pair.pump()
    assert pair.client.closed
    assert isinstance(pair.take(pair.client)[0], LoginRejected)


def test_unpinned_client_accepts_any_ca_and_keeps_it() -> None:
    pair = SessionPair(ca_sha256=None, ca_cert=b"whatever DER")
    pair.login()
    assert pair.client.ca_cert == b"whatever DER"


def test_refused_client_reports_retry_after() -> None:
    client = client_in(State.LOGIN_SENT)
    events = feed(client, LoginRefused("office disabled", retry_after=60.0))
    assert events == [
        LoginRejected("office disabled", 60.0),
        Closed(ErrorCode.AUTH_FAILED, "office disabled", by_peer=True),
    ]
    assert sent(client) == []  # the server already hung up; nothing to say


# --- version negotiation -----------------------------------------------------------------------


def test_server_picks_its_highest_version_for_a_newer_client() -> None:
    server = new_server()
    feed(server, Hello(PROTOCOL_VERSION + 5, MIN_PROTOCOL_VERSION, "remotehost/9"))
    (challenge,) = sent(server)
    assert isinstance(challenge, Challenge)
    assert challenge.version == PROTOCOL_VERSION
    assert server.state is State.CHALLENGED


def test_newer_client_logs_in_to_an_older_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # A client built with a protocol one newer than ours (it still speaks ours)...
    monkeypatch.setattr(session_module, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    client = new_client()
    monkeypatch.undo()
    (hello,) = frames_in(client.data_to_send())
    assert hello == Hello(PROTOCOL_VERSION + 1, MIN_PROTOCOL_VERSION, "remotehost/test")
    server = new_server()
    server.receive_data(encode_message(hello), START)
    # ...is answered in the version both speak, and logs in with it.
    client.receive_data(server.data_to_send(), START)  # Challenge
    server.receive_data(client.data_to_send(), START)  # Login
    assert events_of(server) == [LoginAttempt(OFFICE, 0, "")]
    server.complete_login(SECRET, now=START, public_ip="x", public_port=1, session="s")
    client.receive_data(server.data_to_send(), START)  # LoginOk
    assert client.state is server.state is State.ESTABLISHED
    assert client.version == server.version == PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("version", "min_version"),
    [
        (PROTOCOL_VERSION + 3, PROTOCOL_VERSION + 1),  # only newer versions
        (MIN_PROTOCOL_VERSION - 1, 0),  # only older versions
        (0, 0),
        (-5, -9),
        (1, 2),  # nonsense range: min above max
    ],
)
def test_incompatible_client_versions(version: int, min_version: int) -> None:
    server = new_server()
    events = feed(server, Hello(version, min_version, "remotehost/x"))
    assert_closed_with(server, events, ErrorCode.UNSUPPORTED_VERSION, sends=True)
    assert events[-1].reason.startswith(f"peer speaks versions {min_version}-{version}")  # type: ignore[union-attr]


def test_overlapping_ranges_pick_the_highest_common_version() -> None:
    server = new_server()
    feed(server, Hello(PROTOCOL_VERSION + 10, MIN_PROTOCOL_VERSION - 10, "x"))
    assert server.version == PROTOCOL_VERSION
    assert server.state is State.CHALLENGED


@pytest.mark.parametrize("chosen", [0, MIN_PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 2**40])
def test_client_refuses_a_version_it_did_not_offer(chosen: int) -> None:
    client = client_in(State.HELLO_SENT)
    client.data_to_send()
    events = feed(client, Challenge(chosen, SERVER_NONCE, "mainhost/x", CA_CERT))
    assert_closed_with(client, events, ErrorCode.UNSUPPORTED_VERSION, sends=True)


def test_client_hears_unsupported_version_from_the_server() -> None:
    client = client_in(State.HELLO_SENT)
    events = feed(client, Close(ErrorCode.UNSUPPORTED_VERSION, ""))
    assert events == [Closed(ErrorCode.UNSUPPORTED_VERSION, "unsupported version", by_peer=True)]


# --- handshake rules: anything not in the table is a protocol error ----------------------------

ALLOWED: dict[tuple[Role, State], type[Message] | tuple[type[Message], ...]] = {
    (Role.SERVER, State.START): Hello,
    (Role.SERVER, State.CHALLENGED): Login,
    (Role.CLIENT, State.HELLO_SENT): Challenge,
    (Role.CLIENT, State.LOGIN_SENT): (LoginOk, LoginRefused),
}

SAMPLES: list[Message] = [
    Hello(PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, "x"),
    Challenge(PROTOCOL_VERSION, SERVER_NONCE, "x", CA_CERT),
    good_login(),
    good_login_ok(),
    LoginRefused("no"),
    Heartbeat(1),
    OfficeReport(),
    DirectorySnapshot("o", "r", 1, 100, 199),
    DirectoryAck(1),
]


def _handshake_cases() -> list[tuple[Role, State, Message]]:
    cases = []
    for (role, state), allowed in ALLOWED.items():
        for msg in SAMPLES:
            if not isinstance(msg, allowed):
                cases.append((role, state, msg))
    cases += [(Role.SERVER, State.VERIFYING, msg) for msg in SAMPLES]
    return cases


@pytest.mark.parametrize(
    ("role", "state", "msg"),
    _handshake_cases(),
    ids=lambda v: getattr(v, "value", type(v).__name__),
)
def test_message_out_of_turn_is_a_protocol_error(role: Role, state: State, msg: Message) -> None:
    side = server_in(state) if role is Role.SERVER else client_in(state)
    side.data_to_send()
    events = feed(side, msg)
    assert_closed_with(side, events, ErrorCode.PROTOCOL, sends=True)
    assert events[-1].reason == f"{type(msg).__name__} not allowed in state {state.value}"  # type: ignore[union-attr]
    assert not any(isinstance(e, LoggedIn | Received) for e in events)


@pytest.mark.parametrize("msg", SAMPLES[:5], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER], ids=lambda r: r.value)
def test_handshake_message_after_login_is_a_protocol_error(role: Role, msg: Message) -> None:
    side = server_in(State.ESTABLISHED) if role is Role.SERVER else client_in(State.ESTABLISHED)
    events = feed(side, msg)
    assert_closed_with(side, events, ErrorCode.PROTOCOL, sends=True)


def test_application_message_before_login_is_never_delivered() -> None:
    server = new_server()
    events = feed(server, Hello(1, 1, "x"), DirectoryAck(5), good_login())
    assert_closed_with(server, events, ErrorCode.PROTOCOL, sends=True)
    assert events == [
        Closed(ErrorCode.PROTOCOL, "DirectoryAck not allowed in state challenged", False)
    ]


def test_short_nonces_are_refused() -> None:
    client = client_in(State.HELLO_SENT)
    client.data_to_send()
    events = feed(client, Challenge(PROTOCOL_VERSION, b"n" * 15, "x", CA_CERT))
    assert_closed_with(client, events, ErrorCode.PROTOCOL, sends=True)
    server = server_in(State.CHALLENGED)
    server.data_to_send()
    events = feed(server, good_login(client_nonce=b"c" * 15))
    assert_closed_with(server, events, ErrorCode.PROTOCOL, sends=True)


@pytest.mark.parametrize(
    ("interval", "dead_after"),
    [
        (0.0, 4.0),
        (-1.0, 4.0),
        (4.0, 4.0),
        (5.0, 4.0),
        (math.nan, 4.0),
        (1.0, math.nan),
        (math.nan, math.nan),
        (1.0, math.inf),
        (math.inf, math.inf),
    ],
)
def test_nonsense_heartbeat_settings_are_refused(interval: float, dead_after: float) -> None:
    client = client_in(State.LOGIN_SENT)
    client.data_to_send()
    events = feed(client, good_login_ok(heartbeat_interval=interval, dead_after=dead_after))
    assert_closed_with(client, events, ErrorCode.PROTOCOL, sends=True)
    assert not any(isinstance(e, LoggedIn) for e in events)


def test_frame_errors_close_with_their_code() -> None:
    server = server_in(State.ESTABLISHED)
    server.receive_data(b"\xff\xff\xff\xff" + bytes(8), START)
    assert_closed_with(server, events_of(server), ErrorCode.TOO_LARGE, sends=True)
    server = server_in(State.ESTABLISHED)
    server.receive_data(encode_frame(Heartbeat.TYPE, b"\xc1"), START)
    assert_closed_with(server, events_of(server), ErrorCode.BAD_MESSAGE, sends=True)


def test_small_max_body_is_enforced_by_the_session() -> None:
    server = TrunkSession(Role.SERVER, START, max_body=16)
    server.receive_data(encode_message(Hello(1, 1, "x" * 20)), START)
    assert_closed_with(server, events_of(server), ErrorCode.TOO_LARGE, sends=True)


# --- forward compatibility mid-session ---------------------------------------------------------


def test_unknown_type_mid_session_is_ignored_and_the_session_goes_on() -> None:
    pair = SessionPair()
    pair.login()
    pair.take(pair.server)
    unknown_code = max(MESSAGES) + 1000
    pair.server.receive_data(encode_frame(unknown_code, b"\xc1 anything", channel=12), pair.now)
    pair.client.send(DirectoryAck(9), channel=4)
    assert pair.take(pair.server) == [
        Ignored(UnknownMessage(unknown_code, 12, b"\xc1 anything")),
        Received(DirectoryAck(9), 4),
    ]
    assert pair.server.state is State.ESTABLISHED
    assert pair.client.state is State.ESTABLISHED
    assert sent(pair.server) == []  # nothing said back about it


def test_unknown_type_during_the_handshake_is_ignored() -> None:
    pair = SessionPair()
    pair.server.receive_data(encode_frame(4000, b"future hello extension"), pair.now)
    pair.login()
    assert Ignored(UnknownMessage(4000, 0, b"future hello extension")) in pair.take(pair.server)


def test_unknown_fields_from_a_newer_peer_do_not_matter() -> None:
    import msgpack

    server = server_in(State.START)
    body = msgpack.packb(
        {"version": 1, "min_version": 1, "software": "x", "features": ["calls", "video"]}
    )
    server.receive_data(encode_frame(Hello.TYPE, body), START)
    assert server.state is State.CHALLENGED


def test_reserved_flags_are_ignored_on_receipt() -> None:
    # docs/wire-protocol.md §2: flags are sent as 0 and ignored, so a later version may use them.
    server = server_in(State.ESTABLISHED)
    body = encode_body(DirectoryAck(5))
    server.receive_data(encode_frame(DirectoryAck.TYPE, body, channel=2, flags=0xFFFF), START)
    assert events_of(server) == [Received(DirectoryAck(5), 2)]
    assert server.state is State.ESTABLISHED


def test_we_send_flags_zero() -> None:
    pair = SessionPair()
    pair.login()
    pair.client.send(DirectoryAck(1), channel=3)
    pair.advance(3)
    for side in (pair.client, pair.server):
        data = bytes(pair.wire[id(side)])
        decoder = FrameDecoder()
        decoder.feed(data)
        frames = list(iter(decoder.next_frame_untrusted, None))
        assert len(frames) > 3
        assert all(frame.flags == 0 for frame in frames)


# --- heartbeats and dead peers -----------------------------------------------------------------


def heartbeats(data: bytes | bytearray) -> list[int]:
    return [m.seq for m in frames_in(bytes(data)) if isinstance(m, Heartbeat)]


def test_heartbeats_every_interval_both_ways() -> None:
    pair = SessionPair(heartbeat_interval=2.0, dead_after=7.0)
    pair.login()
    assert pair.client.get_timer() == pair.server.get_timer() == START + 2.0
    for beat in range(1, 11):
        pair.advance(1.999)
        assert len(heartbeats(pair.wire[id(pair.client)])) == beat - 1
        pair.advance(0.001)
        for side in (pair.client, pair.server):
            assert heartbeats(pair.wire[id(side)]) == list(range(1, beat + 1))
    assert pair.client.state is pair.server.state is State.ESTABLISHED
    assert pair.take(pair.client)[1:] == [] and pair.take(pair.server)[2:] == []


def test_heartbeats_are_not_delivered_as_events() -> None:
    pair = SessionPair()
    pair.login()
    pair.take(pair.server), pair.take(pair.client)
    pair.advance(30)
    assert pair.take(pair.server) == [] and pair.take(pair.client) == []


def test_silence_for_dead_after_closes_both_sides_with_timeout() -> None:
    pair = SessionPair(heartbeat_interval=1.0, dead_after=4.0)
    pair.login()
    pair.take(pair.server), pair.take(pair.client)
    pair.advance(2.5)  # still talking: heartbeats keep both alive
    pair.link_up = False
    cut = pair.now
    # The last bytes each side heard were the other's heartbeat at START + 2.0.
    pair.advance(START + 2.0 + 4.0 - pair.now - 0.001)
    assert pair.client.state is pair.server.state is State.ESTABLISHED
    pair.advance(0.001)
    for side in (pair.client, pair.server):
        closed = pair.closed_event(side)
        assert (closed.code, closed.by_peer) == (ErrorCode.TIMEOUT, False)
        assert closed.reason == "nothing heard for 4.0 s"
        # Silence is not answered with a Close: nobody would hear it.
        assert not any(isinstance(m, Close) for m in frames_in(bytes(pair.wire[id(side)])))
        assert side.get_timer() is None
    # Heartbeats went on into the void while the link was down.
    assert heartbeats(pair.wire[id(pair.client)])[-1] > 2 and cut < pair.now


def test_any_received_bytes_count_as_life() -> None:
    server = server_in(State.ESTABLISHED)
    for t in range(1, 40):
        # A peer that only sends application messages, never heartbeats, is alive.
        server.receive_data(encode_message(DirectoryAck(t)), START + t * 3.0)
        server.handle_timer(START + t * 3.0 + 2.9)
    assert server.state is State.ESTABLISHED


def test_get_timer_is_the_earliest_of_heartbeat_and_dead_peer() -> None:
    server = server_in(State.ESTABLISHED)  # interval 1, dead after 4
    assert server.get_timer() == START + 1.0
    server.handle_timer(START + 1.0)
    assert heartbeats(server.data_to_send()) == [1]
    assert server.get_timer() == START + 2.0
    server.handle_timer(START + 3.5)  # late tick: one heartbeat, not three
    assert heartbeats(server.data_to_send()) == [2]
    assert server.get_timer() == START + 4.0  # dead-peer deadline comes first now
    server.handle_timer(START + 4.0)
    assert_closed_with(server, events_of(server), ErrorCode.TIMEOUT, sends=False)


def test_early_handle_timer_does_nothing() -> None:
    for side in (server_in(State.ESTABLISHED), client_in(State.ESTABLISHED), new_server()):
        side.data_to_send()
        timer = side.get_timer()
        assert timer is not None
        side.handle_timer(timer - 0.01)
        assert side.data_to_send() == b""
        assert events_of(side) == []
        assert side.get_timer() == timer


def test_slow_secret_lookup_does_not_kill_the_new_session() -> None:
    # The main host throttles guessers and looks secrets up in a database: complete_login() may
    # come long after the Login arrived, while the client waits in silence.
    pair = SessionPair(auto_login=False, dead_after=4.0)
    pair.pump()
    (attempt,) = pair.take(pair.server)
    assert isinstance(attempt, LoginAttempt)
    pair.now += HANDSHAKE_TIMEOUT - 1  # later than dead_after, before the handshake timeout
    assert pair.server.complete_login(
        SECRET, now=pair.now, public_ip="192.0.2.1", public_port=1, session="slow"
    )
    pair.advance(0.5)
    assert pair.server.state is State.ESTABLISHED
    pair.advance(20)  # and it stays up as long as heartbeats flow
    assert pair.client.state is pair.server.state is State.ESTABLISHED


# --- handshake timeout -------------------------------------------------------------------------


@pytest.mark.parametrize("state", [State.START, State.CHALLENGED, State.VERIFYING])
def test_server_handshake_timeout(state: State) -> None:
    server = server_in(state)
    server.data_to_send()
    assert server.get_timer() == START + HANDSHAKE_TIMEOUT
    server.handle_timer(START + HANDSHAKE_TIMEOUT - 0.001)
    assert server.state is state
    server.handle_timer(START + HANDSHAKE_TIMEOUT)
    events = events_of(server)
    assert_closed_with(server, events, ErrorCode.TIMEOUT, sends=True)
    assert events[-1].reason == "login did not complete in time"  # type: ignore[union-attr]


@pytest.mark.parametrize("state", [State.HELLO_SENT, State.LOGIN_SENT])
def test_client_handshake_timeout(state: State) -> None:
    client = client_in(state)
    client.data_to_send()
    assert client.get_timer() == START + HANDSHAKE_TIMEOUT
    client.handle_timer(START + HANDSHAKE_TIMEOUT + 100)
    assert_closed_with(client, events_of(client), ErrorCode.TIMEOUT, sends=True)


def test_handshake_timeout_is_not_reset_by_traffic() -> None:
    # A peer trickling unknown frames must not keep a half-open login alive.
    server = new_server()
    for t in range(1, 10):
        server.receive_data(encode_frame(9000, b""), START + t)
    assert server.get_timer() == START + HANDSHAKE_TIMEOUT


def test_pair_with_a_server_that_never_answers_login() -> None:
    pair = SessionPair(auto_login=False)
    pair.pump()
    pair.advance(HANDSHAKE_TIMEOUT)
    for side in (pair.client, pair.server):
        closed = pair.closed_event(side)
        assert closed.code == ErrorCode.TIMEOUT
    # Both timed out on their own at the same instant; each sent a Close the other never read.
    assert (
        pair.closed_event(pair.client).by_peer is False
        or pair.closed_event(pair.server).by_peer is False
    )


# --- close -------------------------------------------------------------------------------------


def test_local_close_reaches_the_peer() -> None:
    pair = SessionPair()
    pair.login()
    pair.take(pair.client), pair.take(pair.server)
    pair.client.close(ErrorCode.SHUTDOWN, "remote host stopping")
    assert pair.take(pair.client) == [Closed(ErrorCode.SHUTDOWN, "remote host stopping", False)]
    assert pair.take(pair.server) == [Closed(ErrorCode.SHUTDOWN, "remote host stopping", True)]


def test_close_with_empty_reason_uses_the_code_name() -> None:
    server = server_in(State.ESTABLISHED)
    assert feed(server, Close(ErrorCode.REPLACED, "")) == [
        Closed(ErrorCode.REPLACED, "replaced by a newer login", True)
    ]


def test_close_from_the_peer_in_any_state() -> None:
    for side in (new_server(), server_in(State.VERIFYING), client_in(State.LOGIN_SENT)):
        side.data_to_send()
        assert feed(side, Close(42, "bye")) == [Closed(42, "bye", True)]
        assert sent(side) == []  # no Close answered to a Close


def test_end_of_stream_is_a_normal_close_by_the_peer() -> None:
    server = server_in(State.ESTABLISHED)
    server.receive_data(b"", START)
    assert events_of(server) == [Closed(ErrorCode.NORMAL, "connection closed by the peer", True)]
    assert server.closed


def test_closed_session_is_inert() -> None:
    server = server_in(State.ESTABLISHED)
    server.close(ErrorCode.SHUTDOWN, "bye")
    events_of(server)
    assert sent(server) == [Close(ErrorCode.SHUTDOWN, "bye")]
    server.close(ErrorCode.PROTOCOL, "again")
    server.receive_data(encode_message(Heartbeat(1)), START + 1)
    server.receive_data(b"", START + 2)
    server.handle_timer(START + 1000)
    assert events_of(server) == []
    assert server.data_to_send() == b""
    assert server.get_timer() is None


def test_frames_after_close_in_the_same_chunk_are_not_processed() -> None:
    server = server_in(State.ESTABLISHED)
    events = feed(server, Close(0, "bye"), DirectoryAck(1), Heartbeat(1))
    assert events == [Closed(0, "bye", True)]


# --- misuse by our own code --------------------------------------------------------------------


@pytest.mark.parametrize(
    "side",
    [
        lambda: new_client(),
        lambda: client_in(State.LOGIN_SENT),
        lambda: new_server(),
        lambda: server_in(State.CHALLENGED),
        lambda: server_in(State.VERIFYING),
    ],
)
def test_send_before_established_raises(side: Any) -> None:
    session: TrunkSession = side()
    before = session.data_to_send()
    with pytest.raises(LocalProtocolError, match="cannot send DirectoryAck"):
        session.send(DirectoryAck(1))
    assert session.data_to_send() == b""  # nothing was queued
    assert before is not None


def is_session_vocabulary(msg: Message) -> bool:
    return isinstance(msg, Hello | Challenge | Login | LoginOk | LoginRefused | Close)


@pytest.mark.parametrize("msg", [*SAMPLES[:5], Close(0, "bye")], ids=lambda m: type(m).__name__)
def test_send_refuses_the_sessions_own_messages(msg: Message) -> None:
    # A hand-sent Close would end the peer's session while ours still says ESTABLISHED.
    server = server_in(State.ESTABLISHED)
    with pytest.raises(LocalProtocolError, match="sent by the session itself"):
        server.send(msg)
    assert server.data_to_send() == b""
    assert server.state is State.ESTABLISHED


def test_send_heartbeat_by_hand_is_harmless() -> None:
    pair = SessionPair()
    pair.login()
    pair.take(pair.server)
    pair.client.send(Heartbeat(99))
    assert pair.take(pair.server) == []
    assert pair.server.state is State.ESTABLISHED


def test_send_after_close_raises() -> None:
    server = server_in(State.ESTABLISHED)
    server.close(ErrorCode.SHUTDOWN, "bye")
    with pytest.raises(LocalProtocolError):
        server.send(DirectoryAck(1))


def test_complete_login_without_an_attempt_raises() -> None:
    for side in (
        new_server(),
        server_in(State.CHALLENGED),
        server_in(State.ESTABLISHED),
        new_client(),
    ):
        with pytest.raises(LocalProtocolError):
            side.complete_login(SECRET, now=START, public_ip="x", public_port=1, session="s")


def test_complete_login_twice_raises() -> None:
    server = server_in(State.VERIFYING)
    assert server.complete_login(SECRET, now=START, public_ip="x", public_port=1, session="s")
    with pytest.raises(LocalProtocolError):
        server.complete_login(SECRET, now=START, public_ip="x", public_port=1, session="s")


def test_complete_login_after_the_client_went_away_raises() -> None:
    # The adapter must check `closed` after its (slow) secret lookup.
    server = server_in(State.VERIFYING)
    server.receive_data(b"", START + 1)
    assert server.closed
    with pytest.raises(LocalProtocolError):
        server.complete_login(SECRET, now=START + 2, public_ip="x", public_port=1, session="s")


# --- stateful property tests: whatever the peer sends, a session stays consistent --------------

UNREGISTERED = st.integers(0, 0xFFFF).filter(lambda code: code not in MESSAGES)
MACHINE_SETTINGS = settings(max_examples=200, stateful_step_count=25, deadline=None)


class SessionMachine(RuleBasedStateMachine):
    """Random valid and invalid input and timer ticks into one session (`self.session`).

    The only exception allowed out of the session is LocalProtocolError, and only when this test
    misused it (send before ESTABLISHED, complete_login without a pending attempt). After every
    step the session's state, events, timer and output must agree with each other.
    """

    STATES: frozenset[State]

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.session = self.make_session()
        self.events: list[Event] = []
        self.out = bytearray()
        self.closed_at_output: int | None = None  # len(self.out) when Closed was seen

    def make_session(self) -> TrunkSession:
        raise NotImplementedError

    def _feed(self, data: bytes, split: int = 0) -> None:
        cut = min(split, len(data))
        for part in (data[:cut], data[cut:]):
            if part:
                self.session.receive_data(part, self.now)

    # -- peer input common to both roles --

    @rule(msg=any_message(), channel=st.integers(0, 0xFFFFFFFF), split=st.integers(0, 30))
    def any_known_message(self, msg: Message, channel: int, split: int) -> None:
        self._feed(encode_message(msg, channel=channel), split)

    @rule(code=UNREGISTERED, body=st.binary(max_size=30), channel=st.integers(0, 9))
    def unknown_message(self, code: int, body: bytes, channel: int) -> None:
        self._feed(encode_frame(code, body, channel=channel))

    @rule(data=st.binary(min_size=1, max_size=40))
    def garbage(self, data: bytes) -> None:
        self._feed(data)

    @rule()
    def heartbeat(self) -> None:
        self._feed(encode_message(Heartbeat(7)))

    @rule()
    def end_of_stream(self) -> None:
        self.session.receive_data(b"", self.now)

    # -- time --

    @rule(dt=st.floats(0, 6, allow_nan=False))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.session.handle_timer(self.now)

    @rule()
    def tick_at_timer(self) -> None:
        timer = self.session.get_timer()
        if timer is not None:
            self.now = max(self.now, timer)
            self.session.handle_timer(self.now)

    # -- our own side, including misuse --

    @rule(msg=any_message(), channel=st.integers(0, 100))
    def send(self, msg: Message, channel: int) -> None:
        allowed = self.session.state is State.ESTABLISHED and not is_session_vocabulary(msg)
        try:
            self.session.send(msg, channel=channel)
        except LocalProtocolError:
            assert not allowed
        else:
            assert allowed

    @rule(code=st.sampled_from([ErrorCode.SHUTDOWN, ErrorCode.REPLACED, 77]))
    def close(self, code: int) -> None:
        self.session.close(code, "test")

    # -- what must always hold --

    @invariant()
    def consistent(self) -> None:
        session = self.session
        self.events += events_of(session)
        self.out += session.data_to_send()
        assert session.state in self.STATES
        closes = [e for e in self.events if isinstance(e, Closed)]
        assert len(closes) <= 1
        if closes:
            assert self.events[-1] is closes[0], "events after Closed"
            assert session.state is State.CLOSED
            if self.closed_at_output is None:
                self.closed_at_output = len(self.out)
            assert len(self.out) == self.closed_at_output, "output after the session closed"
            assert session.get_timer() is None
        else:
            assert session.state is not State.CLOSED
            timer = session.get_timer()
            assert timer is not None and math.isfinite(timer)
        logged_in = [e for e in self.events if isinstance(e, LoggedIn)]
        assert len(logged_in) <= 1
        if session.state is State.ESTABLISHED:
            assert len(logged_in) == 1
        sent_frames = frames_in(bytes(self.out))
        final = [i for i, m in enumerate(sent_frames) if isinstance(m, Close | LoginRefused)]
        assert final in ([], [len(sent_frames) - 1]), "a Close or LoginRefused is the last frame"
        self.check_role(sent_frames)

    def check_role(self, sent_frames: list[Message | UnknownMessage]) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        # Liveness: a silent peer ends every session, whatever state it was left in.
        self.session.handle_timer(self.now + 1e6)
        assert self.session.closed


class ServerMachine(SessionMachine):
    """The server against a random client."""

    STATES = frozenset(
        {State.START, State.CHALLENGED, State.VERIFYING, State.ESTABLISHED, State.CLOSED}
    )

    def __init__(self) -> None:
        super().__init__()
        self.login_ok_allowed = 0  # complete_login() calls that returned True
        self.pending: tuple[bool, bool] | None = None  # (office known, proof good) of the Login

    def make_session(self) -> TrunkSession:
        return new_server()

    @initialize(
        start=st.sampled_from(
            [State.START, State.CHALLENGED, State.VERIFYING, State.ESTABLISHED, State.ESTABLISHED]
        )
    )
    def start_in(self, start: State) -> None:
        """Begin in any state, so every state meets every kind of input early in a run."""
        if start is not State.START:
            self.hello(PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, split=0)
        if start in (State.VERIFYING, State.ESTABLISHED):
            self.login(known=True, good=True, nonce_size=32, split=0)
        if start is State.ESTABLISHED:
            self.complete_login()
        assert self.session.state is start

    @rule(
        version=st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION + 1, 0, -1]),
        min_version=st.sampled_from([MIN_PROTOCOL_VERSION, 0, PROTOCOL_VERSION + 1]),
        split=st.integers(0, 40),
    )
    def hello(self, version: int, min_version: int, split: int) -> None:
        self._feed(encode_message(Hello(version, min_version, "fuzz")), split)

    @rule(
        known=st.booleans(),
        good=st.booleans(),
        nonce_size=st.sampled_from([32, 16, 15, 0]),
        split=st.integers(0, 120),
    )
    def login(self, known: bool, good: bool, nonce_size: int, split: int) -> None:
        office = OFFICE if known else "ghost"
        nonce = b"c" * nonce_size
        proof = login_proof(SECRET if good else WRONG_SECRET, office, SERVER_NONCE, nonce)
        if self.session.state is State.CHALLENGED and nonce_size >= 16:
            self.pending = (known, good)
        self._feed(encode_message(Login(office, nonce, proof, 3, "b")), split)

    @precondition(lambda self: self.session.state is State.START)
    @rule()
    def whole_good_handshake(self) -> None:
        self._feed(encode_message(Hello(1, 1, "fuzz")) + encode_message(good_login()))
        self.pending = (True, True)
        self.complete_login()

    @rule()
    def complete_login(self) -> None:
        verifying = self.session.state is State.VERIFYING
        known, good = self.pending if self.pending is not None else (False, False)
        try:
            ok = self.session.complete_login(
                SECRET if known else None, now=self.now, public_ip="x", public_port=1, session="s"
            )
        except LocalProtocolError:
            assert not verifying
            return
        assert verifying
        assert ok == (known and good)
        self.login_ok_allowed += ok
        self.pending = None

    def check_role(self, sent_frames: list[Message | UnknownMessage]) -> None:
        assert sum(isinstance(m, LoginOk) for m in sent_frames) == self.login_ok_allowed
        assert sum(isinstance(m, Challenge) for m in sent_frames) <= 1
        logged_in = [e for e in self.events if isinstance(e, LoggedIn)]
        if logged_in:
            attempts = [i for i, e in enumerate(self.events) if isinstance(e, LoginAttempt)]
            assert attempts and attempts[0] < self.events.index(logged_in[0])


class ClientMachine(SessionMachine):
    """The client against a random server (which may not know the secret or the CA)."""

    STATES = frozenset({State.HELLO_SENT, State.LOGIN_SENT, State.ESTABLISHED, State.CLOSED})

    def __init__(self) -> None:
        super().__init__()
        self.ca_ok = False  # a Challenge with the pinned CA was accepted
        self.challenge_nonce = SERVER_NONCE  # the nonce of the accepted Challenge
        self.good_login_ok = False  # a LoginOk with a valid proof and sane settings arrived

    def make_session(self) -> TrunkSession:
        return new_client()

    @initialize(start=st.sampled_from([State.HELLO_SENT, State.LOGIN_SENT, State.ESTABLISHED]))
    def start_in(self, start: State) -> None:
        if start is not State.HELLO_SENT:
            self.challenge(PROTOCOL_VERSION, 32, pinned=True, split=0)
        if start is State.ESTABLISHED:
            self.login_ok(good_proof=True, settings=(1.0, 4.0), split=0)
        assert self.session.state is start

    @rule(
        version=st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION + 1, 0]),
        nonce_size=st.sampled_from([32, 16, 15, 0]),
        pinned=st.booleans(),
        split=st.integers(0, 60),
    )
    def challenge(self, version: int, nonce_size: int, pinned: bool, split: int) -> None:
        acceptable = (
            self.session.state is State.HELLO_SENT
            and version == PROTOCOL_VERSION
            and nonce_size >= 16
            and pinned
        )
        nonce = SERVER_NONCE[:nonce_size]
        ca = CA_CERT if pinned else b"other CA"
        self._feed(encode_message(Challenge(version, nonce, "fuzz", ca)), split)
        if acceptable:
            assert self.session.state is State.LOGIN_SENT
            self.ca_ok = True
            self.challenge_nonce = nonce

    @rule(
        good_proof=st.booleans(),
        settings=st.sampled_from(
            [(1.0, 4.0), (0.5, 30.0), (0.0, 4.0), (5.0, 4.0), (math.nan, 4.0)]
        ),
        split=st.integers(0, 80),
    )
    def login_ok(self, good_proof: bool, settings: tuple[float, float], split: int) -> None:
        interval, dead_after = settings
        # Bytes of garbage still buffered (a partial frame header) misframe whatever follows:
        # then closing, not logging in, is the right outcome.
        acceptable = (
            self.session.state is State.LOGIN_SENT
            and good_proof
            and 0 < interval < dead_after
            and self.session._decoder.buffered == 0
        )
        proof = server_proof(
            SECRET if good_proof else WRONG_SECRET, OFFICE, self.challenge_nonce, CLIENT_NONCE
        )
        msg = good_login_ok(server_proof=proof, heartbeat_interval=interval, dead_after=dead_after)
        self._feed(encode_message(msg), split)
        if acceptable:
            assert self.session.state is State.ESTABLISHED
            self.good_login_ok = True

    @rule(retry_after=st.sampled_from([0.0, 1.0, 60.0]))
    def login_refused(self, retry_after: float) -> None:
        self._feed(encode_message(LoginRefused("no", retry_after)))

    def check_role(self, sent_frames: list[Message | UnknownMessage]) -> None:
        hellos = [m for m in sent_frames if isinstance(m, Hello)]
        logins = [m for m in sent_frames if isinstance(m, Login)]
        assert len(hellos) == 1 and sent_frames[0] is hellos[0]
        assert len(logins) <= 1
        if logins:
            # A proof is only ever computed for a main host whose CA matched the pin.
            assert self.ca_ok
            # The proof answers the nonce the challenge carried (16 bytes or more).
            assert logins[0].proof == login_proof(
                SECRET, OFFICE, self.challenge_nonce, CLIENT_NONCE
            )
        if any(isinstance(e, LoggedIn) for e in self.events):
            assert self.good_login_ok


ServerMachine.TestCase.settings = MACHINE_SETTINGS
ClientMachine.TestCase.settings = MACHINE_SETTINGS
TestServerMachine = ServerMachine.TestCase
TestClientMachine = ClientMachine.TestCase


def test_check_ca_refusal_sends_no_login() -> None:
    """join's certificate check runs before the Login: a refusal leaks no proof at all."""
    from shared.wire.session import TrunkSession as Session

    seen: list[bytes] = []

    def refuse(ca_der: bytes) -> str | None:
        seen.append(ca_der)
        return "not issued by the pinned CA"

    client = Session.client(
        0.0,
        office="berlin",
        secret=b"s" * 32,
        client_nonce=b"c" * 32,
        software="test",
        check_ca=refuse,
    )
    server = Session.server(0.0, nonce=b"n" * 32, software="test", ca_cert=b"CA-DER")
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    assert seen == [b"CA-DER"]
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    assert [type(e).__name__ for e in events] == ["LoginRejected", "Closed"]
    assert isinstance(events[0], LoginRejected)
    assert "pinned CA" in events[0].reason
    server.receive_data(client.data_to_send(), 0.0)
    server_events = []
    while (event := server.next_event()) is not None:
        server_events.append(event)
    # The server saw a Close, never a Login attempt.
    assert [type(e).__name__ for e in server_events] == ["Closed"]


def test_check_ca_acceptance_logs_in() -> None:
    from shared.wire.session import TrunkSession as Session

    client = Session.client(
        0.0,
        office="berlin",
        secret=b"s" * 32,
        client_nonce=b"c" * 32,
        software="test",
        check_ca=lambda der: None,
    )
    server = Session.server(0.0, nonce=b"n" * 32, software="test", ca_cert=b"CA-DER")
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    server.receive_data(client.data_to_send(), 0.0)
    attempt = server.next_event()
    assert type(attempt).__name__ == "LoginAttempt"
    assert server.complete_login(
        b"s" * 32, now=0.0, public_ip="203.0.113.101", public_port=40000, session="x"
    )
