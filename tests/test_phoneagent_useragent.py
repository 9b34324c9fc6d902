"""The phone agent's pure SIP user agent, in conversations without sockets (tests/phonehelpers).

Two agents talk through `Network`; a registrar or proxy is played by the test itself with the
project's `DigestVerifier`, so what the agent sends is checked the way the remote host would.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoneagent.useragent import (
    CallAnswered,
    CallEnded,
    CallFailed,
    CallProgress,
    CallState,
    IncomingCall,
    MessageDelivered,
    MessageReceived,
    OfferReceived,
    Registered,
    RegistrationFailed,
    ReinviteDone,
    Unregistered,
    UserAgentError,
    warning_text,
)
from shared.sip.digest import DigestVerifier, ha1
from shared.sip.message import (
    Headers,
    SipMessage,
    SipRequest,
    SipResponse,
    make_response,
    parse_message_untrusted,
)
from tests.phonehelpers import Network, Node, answer_from

PROXY = ("127.0.0.1", 5060)
REALM = "berlin.example"
PASSWORD = "s3cret"


def pair() -> tuple[Network, Node, Node]:
    net = Network()
    return net, net.add("2001", 5001), net.add("2002", 5002)


def place_call(net: Network, a: Node, b: Node, offer: bytes = b"v=0 offer\r\n") -> str:
    call_id, out = a.agent.invite("sip:2002@127.0.0.1:5002", offer, net.now)
    net.feed(a, out)
    return call_id


def connect(net: Network, a: Node, b: Node) -> str:
    call_id = place_call(net, a, b)
    net.feed(b, b.agent.ring(call_id, net.now))
    net.feed(b, b.agent.answer(call_id, b"v=0 answer\r\n", net.now))
    return call_id


def methods(messages: list[SipMessage]) -> list[str]:
    return [m.method if isinstance(m, SipRequest) else str(m.status) for m in messages]


# --- calls between two agents ----------------------------------------------------------------


def test_call_is_offered_rung_answered_and_acknowledged() -> None:
    net, a, b = pair()
    call_id = place_call(net, a, b)
    assert b.events == [IncomingCall(call_id, "sip:2001@127.0.0.1", b"v=0 offer\r\n")]
    assert methods(a.received) == ["100"]
    net.feed(b, b.agent.ring(call_id, net.now))
    assert CallProgress(call_id, 180, "Ringing") in a.events
    net.feed(b, b.agent.answer(call_id, b"v=0 answer\r\n", net.now))
    assert CallAnswered(call_id, b"v=0 answer\r\n") in a.events
    assert CallAnswered(call_id, b"") in b.events  # the ACK came
    assert methods(b.received) == ["INVITE", "ACK"]
    assert a.agent.call_state(call_id) is b.agent.call_state(call_id) is CallState.ESTABLISHED
    invite = b.received[0]
    assert isinstance(invite, SipRequest)
    assert invite.headers.get("Content-Type") == "application/sdp"
    assert "INVITE" in (invite.headers.get("Allow") or "")


@pytest.mark.parametrize("who", ["caller", "callee"])
def test_bye_from_either_side_ends_the_call_on_both(who: str) -> None:
    net, a, b = pair()
    call_id = connect(net, a, b)
    ender, other = (a, b) if who == "caller" else (b, a)
    net.feed(ender, ender.agent.hangup(call_id, net.now))
    assert CallEnded(call_id, by_remote=True) in other.events
    assert CallEnded(call_id, by_remote=False) in ender.events
    assert a.agent.call_state(call_id) is b.agent.call_state(call_id) is CallState.ENDED
    net.advance(70)  # every transaction runs out, and the call is forgotten
    assert len(a.agent.layer) == len(b.agent.layer) == 0
    assert a.agent.get_timer() is None and b.agent.get_timer() is None
    assert a.agent.call_state(call_id) is b.agent.call_state(call_id) is None


def test_busy_callee_rejects_with_486() -> None:
    net, a, b = pair()
    call_id = place_call(net, a, b)
    net.feed(b, b.agent.reject(call_id, 486, net.now))
    assert CallFailed(call_id, 486, "Busy Here") in a.events
    assert methods(b.received) == ["INVITE", "ACK"]  # the transaction layer's ACK for a 4xx
    with pytest.raises(UserAgentError):
        b.agent.reject(call_id, 486, net.now)
    with pytest.raises(UserAgentError):
        b.agent.answer(call_id, b"", net.now)


def test_reject_needs_a_failure_status() -> None:
    net, a, b = pair()
    call_id = place_call(net, a, b)
    with pytest.raises(UserAgentError):
        b.agent.reject(call_id, 200, net.now)


def test_caller_giving_up_before_answer_cancels_with_487() -> None:
    net, a, b = pair()
    call_id = place_call(net, a, b)
    net.feed(b, b.agent.ring(call_id, net.now))
    net.feed(a, a.agent.hangup(call_id, net.now))
    assert CallFailed(call_id, 487, "Request Terminated") in a.events
    assert CallFailed(call_id, 487, "Request Terminated") in b.events
    assert methods(b.received) == ["INVITE", "CANCEL", "ACK"]
    assert "200" in methods(a.received)  # the CANCEL's own 200
    assert a.agent.call_state(call_id) is b.agent.call_state(call_id) is CallState.ENDED


def test_cancel_waits_for_a_provisional_response() -> None:
    net, a, b = pair()
    net.drop = lambda message, source, destination: source == b.address
    call_id = place_call(net, a, b)
    assert a.agent.hangup(call_id, net.now) == []  # RFC 3261 §9.1: nothing heard yet
    net.drop = lambda message, source, destination: False
    net.advance(1.0)  # the INVITE is retransmitted, the 100 with it, and then the CANCEL goes
    assert "CANCEL" in methods(b.received)
    assert CallFailed(call_id, 487, "Request Terminated") in a.events


def test_200_crossing_the_cancel_is_acknowledged_and_ended_with_bye() -> None:
    net, a, b = pair()
    call_id = place_call(net, a, b)
    held: list[SipMessage] = []

    def hold_cancel(message: SipMessage, source: object, destination: object) -> bool:
        if isinstance(message, SipRequest) and message.method == "CANCEL":
            held.append(message)
            return True
        return False

    net.drop = hold_cancel
    net.feed(a, a.agent.hangup(call_id, net.now))
    net.feed(b, b.agent.answer(call_id, b"v=0\r\n", net.now))
    assert methods(b.received)[-2:] == ["ACK", "BYE"]
    assert a.agent.call_state(call_id) is CallState.ENDED
    assert CallEnded(call_id, by_remote=True) in b.events
    assert not any(isinstance(e, CallAnswered) for e in a.events)


def test_incoming_call_hung_up_before_answer_is_declined() -> None:
    net, a, b = pair()
    call_id = place_call(net, a, b)
    net.feed(b, b.agent.hangup(call_id, net.now))
    assert CallFailed(call_id, 603, "Decline") in a.events


def test_lost_ack_makes_the_200_go_again_until_it_arrives() -> None:
    net, a, b = pair()
    acks = 0

    def drop_first_ack(message: SipMessage, source: object, destination: object) -> bool:
        nonlocal acks
        if isinstance(message, SipRequest) and message.method == "ACK":
            acks += 1
            return acks == 1
        return False

    net.drop = drop_first_ack
    call_id = connect(net, a, b)
    assert b.agent.call_state(call_id) is CallState.ANSWERED
    net.advance(1.0)
    assert b.agent.call_state(call_id) is CallState.ESTABLISHED
    assert CallAnswered(call_id, b"") in b.events
    assert methods(a.received).count("200") >= 2  # the 2xx was retransmitted
    assert [e for e in a.events if isinstance(e, CallAnswered)] == [
        CallAnswered(call_id, b"v=0 answer\r\n")
    ]  # ...but reported once


def test_no_ack_at_all_ends_the_call_with_bye() -> None:
    net, a, b = pair()
    net.drop = lambda m, s, d: isinstance(m, SipRequest) and m.method == "ACK"
    call_id = connect(net, a, b)
    net.advance(40)
    assert CallEnded(call_id, by_remote=False, status=408) in b.events
    assert "BYE" in methods(a.received)
    assert CallEnded(call_id, by_remote=True) in a.events


def test_reinvite_for_hold_and_resume() -> None:
    net, a, b = pair()
    call_id = connect(net, a, b)
    net.feed(a, a.agent.reinvite(call_id, b"hold offer", net.now))
    assert OfferReceived(call_id, b"hold offer") in b.events
    with pytest.raises(UserAgentError):
        a.agent.reinvite(call_id, b"another", net.now)  # one offer at a time
    net.feed(b, b.agent.answer_reinvite(call_id, b"hold answer", net.now))
    assert ReinviteDone(call_id, 200, b"hold answer") in a.events
    assert methods(b.received)[-2:] == ["INVITE", "ACK"]
    # Now the callee re-INVITEs the other way (its own CSeq space).
    net.feed(b, b.agent.reinvite(call_id, b"resume offer", net.now))
    net.feed(a, a.agent.answer_reinvite(call_id, b"resume answer", net.now))
    assert ReinviteDone(call_id, 200, b"resume answer") in b.events
    net.advance(40)
    assert a.agent.get_timer() is None and b.agent.get_timer() is None
    assert len(a.agent.layer) == len(b.agent.layer) == 0


def test_reinvite_glare_is_refused_with_491() -> None:
    net, a, b = pair()
    call_id = connect(net, a, b)
    net.drop = lambda m, s, d: isinstance(m, SipRequest) and m.method == "INVITE"
    net.feed(a, a.agent.reinvite(call_id, b"a offer", net.now))
    net.drop = lambda m, s, d: False
    net.feed(b, b.agent.reinvite(call_id, b"b offer", net.now))
    assert ReinviteDone(call_id, 491, b"") in b.events


def test_refused_reinvite_keeps_the_call() -> None:
    net, a, b = pair()
    call_id = connect(net, a, b)
    net.feed(a, a.agent.reinvite(call_id, b"x", net.now))
    net.feed(b, b.agent.refuse_reinvite(call_id, 488, net.now))
    assert ReinviteDone(call_id, 488, b"") in a.events
    assert a.agent.call_state(call_id) is CallState.ESTABLISHED


def test_reinvite_needs_an_established_call() -> None:
    net, a, b = pair()
    call_id = place_call(net, a, b)
    with pytest.raises(UserAgentError):
        a.agent.reinvite(call_id, b"x", net.now)
    with pytest.raises(UserAgentError):
        b.agent.answer_reinvite(call_id, b"x", net.now)


def test_message_is_delivered_and_shown() -> None:
    net, a, b = pair()
    key, out = a.agent.send_text("sip:2002@127.0.0.1:5002", "lunch? 🍕", net.now)
    net.feed(a, out)
    assert (
        MessageReceived("sip:2001@127.0.0.1", "text/plain;charset=utf-8", "lunch? 🍕") in b.events
    )
    assert MessageDelivered(key, 200, "OK") in a.events


def raw_request(method: str, *, to_tag: str | None = None, call_id: str = "c1") -> SipRequest:
    headers = Headers()
    headers.add("Via", "SIP/2.0/UDP 127.0.0.1:5009;branch=z9hG4bKtest" + method)
    headers.add("Max-Forwards", "70")
    headers.add("From", "<sip:probe@127.0.0.1>;tag=p1")
    headers.add("To", "<sip:2002@127.0.0.1>" + (f";tag={to_tag}" if to_tag else ""))
    headers.add("Call-ID", call_id)
    headers.add("CSeq", f"1 {method}")
    return SipRequest(method, "sip:2002@127.0.0.1:5002", headers)


@pytest.mark.parametrize(
    ("method", "to_tag", "status"),
    [
        ("OPTIONS", None, 200),
        ("BYE", "nosuch", 481),
        ("CANCEL", None, 481),
        ("INVITE", "nosuch", 481),
        ("REGISTER", None, 405),
        ("SUBSCRIBE", None, 405),
        ("FROBNICATE", None, 501),
    ],
)
def test_requests_outside_calls_get_the_right_answer(
    method: str, to_tag: str | None, status: int
) -> None:
    net = Network()
    b = net.add("2002", 5002)
    net.feed(b, b.agent.receive(raw_request(method, to_tag=to_tag), ("127.0.0.1", 5009), 0.0))
    replies = [m for m, d in net.outside if isinstance(m, SipResponse) and m.status != 100]
    assert [r.status for r in replies] == [status]
    if method == "OPTIONS":
        assert "MESSAGE" in (replies[0].headers.get("Allow") or "")
        assert replies[0].headers.get("Accept") == "application/sdp"


def test_target_uri_rules() -> None:
    net = Network()
    direct = net.add("2001", 5001)
    via_server = net.add("2003", 5003, proxy=PROXY, domain="127.0.0.1")
    assert direct.agent.target_uri("sip:2002@127.0.0.1:5070") == (
        "sip:2002@127.0.0.1:5070",
        ("127.0.0.1", 5070),
    )
    assert direct.agent.target_uri("2002@127.0.0.1")[1] == ("127.0.0.1", 5060)
    with pytest.raises(UserAgentError, match="needs a server"):
        direct.agent.target_uri("2002")
    with pytest.raises(UserAgentError, match="not a SIP address"):
        direct.agent.target_uri("sip:bad uri@")
    assert via_server.agent.target_uri("2002") == ("sip:2002@127.0.0.1", PROXY)


# --- with a server played by the test ---------------------------------------------------------


class FakeServer:
    """A registrar / proxy at PROXY that challenges with the project's DigestVerifier."""

    def __init__(self, net: Network, password: str = PASSWORD) -> None:
        self.net = net
        self.verifier = DigestVerifier(secret=b"k" * 32, realm=REALM, algorithms=("MD5",))
        self.ha1 = ha1("MD5", "2001", REALM, password)
        self.seen = 0

    def take(self) -> SipRequest:
        message, destination = self.net.outside[self.seen]
        self.seen += 1
        assert destination == PROXY
        assert isinstance(message, SipRequest)
        return message

    def challenge(self, request: SipRequest, status: int = 401, stale: bool = False) -> SipResponse:
        name = "Proxy-Authenticate" if status == 407 else "WWW-Authenticate"
        values = self.verifier.challenges(self.net.now, stale=stale)
        return make_response(request, status, to_tag="srv", headers=[(name, v) for v in values])

    def verify(self, request: SipRequest, header: str = "Authorization") -> bool:
        result = self.verifier.verify(
            request.headers.get(header),
            method=request.method,
            uri=request.uri,
            now=self.net.now,
            lookup_ha1=lambda user, algorithm: self.ha1 if user == "2001" else None,
        )
        return result.ok


def registering(password: str = PASSWORD) -> tuple[Network, Node, FakeServer]:
    net = Network()
    node = net.add("2001", 5001, proxy=PROXY, domain="127.0.0.1", password=password,
                   register_expires=120)  # fmt: skip
    return net, node, FakeServer(net)


def test_register_answers_the_digest_challenge_and_refreshes() -> None:
    net, node, server = registering()
    net.feed(node, node.agent.register(net.now))
    first = server.take()
    assert first.method == "REGISTER" and first.headers.get("Expires") == "120"
    assert not server.verify(first)
    answer_from(net, node, server.challenge(first), PROXY)
    second = server.take()
    assert server.verify(second)
    assert second.call_id == first.call_id and second.cseq.seq == first.cseq.seq + 1
    ok = make_response(second, 200, to_tag="srv",
                       headers=[("Contact", "<sip:2001@127.0.0.1:5001>;expires=60")])  # fmt: skip
    answer_from(net, node, ok, PROXY)
    assert node.events == [Registered(60)]
    assert node.agent.registered
    net.advance(29)
    assert len(net.outside) == 2
    net.advance(2)  # half the granted time: refresh
    refresh = server.take()
    assert refresh.method == "REGISTER" and refresh.call_id == first.call_id
    assert refresh.cseq.seq == second.cseq.seq + 1


def test_unregister_sends_expires_zero() -> None:
    net, node, server = registering()
    net.feed(node, node.agent.register(net.now))
    answer_from(net, node, make_response(server.take(), 200, to_tag="s"), PROXY)
    assert node.events == [Registered(120)]  # no Contact expires: what we asked for
    net.feed(node, node.agent.unregister(net.now))
    bye = server.take()
    assert bye.headers.get("Expires") == "0"
    answer_from(net, node, make_response(bye, 200, to_tag="s"), PROXY)
    assert node.events[-1] == Unregistered()
    assert not node.agent.registered
    net.advance(200)
    assert len(net.outside) == 2  # no refresh after unregistering


def test_wrong_password_fails_after_one_answer() -> None:
    net, node, server = registering(password="wrong")
    net.feed(node, node.agent.register(net.now))
    answer_from(net, node, server.challenge(server.take()), PROXY)
    retry = server.take()
    assert not server.verify(retry)
    answer_from(net, node, server.challenge(retry), PROXY)
    assert node.events == [RegistrationFailed(401, "Unauthorized")]
    assert len(net.outside) == 2


def test_stale_nonce_is_answered_again() -> None:
    net, node, server = registering()
    net.feed(node, node.agent.register(net.now))
    answer_from(net, node, server.challenge(server.take()), PROXY)
    answer_from(net, node, server.challenge(server.take(), stale=True), PROXY)
    third = server.take()
    assert server.verify(third)


def test_forbidden_registration_fails() -> None:
    net, node, server = registering()
    net.feed(node, node.agent.register(net.now))
    answer_from(net, node, make_response(server.take(), 403, to_tag="s"), PROXY)
    assert node.events == [RegistrationFailed(403, "Forbidden")]


def test_registering_needs_a_server() -> None:
    net, a, _ = pair()
    with pytest.raises(UserAgentError):
        a.agent.register(net.now)


def test_invite_answers_a_407_and_reports_the_final_status_with_its_warning() -> None:
    net, node, server = registering()
    call_id, out = node.agent.invite("2002", b"v=0\r\n", net.now)
    net.feed(node, out)
    invite = server.take()
    assert invite.uri == "sip:2002@127.0.0.1"
    answer_from(net, node, server.challenge(invite, 407), PROXY)
    ack = server.take()
    assert ack.method == "ACK" and ack.cseq.seq == invite.cseq.seq
    again = server.take()
    assert again.method == "INVITE"
    assert server.verify(again, "Proxy-Authorization")
    assert again.call_id == invite.call_id and again.cseq.seq == invite.cseq.seq + 1
    assert again.from_tag == invite.from_tag and again.branch != invite.branch
    busy = make_response(again, 486, to_tag="b",
                         headers=[("Warning", '399 pbx "2002 is on another call"')])  # fmt: skip
    answer_from(net, node, busy, PROXY)
    assert node.events == [CallFailed(call_id, 486, "Busy Here", "2002 is on another call")]


def test_warning_text_forms() -> None:
    request = SipRequest("INVITE", "sip:x@y", Headers())
    response = make_response(request, 486)
    assert warning_text(response) is None
    response.headers.add("Warning", "399 host no quotes")
    assert warning_text(response) == "399 host no quotes"


# --- random conversations -----------------------------------------------------------------------

ACTIONS = ["ring", "answer", "reject", "hangup_a", "hangup_b", "reinvite_a", "reinvite_b",
           "answer_reinvite_a", "answer_reinvite_b", "wait"]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(ACTIONS), max_size=12),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.0, 0.1, 0.3]),
)
def test_any_sequence_of_actions_on_a_lossy_network_settles(
    actions: list[str], seed: int, loss: float
) -> None:
    """Whatever the application does, in any order, with SIP messages lost: nothing raises
    but UserAgentError, and after everyone hangs up and the timers run out, no transaction or
    timer is left and neither side thinks the call is still up."""
    net, a, b = pair()
    rng = random.Random(seed)
    net.drop = lambda m, s, d: rng.random() < loss
    call_id = place_call(net, a, b)
    for action in actions:
        try:
            if action == "ring":
                net.feed(b, b.agent.ring(call_id, net.now))
            elif action == "answer":
                net.feed(b, b.agent.answer(call_id, b"v=0\r\n", net.now))
            elif action == "reject":
                net.feed(b, b.agent.reject(call_id, 486, net.now))
            elif action == "hangup_a":
                net.feed(a, a.agent.hangup(call_id, net.now))
            elif action == "hangup_b":
                net.feed(b, b.agent.hangup(call_id, net.now))
            elif action == "reinvite_a":
                net.feed(a, a.agent.reinvite(call_id, b"v=0\r\n", net.now))
            elif action == "reinvite_b":
                net.feed(b, b.agent.reinvite(call_id, b"v=0\r\n", net.now))
            elif action == "answer_reinvite_a":
                net.feed(a, a.agent.answer_reinvite(call_id, b"v=0\r\n", net.now))
            elif action == "answer_reinvite_b":
                net.feed(b, b.agent.answer_reinvite(call_id, b"v=0\r\n", net.now))
            else:
                net.advance(rng.choice([0.1, 1.0, 5.0]))
        except UserAgentError:
            pass
    net.drop = lambda m, s, d: False
    net.advance(2)
    net.feed(a, a.agent.hangup(call_id, net.now))
    net.feed(b, b.agent.hangup(call_id, net.now))
    net.advance(70)
    for node in (a, b):
        # At most the caller's INVITE when its peer's final answer was lost for good: the
        # layer cannot drop it (UserAgent._abandon_invite); the call still ends.
        assert len(node.agent.layer) <= (1 if node is a else 0)
        assert node.agent.get_timer() is None
        assert node.agent.call_state(call_id) in (CallState.ENDED, CallState.ENDING, None)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["INVITE", "BYE", "ACK", "CANCEL", "MESSAGE"]))
def test_hostile_requests_never_break_the_agent(junk: bytes, method: str) -> None:
    """Whatever body, Call-ID or tags arrive (validated by the transport first), the agent
    answers or ignores; only the message layer's SipParseError may stop a message earlier."""
    from shared.sip.errors import SipParseError
    from shared.sip.message import validate_request_untrusted

    net, a, b = pair()
    connect(net, a, b)
    text = junk.decode("latin-1").replace("\r", "").replace("\n", "")
    request = raw_request(
        method, to_tag=text[:8] or None, call_id=text[:20].replace(" ", "") or "x"
    )
    request = SipRequest(method, request.uri, request.headers, junk)
    try:
        parsed = parse_message_untrusted(request.encode())
        assert isinstance(parsed, SipRequest)
        validate_request_untrusted(parsed)
    except (SipParseError, ValueError):
        return
    net.feed(b, b.agent.receive(parsed, ("127.0.0.1", 5009), net.now))
    net.advance(40)


# --- more corners -------------------------------------------------------------------------------


def test_retransmitted_2xx_gets_the_same_ack_again() -> None:
    net, a, b = pair()
    call_id = connect(net, a, b)
    ok = next(m for m in a.received if isinstance(m, SipResponse) and m.status == 200)
    first_ack = next(m for m in b.received if isinstance(m, SipRequest) and m.method == "ACK")
    net.feed(a, a.agent.receive(ok, b.address, net.now))  # the network duplicated the 200
    acks = [m for m in b.received if isinstance(m, SipRequest) and m.method == "ACK"]
    assert len(acks) == 2
    assert acks[1].encode() == first_ack.encode()
    assert [e for e in a.events if isinstance(e, CallAnswered)] == [
        CallAnswered(call_id, b"v=0 answer\r\n")
    ]


def test_lost_ack_of_a_reinvite_makes_its_200_go_again() -> None:
    net, a, b = pair()
    call_id = connect(net, a, b)
    acks = 0

    def drop_next_ack(message: SipMessage, source: object, destination: object) -> bool:
        nonlocal acks
        if isinstance(message, SipRequest) and message.method == "ACK":
            acks += 1
            return acks == 1
        return False

    net.drop = drop_next_ack
    net.feed(a, a.agent.reinvite(call_id, b"o", net.now))
    net.feed(b, b.agent.answer_reinvite(call_id, b"a", net.now))
    oks_before = methods(a.received).count("200")
    net.advance(1.0)
    assert methods(a.received).count("200") > oks_before
    assert [e for e in a.events if isinstance(e, ReinviteDone)] == [
        ReinviteDone(call_id, 200, b"a")
    ]
    # The ACK finally came: a new offer is possible.
    net.feed(b, b.agent.reinvite(call_id, b"o2", net.now))
    assert OfferReceived(call_id, b"o2") in a.events


def test_invite_to_nobody_times_out_with_408() -> None:
    net = Network()
    a = net.add("2001", 5001)
    call_id, out = a.agent.invite("sip:2002@127.0.0.1:5999", b"v=0\r\n", net.now)
    net.feed(a, out)
    net.advance(40)
    assert CallFailed(call_id, 408, "Request Timeout") in a.events
    assert a.agent.call_state(call_id) in (CallState.ENDED, None)


def test_hangup_before_any_answer_from_nobody_ends_by_timeout() -> None:
    net = Network()
    a = net.add("2001", 5001)
    call_id, out = a.agent.invite("sip:2002@127.0.0.1:5999", b"v=0\r\n", net.now)
    net.feed(a, out)
    assert a.agent.hangup(call_id, net.now) == []
    net.advance(40)
    assert any(isinstance(e, CallFailed) and e.status == 408 for e in a.events)
    cancels = [m for m, _ in net.outside if isinstance(m, SipRequest) and m.method == "CANCEL"]
    assert cancels == []  # never a CANCEL without a provisional response


def test_bye_to_a_vanished_peer_ends_the_call_after_a_timeout() -> None:
    net, a, b = pair()
    call_id = connect(net, a, b)
    del net.nodes[b.address]
    net.feed(a, a.agent.hangup(call_id, net.now))
    assert a.agent.call_state(call_id) is CallState.ENDING
    net.advance(40)
    assert CallEnded(call_id, by_remote=False, status=408) in a.events


def test_hangup_twice_and_unknown_calls_do_nothing() -> None:
    net, a, b = pair()
    call_id = connect(net, a, b)
    net.feed(a, a.agent.hangup(call_id, net.now))
    assert a.agent.hangup(call_id, net.now) == []
    assert a.agent.hangup("no-such-call", net.now) == []
    with pytest.raises(UserAgentError):
        a.agent.ring("no-such-call", net.now)


def test_message_to_nobody_reports_408() -> None:
    net = Network()
    a = net.add("2001", 5001)
    key, out = a.agent.send_text("sip:x@127.0.0.1:5999", "anyone?", net.now)
    net.feed(a, out)
    net.advance(40)
    assert MessageDelivered(key, 408, "Request Timeout") in a.events


def test_second_invite_with_a_known_call_id_is_a_loop() -> None:
    net, a, b = pair()
    call_id = place_call(net, a, b)
    invite = b.received[0]
    assert isinstance(invite, SipRequest)
    copy = invite.copy()
    copy.headers.replace_first("Via", "SIP/2.0/UDP 127.0.0.1:5001;branch=z9hG4bKother;rport")
    net.feed(b, b.agent.receive(copy, a.address, net.now))
    assert 482 in [m.status for m in a.received if isinstance(m, SipResponse)]
    assert [e for e in b.events if isinstance(e, IncomingCall)] == [b.events[0]]
    assert b.agent.call_state(call_id) is CallState.INCOMING


def test_registration_granted_by_the_expires_header_and_retried_after_failure() -> None:
    net, node, server = registering()
    net.feed(node, node.agent.register(net.now))
    first = server.take()
    answer_from(net, node, make_response(first, 500, to_tag="s"), PROXY)
    assert node.events == [RegistrationFailed(500, "Server Internal Error")]
    net.advance(31)  # a failed registration is tried again later
    again = server.take()
    assert again.method == "REGISTER"
    answer_from(
        net, node, make_response(again, 200, to_tag="s", headers=[("Expires", "90")]), PROXY
    )
    assert node.events[-1] == Registered(90)


def test_invite_answers_a_401_as_well() -> None:
    net, node, server = registering()
    call_id, out = node.agent.invite("2002", b"v=0\r\n", net.now)
    net.feed(node, out)
    answer_from(net, node, server.challenge(server.take(), 401), PROXY)
    assert server.take().method == "ACK"
    again = server.take()
    assert server.verify(again, "Authorization")
    answer_from(net, node, server.challenge(again, 401), PROXY)  # still wrong: give up
    assert node.events == [CallFailed(call_id, 401, "Unauthorized")]


def test_invite_without_password_reports_the_challenge() -> None:
    net = Network()
    node = net.add("2001", 5001, proxy=PROXY, domain="127.0.0.1")
    server = FakeServer(net)
    call_id, out = node.agent.invite("2002", b"v=0\r\n", net.now)
    net.feed(node, out)
    answer_from(net, node, server.challenge(server.take(), 407), PROXY)
    assert node.events == [CallFailed(call_id, 407, "Proxy Authentication Required")]


def test_answer_through_a_proxy_goes_back_to_where_the_invite_came_from() -> None:
    net, a, b = pair()
    call_id = connect(net, a, b)
    net.feed(b, b.agent.hangup(call_id, net.now))
    bye = next(m for m in a.received if isinstance(m, SipRequest) and m.method == "BYE")
    assert bye.uri == "sip:2001@127.0.0.1:5001"  # the caller's Contact
    assert bye.to_tag is not None and bye.from_tag is not None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([200, 401, 403, 407, 423, 500, 503, "timeout"]), max_size=8))
def test_registration_follows_whatever_the_server_says(answers: list[object]) -> None:
    """A model of registration: after each final answer, `registered` is True exactly when
    the last one was a 2xx; the agent always has a REGISTER or a refresh pending."""
    net, node, server = registering()
    net.feed(node, node.agent.register(net.now))
    registered = False
    for answer in answers:
        for _ in range(70):  # wait for the refresh, or the retry after a failure
            if len(net.outside) > server.seen:
                break
            net.advance(1.0)
        assert len(net.outside) > server.seen, "the agent gave up"
        request = server.take()
        server.seen = len(net.outside)  # skip retransmissions
        if answer == "timeout":
            net.advance(33)
            server.seen = len(net.outside)  # its retransmissions: never answered
            registered = False
            continue
        assert isinstance(answer, int)
        if answer in (401, 407):
            response = server.challenge(request, answer)
        else:
            response = make_response(request, answer, to_tag="s")
        answer_from(net, node, response, PROXY)
        if answer == 200:
            registered = True
        elif answer in (401, 407):
            # Answered with credentials (a new REGISTER pending; the old binding still
            # stands), or given up after answering once already.
            if len(net.outside) == server.seen:
                registered = False
        else:
            registered = False
        assert node.agent.registered == registered


def test_callee_hanging_up_before_the_ack_waits_for_it_then_sends_bye() -> None:
    net, a, b = pair()
    net.drop = lambda m, s, d: isinstance(m, SipRequest) and m.method == "ACK"
    call_id = connect(net, a, b)
    net.feed(b, b.agent.hangup(call_id, net.now))
    assert "BYE" not in methods(a.received)  # RFC 3261 §15: not before the ACK
    assert b.agent.call_state(call_id) is CallState.ENDING
    net.drop = lambda m, s, d: False
    net.advance(1.0)  # the 2xx goes again, the ACK comes, then the BYE
    assert "BYE" in methods(a.received)
    assert CallEnded(call_id, by_remote=True) in a.events
    assert b.agent.call_state(call_id) is CallState.ENDED


def test_cancelled_invite_without_any_final_answer_is_given_up() -> None:
    net, a, b = pair()
    net.drop = lambda m, s, d: (
        s == b.address and not (isinstance(m, SipResponse) and m.status == 100)
    )
    call_id = place_call(net, a, b)
    net.feed(a, a.agent.hangup(call_id, net.now))
    assert "CANCEL" in methods(b.received)
    net.advance(40)
    assert [e for e in a.events if isinstance(e, CallFailed)] == [
        CallFailed(call_id, 408, "No Answer To CANCEL")
    ]
    net.advance(40)
    assert a.agent.get_timer() is None
    # The INVITE transaction itself cannot be dropped through the layer's API (see
    # UserAgent._abandon_invite): the one transaction left.
    assert len(a.agent.layer) == 1


def test_183_session_progress_is_reported_like_ringing() -> None:
    net, node, server = registering()
    call_id, out = node.agent.invite("2002", b"v=0\r\n", net.now)
    net.feed(node, out)
    invite = server.take()
    progress = make_response(invite, 183, to_tag="e", body=b"v=0 early\r\n",
                             headers=[("Content-Type", "application/sdp")])  # fmt: skip
    answer_from(net, node, progress, PROXY)
    assert node.events == [CallProgress(call_id, 183, "Session Progress")]
    assert node.agent.call_state(call_id) is CallState.EARLY


def test_granted_time_is_our_contacts_not_another_phones() -> None:
    net, node, server = registering()
    net.feed(node, node.agent.register(net.now))
    request = server.take()
    ok = make_response(request, 200, to_tag="s", headers=[
        ("Contact", "<sip:2001@192.0.2.9:5060>;expires=3600"),  # another device of 2001
        ("Contact", "<sip:2001@127.0.0.1:5001>;expires=45"),
    ])  # fmt: skip
    answer_from(net, node, ok, PROXY)
    assert node.events == [Registered(45)]
