"""Tests for shared.sip.transaction: the four RFC 3261 §17 machines, the layer, bad networks.

The machines are checked three ways: by hand for the behaviour the RFC spells out (retransmission
schedules, timeouts, ACKs), exhaustively against `EXPECTED` (every state of every figure times
every input, written here from the RFC figures independently of the module's tables), and by
hypothesis with random sequences of inputs checked against the same `EXPECTED` and invariants.
The layer is checked for matching (§17.1.3, §17.2.3), CANCEL, bounds and timers. Last, two pure
endpoints talk through `LossyNetwork`, a seeded simulator that drops, duplicates, reorders and
delays datagrams under a fake clock, and must finish INVITE/200/ACK and REGISTER/200 or time out
cleanly, for many seeds.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from shared.sip.dialog import Dialog
from shared.sip.message import (
    SipRequest,
    SipResponse,
    make_response,
    parse_message_untrusted,
    validate_request_untrusted,
    validate_response_untrusted,
)
from shared.sip.transaction import (
    MAGIC_COOKIE,
    AckReceived,
    ClientTransaction,
    Event,
    Input,
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    OverloadError,
    RequestReceived,
    ResponseReceived,
    SendMessage,
    ServerTransaction,
    State,
    TimerConfig,
    Transaction,
    TransactionError,
    TransactionKey,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimeout,
    TransportFailure,
    client_key,
    make_ack_for_failure,
    make_branch,
    make_cancel,
    server_key,
)
from shared.sip.transaction import Timer as T

# --- building messages -----------------------------------------------------------------------

BRANCH = MAGIC_COOKIE + "abc123"


def request(
    method: str = "INVITE",
    *,
    branch: str | None = BRANCH,
    host: str = "client.example.com",
    transport: str = "UDP",
    seq: int = 1,
    call_id: str = "call-1@client.example.com",
    from_tag: str | None = "alice-tag",
    to_tag: str | None = None,
    uri: str = "sip:bob@example.com",
    extra: str = "",
) -> SipRequest:
    """A request parsed from text (so that it is exactly what the layer would get)."""
    via_branch = "" if branch is None else f";branch={branch}"
    ftag = "" if from_tag is None else f";tag={from_tag}"
    ttag = "" if to_tag is None else f";tag={to_tag}"
    text = (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {host}:5060{via_branch}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: Alice <sip:alice@example.com>{ftag}\r\n"
        f"To: Bob <sip:bob@example.com>{ttag}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {seq} {method}\r\n"
        "Contact: <sip:alice@192.0.2.10:5060>\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    )
    message = parse_message_untrusted(text.encode())
    assert isinstance(message, SipRequest)
    validate_request_untrusted(message)
    return message


def response(req: SipRequest, status: int, to_tag: str | None = "bob-tag") -> SipResponse:
    return make_response(req, status, to_tag=to_tag if status != 100 else None)


def sent(events: list[Event]) -> list[Any]:
    """The messages a list of events asks the transport to send."""
    return [e.message for e in events if isinstance(e, SendMessage)]


def sent_statuses(events: list[Event]) -> list[int]:
    return [m.status for m in sent(events) if isinstance(m, SipResponse)]


def up(events: list[Event]) -> list[Event]:
    """The events for the TU (everything but SendMessage)."""
    return [e for e in events if not isinstance(e, SendMessage)]


def wire(message: SipRequest | SipResponse) -> SipRequest | SipResponse:
    """Through bytes and back, as the network would hand it over."""
    parsed = parse_message_untrusted(message.encode())
    if isinstance(parsed, SipRequest):
        validate_request_untrusted(parsed)
    else:
        validate_response_untrusted(parsed)
    return parsed


TIMERS = TimerConfig()
T1, T2, T4 = TIMERS.t1, TIMERS.t2, TIMERS.t4


def new_client(method: str = "INVITE", *, reliable: bool = False) -> ClientTransaction:
    req = request(method)
    cls: type[ClientTransaction] = (
        InviteClientTransaction if method == "INVITE" else NonInviteClientTransaction
    )
    txn = cls(client_key(req), req, "server", reliable=reliable)
    events = txn.start(0.0)
    assert sent(events) == [req]
    return txn


def new_server(method: str = "INVITE", *, reliable: bool = False) -> ServerTransaction:
    req = request(method)
    cls: type[ServerTransaction] = (
        InviteServerTransaction if method == "INVITE" else NonInviteServerTransaction
    )
    txn = cls(server_key(req), req, "client", reliable=reliable)
    events = txn.start(0.0, "client")
    assert isinstance(events[-1], RequestReceived) and events[-1].request is req
    return txn


def fire_until(txn: Transaction, end: float) -> list[tuple[float, list[Event]]]:
    """Fire timers one deadline at a time up to `end`: [(when, events)]."""
    out = []
    while (when := txn.get_timer()) is not None and when <= end:
        out.append((when, txn.handle_timer(when)))
    return out


# --- INVITE client (Figure 5) ----------------------------------------------------------------


def test_invite_client_timer_a_doubles_without_cap_until_timer_b() -> None:
    txn = new_client("INVITE")
    assert txn.state is State.CALLING
    assert txn.deadline(T.A) == T1 and txn.deadline(T.B) == 64 * T1
    fired = fire_until(txn, 64 * T1)
    resend_times = [when for when, events in fired if sent(events)]
    # §17.1.1.2: intervals T1, 2T1, 4T1, ... (no T2 cap for INVITE), until B at 64*T1.
    assert resend_times == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    when, last = fired[-1]
    assert when == 64 * T1
    timeouts = [e for e in last if isinstance(e, TransactionTimeout)]
    assert len(timeouts) == 1
    assert timeouts[0].response is not None and timeouts[0].response.status == 408
    assert timeouts[0].response.call_id == txn.request.call_id
    assert isinstance(last[-1], TransactionTerminated)
    assert txn.terminated and txn.get_timer() is None


def test_invite_client_over_tcp_never_retransmits() -> None:
    txn = new_client("INVITE", reliable=True)
    assert txn.deadline(T.A) is None
    fired = fire_until(txn, 100.0)
    assert [when for when, _ in fired] == [64 * T1]
    assert sent(fired[0][1]) == []
    assert isinstance(up(fired[0][1])[0], TransactionTimeout)


def test_invite_client_provisional_stops_retransmission_and_timeout() -> None:
    txn = new_client("INVITE")
    events = txn.receive(response(txn.request, 180), 0.2)
    assert [type(e) for e in events] == [ResponseReceived]
    assert txn.state is State.PROCEEDING
    # Figure 5: no timer in Proceeding; Timer C (a TU timer) is the TU's business.
    assert txn.get_timer() is None
    assert txn.receive(response(txn.request, 183), 0.3)[0].response.status == 183  # type: ignore[union-attr]


def test_invite_client_failure_sends_ack_once_per_response_and_absorbs() -> None:
    txn = new_client("INVITE")
    failure = response(txn.request, 486)
    events = txn.receive(failure, 1.0)
    [ack] = sent(events)
    assert isinstance(ack, SipRequest) and ack.method == "ACK"
    # §17.1.1.3: same Request-URI, Call-ID, From, CSeq number, top Via; To from the response.
    assert ack.uri == txn.request.uri
    assert ack.call_id == txn.request.call_id
    assert ack.from_tag == txn.request.from_tag
    assert ack.to_tag == "bob-tag"
    assert ack.cseq.seq == 1 and ack.cseq.method == "ACK"
    assert ack.branch == txn.request.branch
    assert len(ack.vias) == 1
    assert [type(e) for e in up(events)] == [ResponseReceived]
    assert txn.state is State.COMPLETED and txn.deadline(T.D) == 1.0 + 32.0
    # A retransmitted 486: the ACK again, nothing to the TU.
    again = txn.receive(wire(failure), 2.0)  # type: ignore[arg-type]
    assert sent(again) == [ack] and up(again) == []
    assert txn.handle_timer(33.0) == [TransactionTerminated(txn.key)]


def test_invite_client_failure_over_tcp_terminates_at_once() -> None:
    txn = new_client("INVITE", reliable=True)
    events = txn.receive(response(txn.request, 503), 1.0)
    # §17.1.1.2: Timer D is zero for reliable transports.
    assert [type(e) for e in events] == [SendMessage, ResponseReceived, TransactionTerminated]
    assert txn.state is State.TERMINATED


def test_invite_client_2xx_goes_to_accepted_and_passes_retransmissions() -> None:
    txn = new_client("INVITE")
    ok = response(txn.request, 200)
    assert [type(e) for e in txn.receive(ok, 1.0)] == [ResponseReceived]
    assert txn.state is State.ACCEPTED and txn.deadline(T.M) == 1.0 + 64 * T1
    # RFC 6026 §7.2: retransmitted 2xx reach the TU (which re-sends its ACK); no ACK here.
    events = txn.receive(ok, 2.0)
    assert [type(e) for e in events] == [ResponseReceived] and sent(events) == []
    # A 2xx from another fork also reaches the TU.
    other = response(txn.request, 200, to_tag="fork-2")
    assert txn.receive(other, 2.5)[0].response.to_tag == "fork-2"  # type: ignore[union-attr]
    assert txn.handle_timer(1.0 + 64 * T1) == [TransactionTerminated(txn.key)]


def test_invite_client_transport_error() -> None:
    txn = new_client("INVITE")
    [event, done] = txn.transport_error(0.1)
    assert isinstance(event, TransportFailure)
    assert event.response is not None and event.response.status == 503
    assert isinstance(done, TransactionTerminated)


# --- non-INVITE client (Figure 6) ------------------------------------------------------------


def test_non_invite_client_timer_e_doubles_up_to_t2_until_timer_f() -> None:
    txn = new_client("REGISTER")
    fired = fire_until(txn, 64 * T1)
    resend_times = [when for when, events in fired if sent(events)]
    # §17.1.2.2: T1, 2T1, 4T1, then T2 (4 s) each time.
    assert resend_times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    when, last = fired[-1]
    assert when == 64 * T1
    timeout = up(last)[0]
    assert isinstance(timeout, TransactionTimeout)
    assert timeout.response is not None and timeout.response.status == 408


def test_non_invite_client_proceeding_retransmits_every_t2() -> None:
    txn = new_client("REGISTER")
    txn.receive(response(txn.request, 100), 0.1)
    assert txn.state is State.PROCEEDING
    fired = fire_until(txn, 20.0)
    # The E already running fires at T1, then every T2 (§17.1.2.2).
    assert [when for when, events in fired if sent(events)] == [0.5, 4.5, 8.5, 12.5, 16.5]
    assert txn.deadline(T.F) == 64 * T1


def test_non_invite_client_final_then_timer_k_absorbs() -> None:
    txn = new_client("OPTIONS")
    ok = response(txn.request, 200)
    assert [type(e) for e in txn.receive(ok, 1.0)] == [ResponseReceived]
    assert txn.state is State.COMPLETED
    assert txn.get_timer() == 1.0 + T4
    assert txn.receive(ok, 2.0) == []  # absorbed
    assert txn.receive(response(txn.request, 500), 2.0) == []
    assert txn.handle_timer(1.0 + T4) == [TransactionTerminated(txn.key)]


def test_non_invite_client_over_tcp() -> None:
    txn = new_client("REGISTER", reliable=True)
    assert txn.get_timer() == 64 * T1  # F only, no E
    events = txn.receive(response(txn.request, 401), 1.0)
    # Timer K is zero over reliable transports.
    assert [type(e) for e in events] == [ResponseReceived, TransactionTerminated]


# --- INVITE server (Figure 7) ----------------------------------------------------------------


def test_invite_server_sends_100_at_once_and_resends_last_provisional() -> None:
    req = request("INVITE")
    txn = InviteServerTransaction(server_key(req), req, "client", reliable=False)
    events = txn.start(0.0, "client")
    assert sent_statuses(events) == [100]
    assert [type(e) for e in up(events)] == [RequestReceived]
    assert sent_statuses(txn.receive(req, 0.5)) == [100]
    assert sent_statuses(txn.send_response(response(req, 180), 0.6)) == [180]
    assert sent_statuses(txn.receive(req, 1.0)) == [180]
    assert txn.get_timer() is None


def test_invite_server_timer_g_doubles_to_t2_until_timer_h() -> None:
    txn = new_server("INVITE")
    busy = response(txn.request, 486)
    assert sent(txn.send_response(busy, 0.0)) == [busy]
    assert txn.state is State.COMPLETED
    fired = fire_until(txn, 64 * T1)
    resend_times = [when for when, events in fired if sent(events)]
    # §17.2.1: G at T1, 2T1, 4T1, then T2; H at 64*T1.
    assert resend_times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert all(sent(events) in ([busy], []) for _, events in fired)
    when, last = fired[-1]
    assert when == 64 * T1
    assert up(last) == [TransactionTimeout(txn.key, None), TransactionTerminated(txn.key)]


def test_invite_server_ack_confirms_then_timer_i() -> None:
    txn = new_server("INVITE")
    txn.send_response(response(txn.request, 404), 0.0)
    ack = make_ack_for_failure(txn.request, response(txn.request, 404))
    assert txn.receive(ack, 1.0) == []
    assert txn.state is State.CONFIRMED
    assert txn.get_timer() == 1.0 + T4
    # Further ACKs and INVITEs are absorbed, nothing resent.
    assert txn.receive(ack, 2.0) == []
    assert txn.receive(txn.request, 2.0) == []
    assert txn.handle_timer(1.0 + T4) == [TransactionTerminated(txn.key)]


def test_invite_server_over_tcp_no_timer_g_and_i_is_zero() -> None:
    txn = new_server("INVITE", reliable=True)
    txn.send_response(response(txn.request, 486), 0.0)
    assert txn.deadline(T.G) is None and txn.deadline(T.H) == 64 * T1
    ack = make_ack_for_failure(txn.request, response(txn.request, 486))
    assert txn.receive(ack, 1.0) == [TransactionTerminated(txn.key)]


def test_invite_server_accepted_absorbs_invites_and_passes_ack() -> None:
    txn = new_server("INVITE")
    ok = response(txn.request, 200)
    assert sent(txn.send_response(ok, 0.0)) == [ok]
    assert txn.state is State.ACCEPTED and txn.get_timer() == 64 * T1
    # RFC 6026 §7.1: a retransmitted INVITE is absorbed; the TU retransmits the 2xx itself.
    assert txn.receive(txn.request, 0.5) == []
    assert sent(txn.send_response(ok, 0.5)) == [ok]
    ack = request("ACK", to_tag="bob-tag")
    assert txn.receive(ack, 0.7) == [AckReceived(txn.key, ack, "client")]
    assert txn.handle_timer(64 * T1) == [TransactionTerminated(txn.key)]


def test_invite_server_refuses_misuse() -> None:
    txn = new_server("INVITE")
    with pytest.raises(TransactionError):
        txn.send_response(response(txn.request, 100), 0.0)
    txn.send_response(response(txn.request, 486), 0.0)
    with pytest.raises(TransactionError):
        txn.send_response(response(txn.request, 200), 0.1)
    with pytest.raises(TransactionError):
        txn.send_response(response(txn.request, 180), 0.1)


# --- non-INVITE server (Figure 8) ------------------------------------------------------------


def test_non_invite_server_trying_absorbs_then_proceeding_resends_provisional() -> None:
    txn = new_server("REGISTER")
    assert txn.receive(txn.request, 0.1) == []  # §17.2.2: nothing to resend yet
    assert sent_statuses(txn.send_response(response(txn.request, 100), 0.2)) == [100]
    assert txn.state is State.PROCEEDING
    assert sent_statuses(txn.receive(txn.request, 0.3)) == [100]


def test_non_invite_server_completed_resends_final_until_timer_j() -> None:
    txn = new_server("REGISTER")
    ok = response(txn.request, 200)
    assert sent(txn.send_response(ok, 1.0)) == [ok]
    assert txn.state is State.COMPLETED and txn.get_timer() == 1.0 + 64 * T1
    assert sent(txn.receive(txn.request, 5.0)) == [ok]
    with pytest.raises(TransactionError):
        txn.send_response(response(txn.request, 500), 5.0)
    assert txn.handle_timer(1.0 + 64 * T1) == [TransactionTerminated(txn.key)]


def test_non_invite_server_over_tcp_terminates_on_final() -> None:
    txn = new_server("REGISTER", reliable=True)
    events = txn.send_response(response(txn.request, 200), 1.0)
    assert [type(e) for e in events] == [SendMessage, TransactionTerminated]


def test_server_transport_error_informs_tu_without_a_response() -> None:
    txn = new_server("OPTIONS")
    txn.send_response(response(txn.request, 200), 0.0)
    assert txn.transport_error(0.1) == [
        TransportFailure(txn.key, None),
        TransactionTerminated(txn.key),
    ]


# --- every state x every input, against the figures ------------------------------------------

# Written from RFC 3261 Figures 5-8 (and RFC 6026 for Accepted), independently of the module's
# tables: (machine, state, input) -> the state after it. Missing: the input is dropped (remote)
# or refused with TransactionError (TU), and the state does not change.
F5, F6, F7, F8 = "inv-client", "client", "inv-server", "server"
EXPECTED: dict[tuple[str, str, str], str] = {
    (F5, "CALLING", "A"): "CALLING",
    (F5, "CALLING", "B"): "TERMINATED",
    (F5, "CALLING", "1xx"): "PROCEEDING",
    (F5, "CALLING", "2xx"): "ACCEPTED",
    (F5, "CALLING", "3xx-6xx"): "COMPLETED",
    (F5, "CALLING", "transport error"): "TERMINATED",
    (F5, "PROCEEDING", "1xx"): "PROCEEDING",
    (F5, "PROCEEDING", "2xx"): "ACCEPTED",
    (F5, "PROCEEDING", "3xx-6xx"): "COMPLETED",
    (F5, "COMPLETED", "3xx-6xx"): "COMPLETED",
    (F5, "COMPLETED", "D"): "TERMINATED",
    (F5, "COMPLETED", "transport error"): "TERMINATED",
    (F5, "ACCEPTED", "2xx"): "ACCEPTED",
    (F5, "ACCEPTED", "M"): "TERMINATED",
    (F6, "TRYING", "E"): "TRYING",
    (F6, "TRYING", "F"): "TERMINATED",
    (F6, "TRYING", "transport error"): "TERMINATED",
    (F6, "TRYING", "1xx"): "PROCEEDING",
    (F6, "TRYING", "2xx"): "COMPLETED",
    (F6, "TRYING", "3xx-6xx"): "COMPLETED",
    (F6, "PROCEEDING", "E"): "PROCEEDING",
    (F6, "PROCEEDING", "F"): "TERMINATED",
    (F6, "PROCEEDING", "transport error"): "TERMINATED",
    (F6, "PROCEEDING", "1xx"): "PROCEEDING",
    (F6, "PROCEEDING", "2xx"): "COMPLETED",
    (F6, "PROCEEDING", "3xx-6xx"): "COMPLETED",
    (F6, "COMPLETED", "K"): "TERMINATED",
    (F7, "PROCEEDING", "request"): "PROCEEDING",
    (F7, "PROCEEDING", "TU 1xx"): "PROCEEDING",
    (F7, "PROCEEDING", "TU 2xx"): "ACCEPTED",
    (F7, "PROCEEDING", "TU 3xx-6xx"): "COMPLETED",
    (F7, "PROCEEDING", "transport error"): "TERMINATED",
    (F7, "COMPLETED", "request"): "COMPLETED",
    (F7, "COMPLETED", "G"): "COMPLETED",
    (F7, "COMPLETED", "ack"): "CONFIRMED",
    (F7, "COMPLETED", "H"): "TERMINATED",
    (F7, "COMPLETED", "transport error"): "TERMINATED",
    (F7, "CONFIRMED", "ack"): "CONFIRMED",
    (F7, "CONFIRMED", "I"): "TERMINATED",
    (F7, "ACCEPTED", "request"): "ACCEPTED",
    (F7, "ACCEPTED", "ack"): "ACCEPTED",
    (F7, "ACCEPTED", "TU 2xx"): "ACCEPTED",
    (F7, "ACCEPTED", "transport error"): "ACCEPTED",
    (F7, "ACCEPTED", "L"): "TERMINATED",
    (F8, "TRYING", "TU 1xx"): "PROCEEDING",
    (F8, "TRYING", "TU 2xx"): "COMPLETED",
    (F8, "TRYING", "TU 3xx-6xx"): "COMPLETED",
    (F8, "PROCEEDING", "request"): "PROCEEDING",
    (F8, "PROCEEDING", "TU 1xx"): "PROCEEDING",
    (F8, "PROCEEDING", "TU 2xx"): "COMPLETED",
    (F8, "PROCEEDING", "TU 3xx-6xx"): "COMPLETED",
    (F8, "PROCEEDING", "transport error"): "TERMINATED",
    (F8, "COMPLETED", "request"): "COMPLETED",
    (F8, "COMPLETED", "transport error"): "TERMINATED",
    (F8, "COMPLETED", "J"): "TERMINATED",
}

# States left at once over reliable transports, their only timer being zero there.
ZERO_OVER_TCP = {(F5, "COMPLETED"), (F6, "COMPLETED"), (F7, "CONFIRMED"), (F8, "COMPLETED")}

MACHINES = {
    F5: ("INVITE", False, ["1xx", "2xx", "3xx-6xx", "transport error", "A", "B", "D", "M"]),
    F6: ("OPTIONS", False, ["1xx", "2xx", "3xx-6xx", "transport error", "E", "F", "K"]),
    F7: (
        "INVITE",
        True,
        ["request", "ack", "TU 1xx", "TU 2xx", "TU 3xx-6xx", "transport error", "G", "H", "I", "L"],
    ),
    F8: (
        "OPTIONS",
        True,
        ["request", "TU 1xx", "TU 2xx", "TU 3xx-6xx", "transport error", "J"],
    ),
}
STATUS = {"1xx": 180, "2xx": 200, "3xx-6xx": 486, "TU 1xx": 183, "TU 2xx": 200, "TU 3xx-6xx": 603}


def apply(txn: Transaction, stimulus: str, now: float) -> tuple[list[Event], bool]:
    """Feed one input; return (events, refused). A timer input fires at its own deadline."""
    req = txn.request
    if stimulus == "transport error":
        return txn.transport_error(now), False
    if len(stimulus) == 1:
        when = txn.deadline(T(stimulus))
        assert when is not None
        return txn.handle_timer(when), False
    if isinstance(txn, ClientTransaction):
        return txn.receive(response(req, STATUS[stimulus]), now), False
    assert isinstance(txn, ServerTransaction)
    if stimulus.startswith("TU"):
        try:
            return txn.send_response(response(req, STATUS[stimulus]), now), False
        except TransactionError:
            return [], True
    if stimulus == "ack":
        return txn.receive(make_ack_for_failure(req, response(req, 486)), now), False
    return txn.receive(req, now), False


def reach(machine: str, state: str, *, reliable: bool = False) -> Transaction | None:
    """A fresh transaction of `machine` driven into `state` by a path of the figure."""
    method, server, _ = MACHINES[machine]
    txn: Transaction = (
        new_server(method, reliable=reliable) if server else new_client(method, reliable=reliable)
    )
    paths = {
        (F5, "PROCEEDING"): ["1xx"],
        (F5, "COMPLETED"): ["3xx-6xx"],
        (F5, "ACCEPTED"): ["2xx"],
        (F5, "TERMINATED"): ["B"],
        (F6, "PROCEEDING"): ["1xx"],
        (F6, "COMPLETED"): ["2xx"],
        (F6, "TERMINATED"): ["F"],
        (F7, "COMPLETED"): ["TU 3xx-6xx"],
        (F7, "CONFIRMED"): ["TU 3xx-6xx", "ack"],
        (F7, "ACCEPTED"): ["TU 2xx"],
        (F7, "TERMINATED"): ["transport error"],
        (F8, "PROCEEDING"): ["TU 1xx"],
        (F8, "COMPLETED"): ["TU 2xx"],
        (F8, "TERMINATED"): ["TU 2xx", "J"],
    }
    for stimulus in paths.get((machine, state), []):
        if stimulus in "ABDEFGHIJKLM" and txn.deadline(T(stimulus)) is None:
            return None
        apply(txn, stimulus, 0.01)
    if txn.state.name != state:
        return None  # not reachable this way over this transport
    return txn


CASES = [
    (machine, state, stimulus)
    for machine, (_, _, inputs) in MACHINES.items()
    for state in (
        "CALLING",
        "TRYING",
        "PROCEEDING",
        "COMPLETED",
        "CONFIRMED",
        "ACCEPTED",
        "TERMINATED",
    )
    for stimulus in inputs
    if reach(machine, state) is not None
]


@pytest.mark.parametrize(("machine", "state", "stimulus"), CASES)
def test_every_state_times_every_input(machine: str, state: str, stimulus: str) -> None:
    txn = reach(machine, state)
    assert txn is not None
    if stimulus in "ABDEFGHIJKLM" and txn.deadline(T(stimulus)) is None:
        # The timer does not run in this state: make sure the figure agrees.
        assert (machine, state, stimulus) not in EXPECTED or state == "TERMINATED"
        return
    events, refused = apply(txn, stimulus, 1.0)
    expected = EXPECTED.get((machine, state, stimulus))
    if expected is None:
        assert txn.state.name == state
        assert events == []
        assert refused == stimulus.startswith("TU")
    else:
        assert not refused
        assert txn.state.name == expected
        assert (TransactionTerminated(txn.key) in events) == (expected == "TERMINATED")


def test_the_module_tables_have_exactly_the_expected_rows() -> None:
    from shared.sip import transaction as module

    tables = {
        F5: module.INVITE_CLIENT,
        F6: module.NON_INVITE_CLIENT,
        F7: module.INVITE_SERVER,
        F8: module.NON_INVITE_SERVER,
    }
    got = {
        (machine, state.name, stimulus.value): new_state.name
        for machine, table in tables.items()
        for (state, stimulus), (new_state, _) in table.items()
    }
    assert got == EXPECTED


@pytest.mark.parametrize("machine", list(MACHINES))
@settings(max_examples=150, deadline=None)
@given(data=st.data(), reliable=st.booleans())
def test_random_input_sequences_follow_the_figure(
    machine: str, data: st.DataObject, reliable: bool
) -> None:
    method, server, inputs = MACHINES[machine]
    txn = new_server(method, reliable=reliable) if server else new_client(method, reliable=reliable)
    now = 0.0
    finals = failures = 0
    terminated_events = 0
    for _ in range(data.draw(st.integers(0, 25))):
        before = txn.state.name
        choices = [i for i in inputs if i not in "ABDEFGHIJKLM" or txn.deadline(T(i)) is not None]
        if not choices:
            break
        stimulus = data.draw(st.sampled_from(choices))
        if stimulus in "ABDEFGHIJKLM":
            # The earliest timer fires first: that is the input actually applied.
            due = min(
                (t for t in T if txn.deadline(t) is not None),
                key=lambda t: txn.deadline(t),  # type: ignore[arg-type,return-value]
            )
            stimulus = due.value
            now = txn.deadline(due)  # type: ignore[assignment]
            events = txn.handle_timer(now)
            refused = False
        else:
            later = now + data.draw(st.floats(0, 0.4))
            pending = txn.get_timer()
            if pending is None or later < pending:  # never step over a due timer
                now = later
            events, refused = apply(txn, stimulus, now)
        expected = EXPECTED.get((machine, before, stimulus), before)
        if reliable and (machine, expected) in ZERO_OVER_TCP:
            # §17: Timers D, I, J, K are zero over reliable transports: straight through.
            expected = "TERMINATED"
        assert txn.state.name == expected, (before, stimulus)
        if refused:
            assert (machine, before, stimulus) not in EXPECTED
        # Invariants: time only moves forward; retransmission timers only over UDP.
        timer = txn.get_timer()
        assert timer is None or timer > now
        if reliable:
            assert all(txn.deadline(t) is None for t in (T.A, T.E, T.G))
        terminated_events += sum(isinstance(e, TransactionTerminated) for e in events)
        finals += sum(
            isinstance(e, TransactionTimeout)
            or (isinstance(e, ResponseReceived) and e.response.status >= 300)
            for e in events
        )
        failures += sum(isinstance(e, TransportFailure) for e in events)
        if txn.state is State.TERMINATED:
            assert txn.get_timer() is None
    assert terminated_events == (1 if txn.state is State.TERMINATED else 0)
    # One final outcome at most reaches the TU (the ACK of a Completed INVITE client may
    # still fail to go out: Figure 5 informs the TU of that too), one transport failure. An
    # INVITE server in Accepted reports each failed 2xx send and stays (RFC 6026 §8.7).
    if not server:
        assert finals <= 1
        assert failures <= 1


class ClientMachine(RuleBasedStateMachine):
    """A non-INVITE client under random responses and time; checks the RFC's promises."""

    @initialize(reliable=st.booleans())
    def start(self, reliable: bool) -> None:
        self.txn = new_client("REGISTER", reliable=reliable)
        self.now = 0.0
        self.to_tu: list[Event] = []
        self.requests_sent = 1

    @rule(status=st.sampled_from([100, 180, 200, 202, 302, 401, 486, 500, 603]))
    def respond(self, status: int) -> None:
        self.record(self.txn.receive(response(self.txn.request, status), self.now))

    @rule(dt=st.floats(0, 10))
    def wait(self, dt: float) -> None:
        self.now += dt
        self.record(self.txn.handle_timer(self.now))

    @rule()
    def fail(self) -> None:
        self.record(self.txn.transport_error(self.now))

    def record(self, events: list[Event]) -> None:
        self.requests_sent += len(sent(events))
        self.to_tu.extend(up(events))

    @invariant()
    def finals_reach_the_tu_once(self) -> None:
        finals = [
            e
            for e in self.to_tu
            if isinstance(e, TransactionTimeout | TransportFailure)
            or (isinstance(e, ResponseReceived) and e.response.status >= 200)
        ]
        assert len(finals) <= 1
        if self.txn.state in (State.COMPLETED, State.TERMINATED):
            assert len(finals) == 1

    @invariant()
    def bounded_retransmissions(self) -> None:
        # Over UDP at most 11 sends in 64*T1 (§17.1.2.2); over TCP exactly one.
        assert self.requests_sent <= (1 if self.txn.reliable else 11)

    @invariant()
    def gone_after_64_t1(self) -> None:
        if self.now > 64 * T1 + T4:
            assert self.txn.state is State.TERMINATED


TestClientMachine = ClientMachine.TestCase
TestClientMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


# --- the layer -------------------------------------------------------------------------------


def counter_bytes() -> Callable[[int], bytes]:
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


def test_make_branch_uses_the_injected_source() -> None:
    source = counter_bytes()
    first, second = make_branch(source), make_branch(source)
    assert first == MAGIC_COOKIE + "00000000000000000001"
    assert second == MAGIC_COOKIE + "00000000000000000002"
    assert make_branch().startswith(MAGIC_COOKIE) and len(make_branch()) == 27


def test_layer_client_matching_is_branch_plus_cseq_method() -> None:
    layer = TransactionLayer(random_bytes=counter_bytes())
    invite = request("INVITE", branch=layer.new_branch())
    key, _ = layer.send_request(invite, 0.0, "peer", reliable=False)
    cancel = make_cancel(invite)
    cancel_key, events = layer.send_request(cancel, 0.1, "peer", reliable=False)
    assert cancel_key != key and cancel.branch == invite.branch
    assert sent(events) == [cancel]
    # §17.1.3: the 200 to the CANCEL goes to the CANCEL transaction, the 487 to the INVITE.
    events = layer.receive(wire(response(cancel, 200)), 0.2, "peer", reliable=False)
    assert [e.key for e in events if isinstance(e, ResponseReceived)] == [cancel_key]
    events = layer.receive(wire(response(invite, 487)), 0.3, "peer", reliable=False)
    assert [e.key for e in events if isinstance(e, ResponseReceived)] == [key]
    assert [m.method for m in sent(events)] == ["ACK"]
    # A response for another branch matches nothing: dropped, counted (RFC 6026 §7.2).
    stray = response(request("INVITE", branch=MAGIC_COOKIE + "other"), 200)
    assert layer.receive(stray, 0.4, "peer", reliable=False) == []
    assert layer.statistics().stray_responses == 1


def test_layer_absorbs_retransmitted_requests() -> None:
    layer = TransactionLayer()
    req = request("REGISTER")
    events = layer.receive(req, 0.0, "phone", reliable=False)
    [received] = [e for e in events if isinstance(e, RequestReceived)]
    assert layer.receive(wire(req), 0.5, "phone", reliable=False) == []
    ok = response(req, 200)
    assert sent(layer.send_response(received.key, ok, 0.6)) == [ok]
    # §17.2.2: a retransmission in Completed gets the final response again, the TU nothing.
    [again] = layer.receive(wire(req), 1.0, "phone", reliable=False)
    assert isinstance(again, SendMessage) and again.message.encode() == ok.encode()
    assert (again.key, again.destination, again.reliable) == (received.key, "phone", False)
    stats = layer.statistics()
    assert stats.retransmissions_absorbed == 2 and stats.server_created == 1
    assert stats.retransmissions_sent == 1


def test_layer_server_key_includes_sent_by_and_method() -> None:
    layer = TransactionLayer()
    a = request("OPTIONS", host="a.example.com")
    b = request("OPTIONS", host="b.example.com")  # same branch, other sender
    c = request("REGISTER", host="a.example.com")  # same branch, other method
    keys = set()
    for req in (a, b, c):
        events = layer.receive(req, 0.0, "x", reliable=False)
        keys.add(next(e.key for e in events if isinstance(e, RequestReceived)))
    assert len(keys) == 3 and len(layer) == 3


def test_layer_ack_for_a_failure_matches_the_invite_and_stays_below_the_tu() -> None:
    layer = TransactionLayer()
    invite = request("INVITE")
    events = layer.receive(invite, 0.0, "phone", reliable=False)
    key = next(e.key for e in events if isinstance(e, RequestReceived))
    busy = response(invite, 486)
    layer.send_response(key, busy, 0.1)
    ack = wire(make_ack_for_failure(invite, busy))
    assert layer.receive(ack, 0.2, "phone", reliable=False) == []
    txn = layer.get(key)
    assert txn is not None and txn.state is State.CONFIRMED


def test_layer_ack_for_a_2xx_goes_to_the_tu() -> None:
    layer = TransactionLayer()
    invite = request("INVITE")
    events = layer.receive(invite, 0.0, "phone", reliable=False)
    key = next(e.key for e in events if isinstance(e, RequestReceived))
    layer.send_response(key, response(invite, 200), 0.1)
    # §17.1.1.3: the ACK for a 2xx is a transaction of its own: another branch.
    ack = request("ACK", branch=MAGIC_COOKIE + "ack-branch", to_tag="bob-tag")
    events = layer.receive(ack, 0.2, "phone", reliable=False)
    assert events == [AckReceived(None, ack, "phone")]
    assert layer.statistics().stray_acks == 1
    assert len(layer) == 1  # no transaction for an ACK


def test_layer_cancel_finds_its_invite() -> None:
    layer = TransactionLayer()
    invite = request("INVITE")
    events = layer.receive(invite, 0.0, "phone", reliable=False)
    invite_key = next(e.key for e in events if isinstance(e, RequestReceived))
    events = layer.receive(wire(make_cancel(invite)), 1.0, "phone", reliable=False)
    [cancel_event] = [e for e in events if isinstance(e, RequestReceived)]
    assert cancel_event.cancels == invite_key
    assert cancel_event.key != invite_key
    # A CANCEL for nothing we know: the TU answers 481 (§9.2).
    lonely = make_cancel(request("INVITE", branch=MAGIC_COOKIE + "unknown"))
    events = layer.receive(lonely, 1.0, "phone", reliable=False)
    assert next(e for e in events if isinstance(e, RequestReceived)).cancels is None


def test_layer_rfc2543_fallback_matching() -> None:
    layer = TransactionLayer()
    invite = request("INVITE", branch=None)
    events = layer.receive(invite, 0.0, "old-phone", reliable=False)
    key = next(e.key for e in events if isinstance(e, RequestReceived))
    assert not key.branch.startswith(MAGIC_COOKIE)
    # The retransmission matches by Request-URI, Call-ID, From tag, CSeq, top Via.
    assert sent_statuses(layer.receive(wire(invite), 0.5, "old-phone", reliable=False)) == [100]
    busy = response(invite, 486, to_tag="our-tag")
    layer.send_response(key, busy, 0.6)
    # An ACK with another To tag is not for this transaction.
    wrong = request("ACK", branch=None, to_tag="someone-else")
    assert layer.receive(wrong, 0.7, "old-phone", reliable=False) == [
        AckReceived(None, wrong, "old-phone")
    ]
    right = request("ACK", branch=None, to_tag="our-tag")
    assert layer.receive(right, 0.8, "old-phone", reliable=False) == []
    txn = layer.get(key)
    assert txn is not None and txn.state is State.CONFIRMED
    # Another CSeq is another transaction.
    events = layer.receive(request("INVITE", branch=None, seq=2), 1.0, "old-phone", reliable=False)
    assert any(isinstance(e, RequestReceived) for e in events)


def test_layer_is_bounded_and_answers_503_beyond() -> None:
    layer = TransactionLayer(max_transactions=2, retry_after=7)
    for i in range(2):
        layer.receive(request("OPTIONS", branch=f"{MAGIC_COOKIE}{i}"), 0.0, "p", reliable=False)
    extra = request("OPTIONS", branch=MAGIC_COOKIE + "extra")
    events = layer.receive(extra, 0.0, "p", reliable=True)
    [refusal] = events
    assert isinstance(refusal, SendMessage) and refusal.key is None and refusal.reliable
    assert isinstance(refusal.message, SipResponse) and refusal.message.status == 503
    assert refusal.message.headers.get("Retry-After") == "7"
    assert len(layer) == 2 and layer.statistics().overload_refused == 1
    # ACKs are never answered, even when full; our own requests are refused locally.
    ack = request("ACK", branch=MAGIC_COOKIE + "ack", to_tag="x")
    assert layer.receive(ack, 0.0, "p", reliable=False) == [AckReceived(None, ack, "p")]
    with pytest.raises(OverloadError):
        layer.send_request(request("OPTIONS", branch=layer.new_branch()), 0.0, "p", reliable=False)
    # Once one ends, there is room again.
    key = TransactionKey(True, "OPTIONS", f"{MAGIC_COOKIE}0", "client.example.com:5060")
    layer.send_response(key, response(request("OPTIONS", branch=f"{MAGIC_COOKIE}0"), 200), 0.1)
    layer.handle_timer(0.1 + 64 * T1)
    assert len(layer) == 1
    events = layer.receive(extra, 40.0, "p", reliable=False)
    assert any(isinstance(e, RequestReceived) for e in events)


def test_completed_non_invite_server_transactions_answer_retransmissions_until_timer_j() -> None:
    layer = TransactionLayer()
    req = request("REGISTER", branch=MAGIC_COOKIE + "reg")
    [received] = layer.receive(req, 0.0, "phone", reliable=False)
    assert isinstance(received, RequestReceived)
    ok = response(req, 200)
    [sent] = layer.send_response(received.key, ok, 0.1)
    assert isinstance(sent, SendMessage) and sent.message is ok
    # Kept as its response only: no state machine, but still a transaction of the layer.
    assert layer.get(received.key) is None and received.key in layer and len(layer) == 1
    assert layer.statistics().completed == 1
    assert layer.get_timer() == pytest.approx(0.1 + 64 * T1)
    # §17.2.2: each retransmission gets the final response again; the TU sees nothing.
    for now in (0.6, 1.6, 20.0):
        [again] = layer.receive(
            request("REGISTER", branch=MAGIC_COOKIE + "reg"), now, "x", reliable=False
        )
        assert isinstance(again, SendMessage) and again.message.encode() == ok.encode()
        assert (again.key, again.destination, again.reliable) == (received.key, "phone", False)
    with pytest.raises(TransactionError):  # the TU cannot answer twice
        layer.send_response(received.key, response(req, 500), 1.0)
    assert layer.handle_timer(0.1 + 64 * T1 - 0.01) == []
    assert layer.handle_timer(0.1 + 64 * T1) == [TransactionTerminated(received.key)]
    assert len(layer) == 0 and layer.get_timer() is None and received.key not in layer
    stats = layer.statistics()
    assert stats.retransmissions_absorbed == 3 and stats.retransmissions_sent == 3
    assert stats.server_created == stats.terminated == 1
    # After Timer J the same request is a new transaction again.
    events = layer.receive(
        request("REGISTER", branch=MAGIC_COOKIE + "reg"), 40.0, "x", reliable=False
    )
    assert [type(e) for e in events] == [RequestReceived]


def test_an_accepted_invite_server_transaction_is_kept_small_and_still_works() -> None:
    """RFC 6026 §8.7 Accepted, kept as a record: INVITE retransmissions absorbed, ACKs to the
    TU, the TU's 2xx retransmissions sent, a CANCEL still finds it, Timer L ends it."""
    layer = TransactionLayer()
    invite = request("INVITE")
    [received] = up(layer.receive(invite, 0.0, "caller", reliable=False))
    assert isinstance(received, RequestReceived)
    ok = response(invite, 200)
    assert sent(layer.send_response(received.key, ok, 0.5)) == [ok]
    key = received.key
    assert layer.get(key) is None and key in layer and layer.statistics().completed == 1
    assert layer.receive(wire(invite), 0.6, "caller", reliable=False) == []
    assert layer.send_response(key, ok, 1.0) == [SendMessage(key, ok, "caller", False)]
    with pytest.raises(TransactionError):
        layer.send_response(key, response(invite, 486), 1.0)
    ack = request("ACK", to_tag="bob-tag")  # same branch: matches the transaction
    assert layer.receive(ack, 1.1, "elsewhere", reliable=False) == [AckReceived(key, ack, "caller")]
    assert layer.transport_error(key, 1.2) == [TransportFailure(key, None)]
    assert key in layer  # Accepted stays after a transport error
    [cancel_received] = up(layer.receive(request("CANCEL"), 1.3, "caller", reliable=False))
    assert isinstance(cancel_received, RequestReceived) and cancel_received.cancels == key
    assert layer.get_timer() == pytest.approx(0.5 + 64 * T1)
    assert TransactionTerminated(key) in layer.handle_timer(0.5 + 64 * T1)
    assert key not in layer
    # A new INVITE with that branch is a new transaction again.
    assert up(layer.receive(wire(invite), 40.0, "caller", reliable=False))


def test_an_accepted_invite_client_transaction_passes_2xx_retransmissions_until_timer_m() -> None:
    layer = TransactionLayer(random_bytes=counter_bytes())
    invite = request("INVITE", branch=layer.new_branch())
    key, _ = layer.send_request(invite, 0.0, "callee", reliable=False)
    ok = wire(response(invite, 200))
    assert isinstance(ok, SipResponse)
    assert layer.receive(ok, 0.2, "callee", reliable=False) == [ResponseReceived(key, ok)]
    assert layer.get(key) is None and key in layer
    # RFC 6026 §8.4: each retransmitted 2xx reaches the TU (it ACKs again); others do not.
    assert layer.receive(ok, 0.7, "callee", reliable=False) == [ResponseReceived(key, ok)]
    ringing = wire(response(invite, 180))
    assert layer.receive(ringing, 0.8, "callee", reliable=False) == []
    assert layer.statistics().ignored == 1
    assert layer.handle_timer(0.2 + 64 * T1) == [TransactionTerminated(key)]
    assert len(layer) == 0 and layer.statistics().stray_responses == 0
    assert layer.receive(ok, 40.0, "callee", reliable=False) == []
    assert layer.statistics().stray_responses == 1


def test_an_rfc2543_invite_server_transaction_stays_whole_when_accepted() -> None:
    # Its ACK is matched by the To tag of our response, which the record would not keep.
    layer = TransactionLayer()
    invite = request("INVITE", branch=None)
    [received] = up(layer.receive(invite, 0.0, "old-phone", reliable=False))
    assert isinstance(received, RequestReceived)
    layer.send_response(received.key, response(invite, 200), 0.1)
    txn = layer.get(received.key)
    assert txn is not None and txn.state is State.ACCEPTED
    assert layer.statistics().completed == 0


def test_a_storm_of_answered_requests_never_fills_the_layer() -> None:
    """A registration storm leaves thousands of answered transactions waiting for Timer J;
    they must not push new requests into 503 (they used to, for 32 s), and they stay within
    `max_completed`, oldest dropped first."""
    layer = TransactionLayer(max_transactions=3, max_completed=5)
    keys = []
    for i in range(12):
        req = request("OPTIONS", branch=f"{MAGIC_COOKIE}storm{i}")
        events = layer.receive(req, i * 0.01, "p", reliable=False)
        [received] = events
        assert isinstance(received, RequestReceived), i
        keys.append(received.key)
        layer.send_response(received.key, response(req, 200), i * 0.01)
    stats = layer.statistics()
    assert stats.overload_refused == 0
    assert stats.completed == 5 and stats.completed_evicted == 7 and len(layer) == 5
    assert [k in layer for k in keys] == [False] * 7 + [True] * 5
    # The oldest kept one expires first.
    assert layer.get_timer() == pytest.approx(0.07 + 64 * T1)
    # Unanswered ones still count against max_transactions.
    for i in range(3):
        layer.receive(request("OPTIONS", branch=f"{MAGIC_COOKIE}open{i}"), 1.0, "p", reliable=False)
    [refusal] = layer.receive(
        request("OPTIONS", branch=MAGIC_COOKIE + "more"), 1.0, "p", reliable=False
    )
    assert isinstance(refusal, SendMessage) and isinstance(refusal.message, SipResponse)
    assert refusal.message.status == 503


def test_a_transport_error_ends_a_completed_transaction() -> None:
    layer = TransactionLayer()
    req = request("BYE", branch=MAGIC_COOKIE + "bye")
    [received] = layer.receive(req, 0.0, "p", reliable=False)
    assert isinstance(received, RequestReceived)
    layer.send_response(received.key, response(req, 200), 0.0)
    assert layer.transport_error(received.key, 0.5) == [
        TransportFailure(received.key, None),
        TransactionTerminated(received.key),
    ]
    assert len(layer) == 0 and layer.get_timer() is None
    assert layer.transport_error(received.key, 0.6) == []


def test_over_tcp_an_answered_request_ends_at_once() -> None:
    layer = TransactionLayer()
    req = request("REGISTER", branch=MAGIC_COOKIE + "tcp")
    [received] = layer.receive(req, 0.0, "conn", reliable=True)
    assert isinstance(received, RequestReceived)
    events = layer.send_response(received.key, response(req, 200), 0.0)
    assert [type(e) for e in events] == [SendMessage, TransactionTerminated]
    assert len(layer) == 0 and layer.statistics().completed == 0


def test_layer_timers_run_earliest_first_and_remove_terminated() -> None:
    layer = TransactionLayer(random_bytes=counter_bytes())
    assert layer.get_timer() is None
    k1, _ = layer.send_request(
        request("OPTIONS", branch=layer.new_branch()), 0.0, "p", reliable=False
    )
    k2, _ = layer.send_request(
        request("INVITE", branch=layer.new_branch()), 0.2, "p", reliable=True
    )
    assert layer.get_timer() == T1  # k1's Timer E
    events = layer.handle_timer(T1)
    assert [e.key for e in events] == [k1]  # a retransmission
    assert layer.get_timer() == 1.5
    events = []
    while (when := layer.get_timer()) is not None:
        assert when <= 0.2 + 64 * T1
        events.extend(layer.handle_timer(when))
    timeouts = [e.key for e in events if isinstance(e, TransactionTimeout)]
    assert sorted(timeouts, key=lambda k: k.method) == [k2, k1]
    assert len(layer) == 0 and layer.get_timer() is None
    stats = layer.statistics()
    assert stats.timeouts == 2 and stats.terminated == 2 and stats.active == 0
    assert stats.retransmissions_sent == 10


def test_layer_heap_stays_small_under_many_reschedules() -> None:
    layer = TransactionLayer(random_bytes=counter_bytes())
    layer.send_request(request("OPTIONS", branch=layer.new_branch()), 0.0, "p", reliable=False)
    now = 0.0
    for _ in range(200):
        now += 0.01
        layer.receive(request("OPTIONS", branch=MAGIC_COOKIE + "z"), now, "q", reliable=False)
    assert len(layer._heap) <= 4 * len(layer) + 64 + 1


def test_layer_transport_error_reaches_the_tu() -> None:
    layer = TransactionLayer(random_bytes=counter_bytes())
    key, _ = layer.send_request(
        request("OPTIONS", branch=layer.new_branch()), 0.0, "p", reliable=True
    )
    events = layer.transport_error(key, 0.1)
    failure = events[0]
    assert isinstance(failure, TransportFailure)
    assert failure.response is not None and failure.response.status == 503
    assert layer.transport_error(key, 0.2) == []  # gone already
    assert layer.statistics().transport_errors == 1


def test_layer_refuses_tu_misuse() -> None:
    layer = TransactionLayer()
    with pytest.raises(TransactionError):
        layer.send_request(request("ACK", to_tag="x"), 0.0, "p", reliable=False)
    with pytest.raises(TransactionError):
        layer.send_request(request("OPTIONS", branch="old-style"), 0.0, "p", reliable=False)
    layer.send_request(request("OPTIONS"), 0.0, "p", reliable=False)
    with pytest.raises(TransactionError):
        layer.send_request(request("OPTIONS"), 0.0, "p", reliable=False)
    with pytest.raises(TransactionError):
        layer.send_response(TransactionKey(True, "X", "y"), response(request(), 200), 0.0)


def test_layer_drops_unvalidated_garbage_without_raising() -> None:
    layer = TransactionLayer()
    broken = parse_message_untrusted(
        b"OPTIONS sip:x@example.com SIP/2.0\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    assert layer.receive(broken, 0.0, "p", reliable=False) == []
    bad_response = parse_message_untrusted(b"SIP/2.0 200 OK\r\nVia: x\r\nContent-Length: 0\r\n\r\n")
    assert layer.receive(bad_response, 0.0, "p", reliable=False) == []
    assert layer.statistics().malformed == 2


def test_make_cancel_copies_what_9_1_asks() -> None:
    invite = request("INVITE", extra="Route: <sip:proxy.example.com;lr>\r\n", seq=7)
    cancel = make_cancel(invite)
    assert cancel.method == "CANCEL" and cancel.uri == invite.uri
    assert cancel.cseq.seq == 7 and cancel.cseq.method == "CANCEL"
    assert cancel.branch == invite.branch and len(cancel.vias) == 1
    assert cancel.headers.get_all("Route") == ["<sip:proxy.example.com;lr>"]
    assert cancel.from_tag == invite.from_tag and cancel.to_tag is None
    validate_request_untrusted(wire(cancel))  # type: ignore[arg-type]


# --- a terrible network ----------------------------------------------------------------------


@dataclass(order=True)
class _Datagram:
    when: float
    order: int
    destination: str = field(compare=False)
    source: str = field(compare=False)
    data: bytes = field(compare=False)


class LossyNetwork:
    """A seeded datagram network: each send is dropped with `loss`, duplicated with
    `duplicate`, and delivered after a random delay (so reordered); `reliable` makes it a
    lossless, in-order stream-like transport."""

    def __init__(
        self,
        seed: int,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        max_delay: float = 0.3,
        reliable: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.loss, self.duplicate, self.max_delay = loss, duplicate, max_delay
        self.reliable = reliable
        self.queue: list[_Datagram] = []
        self.order = itertools.count()
        self.sent = self.dropped = 0
        self.last_delivery: dict[tuple[str, str], float] = {}

    def send(self, now: float, source: str, destination: str, data: bytes) -> None:
        self.sent += 1
        copies = 1
        if not self.reliable:
            if self.rng.random() < self.loss:
                self.dropped += 1
                return
            if self.rng.random() < self.duplicate:
                copies = 2
        for _ in range(copies):
            delay = self.rng.uniform(0.0, self.max_delay)
            if not self.reliable and self.rng.random() < 0.05:
                delay += 1.5  # a long detour: reordering
            when = now + delay
            if self.reliable:
                # In order per direction, like a stream.
                when = max(when, self.last_delivery.get((source, destination), 0.0))
                self.last_delivery[(source, destination)] = when
            heapq.heappush(self.queue, _Datagram(when, next(self.order), destination, source, data))

    def next_time(self) -> float | None:
        return self.queue[0].when if self.queue else None

    def pop(self) -> _Datagram:
        return heapq.heappop(self.queue)


class Endpoint:
    """A transaction layer plus a small TU: a UAS that answers INVITE with 180 and 200
    (retransmitting the 2xx itself, §13.3.1.4) and REGISTER with 200, and a UAC that ACKs
    every 2xx it is given through a `Dialog` (§13.2.2.4)."""

    def __init__(
        self, name: str, network: LossyNetwork, reliable: bool, *, cancel: bool = False
    ) -> None:
        self.name = name
        self.cancel = cancel  # UAS: ring only, honour CANCEL; UAC: CANCEL after a 1xx
        self.cancel_sent = False
        self.network = network
        self.reliable = reliable
        self.layer = TransactionLayer(random_bytes=random.Random(name).randbytes)
        self.requests_seen: list[tuple[SipRequest, bool]] = []  # (request, txn existed before)
        self.acks: list[SipRequest] = []
        self.finals: list[SipResponse] = []
        self.timeouts: list[TransactionTimeout] = []
        self.dialog: Dialog | None = None
        self.invite: SipRequest | None = None
        # UAS 2xx retransmission (the TU's job): key, response, next time, interval, deadline.
        self.pending_2xx: tuple[TransactionKey, SipResponse] | None = None
        self.resend_at: float | None = None
        self.interval = T1
        self.give_up_at = 0.0
        self.gave_up = False

    def get_timer(self) -> float | None:
        times = [t for t in (self.layer.get_timer(), self.resend_at) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self.dispatch(self.layer.handle_timer(now), now)
        if self.resend_at is not None and self.resend_at <= now and self.pending_2xx:
            if now >= self.give_up_at or self.pending_2xx[0] not in self.layer:
                # §13.3.1.4: no ACK within 64*T1: the UAS would send a BYE; we just stop.
                self.gave_up = True
                self.resend_at = None
                return
            self.dispatch(self.layer.send_response(*self.pending_2xx, now), now)
            self.interval = min(self.interval * 2, T2)
            self.resend_at = now + self.interval

    def deliver(self, data: bytes, source: str, now: float) -> None:
        message = parse_message_untrusted(data)
        if isinstance(message, SipRequest):
            validate_request_untrusted(message)
            existed = server_key(message) in self.layer
            if message.method != "ACK":
                self.requests_seen.append((message, existed))
        else:
            validate_response_untrusted(message)
        self.dispatch(self.layer.receive(message, now, source, reliable=self.reliable), now)

    def dispatch(self, events: list[Event], now: float) -> None:
        for event in events:
            if isinstance(event, SendMessage):
                self.network.send(now, self.name, str(event.destination), event.message.encode())
            elif isinstance(event, RequestReceived):
                self.answer(event, now)
            elif isinstance(event, AckReceived):
                self.acks.append(event.request)
                self.resend_at = None
            elif isinstance(event, ResponseReceived):
                self.on_response(event.response, now)
            elif isinstance(event, TransactionTimeout):
                self.timeouts.append(event)

    def answer(self, event: RequestReceived, now: float) -> None:
        req = event.request
        if req.method == "CANCEL":
            # §9.2: 200 for the CANCEL, 487 for the INVITE if it is still pending.
            self.dispatch(self.layer.send_response(event.key, response(req, 200, "uas"), now), now)
            invite_txn = self.layer.get(event.cancels) if event.cancels else None
            if invite_txn is not None and invite_txn.state is State.PROCEEDING:
                terminated = response(invite_txn.request, 487, "uas")
                self.dispatch(self.layer.send_response(invite_txn.key, terminated, now), now)
            return
        if req.method == "INVITE" and self.cancel:
            self.dispatch(self.layer.send_response(event.key, response(req, 180, "uas"), now), now)
            return
        if req.method == "INVITE":
            self.dispatch(self.layer.send_response(event.key, response(req, 180, "uas"), now), now)
            ok = make_response(
                req, 200, to_tag="uas", headers=[("Contact", f"<sip:bob@{self.name}>")]
            )
            self.dialog = Dialog.as_uas(req, ok)
            self.dispatch(self.layer.send_response(event.key, ok, now), now)
            self.pending_2xx = (event.key, ok)
            self.interval = T1
            self.resend_at = now + T1 if not self.reliable else None
            self.give_up_at = now + 64 * T1
        else:
            self.dispatch(self.layer.send_response(event.key, response(req, 200, "uas"), now), now)

    def on_response(self, resp: SipResponse, now: float) -> None:
        if resp.status < 200:
            if self.cancel and not self.cancel_sent and self.invite is not None:
                # §9.1: a CANCEL only once a provisional response has come.
                self.cancel_sent = True
                cancel = make_cancel(self.invite)
                _, events = self.layer.send_request(cancel, now, "uas", reliable=self.reliable)
                self.dispatch(events, now)
            return
        self.finals.append(resp)
        if resp.cseq.method == "INVITE" and resp.status < 300:
            assert self.invite is not None
            if self.dialog is None:
                self.dialog = Dialog.as_uac(self.invite, resp)
            # §13.2.2.4: the ACK for a 2xx is sent directly, again for every retransmission.
            ack = self.dialog.create_ack(
                via=f"SIP/2.0/UDP {self.name};branch={self.layer.new_branch()}"
            )
            peer = "uas"
            self.network.send(now, self.name, peer, ack.encode())

    def start(self, method: str, now: float) -> None:
        req = request(
            method,
            branch=self.layer.new_branch(),
            host=self.name,
            uri="sip:bob@uas",
            extra="",
        )
        if method == "INVITE":
            self.invite = req
        self.dispatch(self.layer.send_request(req, now, "uas", reliable=self.reliable)[1], now)


def run_conversation(
    method: str, seed: int, *, cancel: bool = False, **network: Any
) -> tuple[Endpoint, Endpoint]:
    net = LossyNetwork(seed, **network)
    reliable = bool(network.get("reliable", False))
    uac = Endpoint("uac", net, reliable, cancel=cancel)
    uas = Endpoint("uas", net, reliable, cancel=cancel)
    endpoints = {"uac": uac, "uas": uas}
    uac.start(method, 0.0)
    now = 0.0
    for _ in range(20_000):
        times = [t for t in (net.next_time(), uac.get_timer(), uas.get_timer()) if t is not None]
        if not times:
            break
        now = max(now, min(times))
        if net.next_time() == now:
            datagram = net.pop()
            endpoints[datagram.destination].deliver(datagram.data, datagram.source, now)
            continue
        for endpoint in (uac, uas):
            when = endpoint.get_timer()
            if when is not None and when <= now:
                endpoint.handle_timer(now)
    else:
        raise AssertionError("the conversation did not settle")
    return uac, uas


def check_clean(uac: Endpoint, uas: Endpoint) -> None:
    """Whatever happened, both sides end with no transaction and no timer left, and the UAS's
    TU saw a request twice only when no transaction was there to absorb it."""
    for endpoint in (uac, uas):
        assert len(endpoint.layer) == 0
        assert endpoint.layer.get_timer() is None
    assert all(existed is False for _, existed in uas.requests_seen[:1])
    tu_copies = [req for req, existed in uas.requests_seen if not existed and req.method != "ACK"]
    assert len(tu_copies) == uas.layer.statistics().server_created
    # Client outcome: exactly one of final responses / timeout.
    assert (len(uac.finals) > 0) != (len(uac.timeouts) > 0)


@pytest.mark.parametrize(
    "network",
    [
        {"loss": 0.3, "duplicate": 0.2, "max_delay": 0.4},
        {"loss": 0.1, "duplicate": 0.5, "max_delay": 1.0},
        {"reliable": True, "max_delay": 0.5},
    ],
    ids=["lossy", "duplicating", "reliable"],
)
def test_invite_200_ack_over_a_terrible_network(network: dict[str, Any]) -> None:
    completed = 0
    seeds = range(60)
    for seed in seeds:
        uac, uas = run_conversation("INVITE", seed, **network)
        check_clean(uac, uas)
        if uac.finals:
            assert all(resp.status == 200 for resp in uac.finals)
            assert uac.dialog is not None and uas.dialog is not None
            # Both sides name the same dialog from their own side.
            assert uac.dialog.local_tag == uas.dialog.remote_tag
            assert uac.dialog.remote_tag == uas.dialog.local_tag
        if uas.acks:
            assert uac.finals  # an ACK only ever follows a 2xx
            assert {ack.cseq.seq for ack in uas.acks} == {1}
        if uac.finals and uas.acks and not uas.gave_up:
            completed += 1
        if network.get("reliable"):
            assert uac.layer.statistics().retransmissions_sent == 0
            assert uas.layer.statistics().retransmissions_sent == 0
            assert len(uas.requests_seen) == 1
    # 11 INVITE and 2xx sends each, 30% loss: nearly every seed completes.
    assert completed >= 0.9 * len(seeds)


@pytest.mark.parametrize(
    "network",
    [
        {"loss": 0.3, "duplicate": 0.2, "max_delay": 0.4},
        {"loss": 0.1, "duplicate": 0.5, "max_delay": 1.0},
        {"reliable": True, "max_delay": 0.5},
    ],
    ids=["lossy", "duplicating", "reliable"],
)
def test_register_200_over_a_terrible_network(network: dict[str, Any]) -> None:
    completed = 0
    seeds = range(60)
    for seed in seeds:
        uac, uas = run_conversation("REGISTER", seed, **network)
        check_clean(uac, uas)
        # The registrar's TU saw the REGISTER once, however often the network copied it.
        assert uas.layer.statistics().server_created <= 1
        if uac.finals:
            assert [resp.status for resp in uac.finals] == [200]
            completed += 1
        else:
            assert uac.timeouts[0].response is not None
            assert uac.timeouts[0].response.status == 408
    assert completed >= 0.9 * len(seeds)


@pytest.mark.parametrize("method", ["INVITE", "REGISTER"])
def test_a_dead_network_times_out_cleanly(method: str) -> None:
    for seed in range(10):
        uac, uas = run_conversation(method, seed, loss=0.97, duplicate=0.3)
        check_clean(uac, uas)
    for seed in range(30):
        # Half the datagrams lost and long detours: every mix of outcomes, always clean.
        uac, uas = run_conversation(method, seed, loss=0.6, duplicate=0.4, max_delay=2.0)
        check_clean(uac, uas)
    uac, uas = run_conversation(method, 0, loss=1.0)
    assert uac.timeouts and not uac.finals and not uas.requests_seen
    # Over UDP the request was sent 1 + retransmissions times, all lost.
    assert uac.layer.statistics().retransmissions_sent == (6 if method == "INVITE" else 10)


@pytest.mark.parametrize(
    "network",
    [
        {"loss": 0.3, "duplicate": 0.2, "max_delay": 0.4},
        {"loss": 0.1, "duplicate": 0.5, "max_delay": 1.0},
        {"reliable": True, "max_delay": 0.5},
    ],
    ids=["lossy", "duplicating", "reliable"],
)
def test_cancel_over_a_terrible_network(network: dict[str, Any]) -> None:
    for seed in range(40):
        uac, uas = run_conversation("INVITE", seed, cancel=True, **network)
        for endpoint in (uac, uas):
            assert len(endpoint.layer) == 0 and endpoint.layer.get_timer() is None
        assert uac.cancel_sent
        # The INVITE ends with exactly one 487 (absorbed retransmissions, ACKed by the
        # transaction); the CANCEL with its 200.
        invite_finals = [r.status for r in uac.finals if r.cseq.method == "INVITE"]
        cancel_finals = [r.status for r in uac.finals if r.cseq.method == "CANCEL"]
        assert invite_finals == [487]
        assert cancel_finals == [200] or (uac.timeouts and not cancel_finals)
        # The UAS's TU saw one INVITE and one CANCEL, however often the network copied them.
        assert sorted(r.method for r, existed in uas.requests_seen if not existed) == [
            "CANCEL",
            "INVITE",
        ]


# --- the layer under random traffic ----------------------------------------------------------

BRANCHES = [MAGIC_COOKIE + "1", MAGIC_COOKIE + "2", "rfc2543-branch", None]


class LayerUnderRandomTraffic(RuleBasedStateMachine):
    """Random requests, responses, TU answers, transport errors and time, thrown at a small
    layer: it never raises anything but TransactionError for TU misuse the tables forbid,
    never holds more than its bound, and keeps its books."""

    @initialize()
    def start(self) -> None:
        self.layer = TransactionLayer(
            max_transactions=6, max_completed=3, random_bytes=counter_bytes()
        )
        self.now = 0.0
        self.server_keys: list[TransactionKey] = []
        self.client_keys: list[TransactionKey] = []
        self.sent_requests: list[SipRequest] = []

    def feed(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, RequestReceived):
                assert self.layer.get(event.key) is not None
                self.server_keys.append(event.key)
            elif (
                isinstance(event, SendMessage)
                and isinstance(event.message, SipRequest)
                and event.message.method != "ACK"
            ):
                self.sent_requests.append(event.message)

    @rule(
        method=st.sampled_from(["INVITE", "ACK", "CANCEL", "OPTIONS", "REGISTER", "BYE"]),
        branch=st.sampled_from(BRANCHES),
        host=st.sampled_from(["a.example.com", "b.example.com"]),
        seq=st.integers(1, 3),
        to_tag=st.sampled_from([None, "bob-tag", "other"]),
        reliable=st.booleans(),
    )
    def incoming_request(
        self,
        method: str,
        branch: str | None,
        host: str,
        seq: int,
        to_tag: str | None,
        reliable: bool,
    ) -> None:
        req = request(method, branch=branch, host=host, seq=seq, to_tag=to_tag)
        self.feed(self.layer.receive(req, self.now, host, reliable=reliable))

    @rule(data=st.data(), status=st.sampled_from([100, 180, 200, 404, 487, 503]))
    def incoming_response(self, data: st.DataObject, status: int) -> None:
        reply_to_ours = data.draw(st.booleans())
        if self.sent_requests and reply_to_ours:
            req = data.draw(st.sampled_from(self.sent_requests))
        else:
            req = request(data.draw(st.sampled_from(["INVITE", "OPTIONS"])), branch=BRANCHES[0])
        self.feed(self.layer.receive(response(req, status), self.now, "x", reliable=False))

    @rule(data=st.data(), status=st.sampled_from([100, 180, 200, 486]))
    def tu_answers(self, data: st.DataObject, status: int) -> None:
        if not self.server_keys:
            return
        key = data.draw(st.sampled_from(self.server_keys))
        txn = self.layer.get(key)
        if txn is None:
            with pytest.raises(TransactionError):
                self.layer.send_response(key, response(request(), status), self.now)
            return
        resp = response(txn.request, status)
        allowed = status != 100 or key.method != "INVITE"
        try:
            self.feed(self.layer.send_response(key, resp, self.now))
        except TransactionError:
            stimulus = {1: Input.TU_PROVISIONAL, 2: Input.TU_SUCCESS}.get(
                status // 100, Input.TU_FAILURE
            )
            assert not allowed or (txn.state, stimulus) not in txn.TABLE

    @rule(method=st.sampled_from(["INVITE", "OPTIONS", "REGISTER"]), reliable=st.booleans())
    def tu_sends(self, method: str, reliable: bool) -> None:
        req = request(method, branch=self.layer.new_branch())
        try:
            key, events = self.layer.send_request(req, self.now, "peer", reliable=reliable)
        except OverloadError:
            live = len(self.layer) - self.layer.statistics().completed
            assert live == self.layer.max_transactions
            return
        self.client_keys.append(key)
        self.feed(events)

    @rule(data=st.data())
    def transport_fails(self, data: st.DataObject) -> None:
        keys = self.server_keys + self.client_keys
        if keys:
            self.feed(self.layer.transport_error(data.draw(st.sampled_from(keys)), self.now))

    @rule(dt=st.floats(0, 20))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.feed(self.layer.handle_timer(self.now))

    @invariant()
    def books_are_kept(self) -> None:
        if not hasattr(self, "layer"):
            return
        stats = self.layer.statistics()
        assert len(self.layer) - stats.completed <= self.layer.max_transactions
        assert stats.completed <= self.layer.max_completed
        assert stats.active == len(self.layer)
        assert stats.client_created + stats.server_created - stats.terminated == len(self.layer)
        assert all(not t.terminated for t in self.layer._transactions.values())
        timer = self.layer.get_timer()
        assert timer is None or timer > self.now


TestLayerUnderRandomTraffic = LayerUnderRandomTraffic.TestCase
TestLayerUnderRandomTraffic.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)


def test_ack_and_cancel_copy_the_top_via_as_sent() -> None:
    text = (
        "INVITE sip:bob@example.com SIP/2.0\r\n"
        "Via: SIP/2.0/UDP Client.Example.COM:5060 ;branch=z9hG4bKabc;rport, "
        "SIP/2.0/TCP proxy.example.com;branch=z9hG4bKp\r\n"
        "Via: SIP/2.0/UDP third.example.com;branch=z9hG4bK3\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n"
        "Call-ID: v@x\r\nCSeq: 4 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
    invite = parse_message_untrusted(text.encode())
    assert isinstance(invite, SipRequest)
    validate_request_untrusted(invite)
    top = "SIP/2.0/UDP Client.Example.COM:5060 ;branch=z9hG4bKabc;rport"
    ack = make_ack_for_failure(invite, response(invite, 404))
    cancel = make_cancel(invite)
    assert ack.headers.get_all("Via") == [top] == cancel.headers.get_all("Via")
    assert server_key(wire(ack)) == server_key(invite)  # type: ignore[arg-type]
    cancel_key = dataclasses.replace(server_key(invite), method="CANCEL")
    assert server_key(wire(cancel)) == cancel_key  # type: ignore[arg-type]
