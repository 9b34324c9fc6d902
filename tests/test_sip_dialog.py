"""Tests for shared.sip.dialog: RFC 3261 §12 dialogs from both sides, routing, CSeq, ACK, BYE.

Requests and responses are built as text and parsed (as they would arrive), and what a dialog
builds is sent through bytes and the validator, so the tests also check that it is valid SIP.
Hypothesis checks the CSeq rule for any order of numbers and the route-set encoding (loose and
strict) for any route set.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.sip.dialog import (
    TARGET_REFRESH_METHODS,
    Dialog,
    DialogError,
    DialogId,
    DialogState,
    dialog_id_of_request,
    dialog_id_of_response,
    response_in_dialog,
)
from shared.sip.headers import parse_address_untrusted
from shared.sip.message import (
    SipRequest,
    SipResponse,
    make_response,
    parse_message_untrusted,
    validate_request_untrusted,
    validate_response_untrusted,
)
from shared.sip.uri import SipUri

VIA = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKnew"
CALL_ID = "c1@192.0.2.10"


def invite(
    *,
    record_route: Sequence[str] = (),
    contact: str | None = "<sip:alice@192.0.2.10:5060>",
    seq: int = 1,
    method: str = "INVITE",
    extra: str = "",
) -> SipRequest:
    lines = [
        f"{method} sip:bob@example.com SIP/2.0",
        "Via: SIP/2.0/UDP proxy2.example.com;branch=z9hG4bKp2",
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKa",
        "Max-Forwards: 68",
        'From: "Alice" <sip:alice@example.com>;tag=alice-tag',
        "To: Bob <sip:bob@example.com>",
        f"Call-ID: {CALL_ID}",
        f"CSeq: {seq} {method}",
    ]
    lines += [f"Record-Route: {rr}" for rr in record_route]
    if contact is not None:
        lines.append(f"Contact: {contact}")
    text = "\r\n".join(lines) + "\r\n" + extra + "Content-Length: 0\r\n\r\n"
    message = parse_message_untrusted(text.encode())
    assert isinstance(message, SipRequest)
    validate_request_untrusted(message)
    return message


def answer(
    request: SipRequest,
    status: int = 200,
    *,
    to_tag: str | None = "bob-tag",
    contact: str | None = "<sip:bob@198.51.100.20:5070>",
) -> SipResponse:
    headers = [("Record-Route", value) for value in request.headers.get_all("Record-Route")]
    if contact is not None:
        headers.append(("Contact", contact))
    return wire_response(make_response(request, status, to_tag=to_tag, headers=headers))


def wire_request(message: SipRequest) -> SipRequest:
    parsed = parse_message_untrusted(message.encode())
    assert isinstance(parsed, SipRequest)
    validate_request_untrusted(parsed)
    return parsed


def wire_response(message: SipResponse) -> SipResponse:
    parsed = parse_message_untrusted(message.encode())
    assert isinstance(parsed, SipResponse)
    validate_response_untrusted(parsed)
    return parsed


PROXIES = ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]


def pair(record_route: list[str] = PROXIES) -> tuple[Dialog, Dialog, SipRequest]:
    """A confirmed dialog from both sides: (uac, uas, the INVITE)."""
    req = invite(record_route=record_route)
    ok = answer(req)
    uas = Dialog.as_uas(req, ok)
    uac = Dialog.as_uac(req, ok)
    return uac, uas, req


# --- creation --------------------------------------------------------------------------------


def test_uac_dialog_from_a_2xx() -> None:
    req = invite(record_route=PROXIES)
    dialog = Dialog.as_uac(req, answer(req))
    assert dialog.state is DialogState.CONFIRMED
    assert dialog.id == DialogId(CALL_ID, "alice-tag", "bob-tag")
    assert (dialog.local_tag, dialog.remote_tag) == ("alice-tag", "bob-tag")
    assert dialog.local_cseq == 1 and dialog.remote_cseq is None
    assert str(dialog.remote_target) == "sip:bob@198.51.100.20:5070"
    # §12.1.2: the Record-Route of the response, reversed.
    assert [str(r.uri) for r in dialog.route_set] == [
        "sip:p2.example.com;lr",
        "sip:p1.example.com;lr",
    ]
    assert str(dialog.local_address) == '"Alice" <sip:alice@example.com>'
    assert str(dialog.remote_address) == '"Bob" <sip:bob@example.com>'
    assert dialog.local_contact is not None
    assert str(dialog.local_contact.uri) == "sip:alice@192.0.2.10:5060"


def test_uas_dialog_from_the_request_it_answers() -> None:
    req = invite(record_route=PROXIES)
    dialog = Dialog.as_uas(req, answer(req))
    assert dialog.id == DialogId(CALL_ID, "bob-tag", "alice-tag")
    assert dialog.local_cseq is None and dialog.remote_cseq == 1
    assert str(dialog.remote_target) == "sip:alice@192.0.2.10:5060"
    # §12.1.1: the Record-Route of the request, in order.
    assert [str(r.uri) for r in dialog.route_set] == [
        "sip:p1.example.com;lr",
        "sip:p2.example.com;lr",
    ]
    assert dialog.local_contact is not None
    assert str(dialog.local_contact.uri) == "sip:bob@198.51.100.20:5070"


def test_a_provisional_with_a_tag_makes_an_early_dialog() -> None:
    req = invite()
    ringing = answer(req, 180)
    assert Dialog.as_uac(req, ringing).state is DialogState.EARLY
    assert Dialog.as_uas(req, ringing).state is DialogState.EARLY


@pytest.mark.parametrize(("status", "to_tag"), [(100, None), (180, None), (200, None), (486, "t")])
def test_no_dialog_without_a_tag_or_from_a_failure(status: int, to_tag: str | None) -> None:
    req = invite()
    resp = answer(req, status, to_tag=to_tag)
    with pytest.raises(DialogError):
        Dialog.as_uac(req, resp)
    with pytest.raises(DialogError):
        Dialog.as_uas(req, resp)


def test_uac_without_a_contact_keeps_the_request_uri() -> None:
    req = invite()
    dialog = Dialog.as_uac(req, answer(req, contact=None))
    assert str(dialog.remote_target) == "sip:bob@example.com"


def test_dialog_ids_agree_across_the_two_sides() -> None:
    uac, uas, req = pair()
    assert dialog_id_of_response(answer(req)) == uac.id
    assert dialog_id_of_response(answer(req, 100, to_tag=None)) is None
    bye = wire_request(uac.create_bye(via=VIA))
    assert dialog_id_of_request(bye) == uas.id
    assert dialog_id_of_request(req) is None  # no To tag: outside any dialog
    back = wire_request(uas.create_request("INFO", via=VIA))
    assert dialog_id_of_request(back) == uac.id


# --- requests inside the dialog (§12.2.1.1) ---------------------------------------------------


def test_loose_routing_keeps_the_target_in_the_request_uri() -> None:
    uac, _, _ = pair()
    reinvite = wire_request(uac.create_request("INVITE", via=VIA, body=b""))
    assert reinvite.uri == "sip:bob@198.51.100.20:5070"
    assert reinvite.headers.get_all("Route") == [
        "<sip:p2.example.com;lr>",
        "<sip:p1.example.com;lr>",
    ]
    assert reinvite.cseq.seq == 2 and reinvite.cseq.method == "INVITE"
    assert reinvite.from_tag == "alice-tag" and reinvite.to_tag == "bob-tag"
    assert reinvite.call_id == CALL_ID
    assert reinvite.max_forwards == 70
    assert reinvite.branch == "z9hG4bKnew" and len(reinvite.vias) == 1
    # A target refresh carries our Contact (§12.2.1.1).
    assert [str(c.uri) for c in reinvite.contacts] == ["sip:alice@192.0.2.10:5060"]
    assert str(uac.next_hop) == "sip:p2.example.com;lr"


def test_without_a_route_set_the_request_goes_to_the_target() -> None:
    uac, _, _ = pair(record_route=[])
    bye = wire_request(uac.create_bye(via=VIA))
    assert bye.uri == "sip:bob@198.51.100.20:5070"
    assert bye.headers.get_all("Route") == []
    assert bye.contacts == []  # BYE is no target refresh
    assert str(uac.next_hop) == "sip:bob@198.51.100.20:5070"


def test_strict_routing_puts_the_first_route_in_the_request_uri() -> None:
    strict = ["<sip:old.example.com;method=INVITE;transport=udp>", "<sip:p2.example.com;lr>"]
    _, uas, _ = pair(record_route=strict)
    bye = wire_request(uas.create_bye(via=VIA))
    # §12.2.1.1: the first route (without parameters not allowed there) is the Request-URI,
    # the remote target goes last.
    assert bye.uri == "sip:old.example.com;transport=udp"
    assert bye.headers.get_all("Route") == [
        "<sip:p2.example.com;lr>",
        "<sip:alice@192.0.2.10:5060>",
    ]
    assert str(uas.next_hop) == "sip:old.example.com;method=INVITE;transport=udp"


def test_local_cseq_increases_and_the_uas_starts_from_one() -> None:
    uac, uas, _ = pair()
    assert [uac.create_request("INFO", via=VIA).cseq.seq for _ in range(3)] == [2, 3, 4]
    assert uac.local_cseq == 4
    assert [uas.create_request("INFO", via=VIA).cseq.seq for _ in range(2)] == [1, 2]


def test_local_cseq_is_bounded() -> None:
    uac, _, _ = pair()
    uac.local_cseq = 2**31 - 1
    with pytest.raises(DialogError):
        uac.create_request("INFO", via=VIA)


def test_extra_headers_and_body() -> None:
    uac, _, _ = pair()
    info = wire_request(
        uac.create_request(
            "INFO",
            via=VIA,
            headers=[("Content-Type", "application/dtmf-relay")],
            body=b"Signal=5\r\nDuration=160\r\n",
        )
    )
    assert info.headers.get("Content-Type") == "application/dtmf-relay"
    assert info.body == b"Signal=5\r\nDuration=160\r\n"


def test_ack_and_cancel_are_not_ordinary_requests() -> None:
    uac, _, _ = pair()
    for method in ("ACK", "CANCEL"):
        with pytest.raises(DialogError):
            uac.create_request(method, via=VIA)


def test_ack_for_a_2xx_repeats_the_invite_cseq_and_credentials() -> None:
    req = invite(
        record_route=PROXIES,
        seq=5,
        extra='Proxy-Authorization: Digest username="alice", realm="x", nonce="n", '
        'uri="sip:bob@example.com", response="0123456789abcdef0123456789abcdef"\r\n',
    )
    ok = answer(req)
    uac = Dialog.as_uac(req, ok)
    ack = wire_request(uac.create_ack(via=VIA, invite=req))
    assert ack.method == "ACK" and ack.cseq.seq == 5 and ack.cseq.method == "ACK"
    assert ack.headers.get("Proxy-Authorization") == req.headers.get("Proxy-Authorization")
    assert ack.uri == "sip:bob@198.51.100.20:5070"
    assert ack.headers.get_all("Route") == ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
    assert ack.to_tag == "bob-tag"
    assert uac.local_cseq == 5  # §13.2.2.4: the ACK takes no new number
    # Without the INVITE at hand: the last INVITE the dialog knows.
    assert uac.create_ack(via=VIA).cseq.seq == 5
    reinvite = uac.create_request("INVITE", via=VIA)
    assert uac.create_ack(via=VIA).cseq.seq == reinvite.cseq.seq == 6


def test_ack_needs_an_invite() -> None:
    _, uas, _ = pair()
    with pytest.raises(DialogError):
        uas.create_ack(via=VIA)


# --- requests from the peer (§12.2.2) --------------------------------------------------------


def in_dialog(sender: Dialog, method: str, seq: int | None = None, **kw: str) -> SipRequest:
    req = sender.create_request(method, via=VIA)
    if seq is not None:
        req.headers.set("CSeq", f"{seq} {method}")
    for name, value in kw.items():
        req.headers.set(name, value)
    return wire_request(req)


def test_a_lower_cseq_gets_a_500() -> None:
    uac, uas, _ = pair()
    assert uas.receive_request(in_dialog(uac, "INFO", 10)) is None
    assert uas.remote_cseq == 10
    refusal = uas.receive_request(in_dialog(uac, "INFO", 9))
    assert refusal is not None and refusal.status == 500
    assert uas.remote_cseq == 10
    assert uas.receive_request(in_dialog(uac, "INFO", 11)) is None
    assert uas.remote_cseq == 11


def test_ack_and_cancel_carry_the_invite_cseq_unchecked() -> None:
    uac, uas, req = pair()
    uas.receive_request(in_dialog(uac, "INFO", 10))
    ack = wire_request(uac.create_ack(via=VIA, invite=req))
    assert ack.cseq.seq == 1
    assert uas.receive_request(ack) is None
    assert uas.remote_cseq == 10


def test_first_request_from_the_uas_sets_the_remote_cseq() -> None:
    uac, uas, _ = pair()
    assert uac.remote_cseq is None
    assert uac.receive_request(in_dialog(uas, "INFO")) is None
    assert uac.remote_cseq == 1


def test_target_refresh_replaces_the_remote_target() -> None:
    uac, uas, _ = pair()
    reinvite = in_dialog(uac, "INVITE", Contact="<sip:alice@203.0.113.7:5062>")
    assert uas.receive_request(reinvite) is None
    assert str(uas.remote_target) == "sip:alice@203.0.113.7:5062"
    # Not a target refresh: a Contact in an INFO changes nothing.
    info = in_dialog(uac, "INFO", Contact="<sip:alice@203.0.113.99>")
    assert uas.receive_request(info) is None
    assert str(uas.remote_target) == "sip:alice@203.0.113.7:5062"
    assert "UPDATE" in TARGET_REFRESH_METHODS and "INFO" not in TARGET_REFRESH_METHODS


def test_bye_ends_the_dialog_and_later_requests_get_481() -> None:
    uac, uas, _ = pair()
    assert uas.receive_request(in_dialog(uac, "BYE")) is None
    assert uas.terminated
    late = uas.receive_request(in_dialog(uac, "INFO"))
    assert late is not None and late.status == 481
    with pytest.raises(DialogError):
        uas.create_request("INFO", via=VIA)


# --- responses (§12.1.2, §12.2.1.2, §12.3, §15) ----------------------------------------------


def test_early_dialog_confirmed_by_2xx_recomputes_the_route_set() -> None:
    req = invite(record_route=["<sip:p1.example.com;lr>"])
    ringing = answer(req, 180)
    dialog = Dialog.as_uac(req, ringing)
    assert dialog.state is DialogState.EARLY
    ok = make_response(
        req,
        200,
        to_tag="bob-tag",
        headers=[
            ("Record-Route", "<sip:p1.example.com;lr>, <sip:p9.example.com;lr>"),
            ("Contact", "<sip:bob@198.51.100.21>"),
        ],
    )
    dialog.receive_response("INVITE", wire_response(ok))
    assert dialog.state.name == "CONFIRMED"
    assert [str(r.uri) for r in dialog.route_set] == [
        "sip:p9.example.com;lr",
        "sip:p1.example.com;lr",
    ]
    assert str(dialog.remote_target) == "sip:bob@198.51.100.21"


def test_early_dialog_ends_with_a_failure() -> None:
    req = invite()
    dialog = Dialog.as_uac(req, answer(req, 183))
    dialog.receive_response("INVITE", answer(req, 486))
    assert dialog.terminated


def test_response_of_another_dialog_is_refused() -> None:
    req = invite()
    dialog = Dialog.as_uac(req, answer(req, 180))
    with pytest.raises(DialogError):
        dialog.receive_response("INVITE", answer(req, 200, to_tag="other-fork"))
    dialog.receive_response("INVITE", answer(req, 100, to_tag=None))  # no tag, nothing to do
    assert dialog.state is DialogState.EARLY


def test_2xx_to_a_reinvite_refreshes_the_target_and_failure_keeps_the_dialog() -> None:
    uac, _, _ = pair()
    reinvite = uac.create_request("INVITE", via=VIA)
    uac.receive_response("INVITE", answer(reinvite, 200, contact="<sip:bob@203.0.113.5>"))
    assert str(uac.remote_target) == "sip:bob@203.0.113.5"
    uac.receive_response("INVITE", answer(reinvite, 488))
    assert uac.state is DialogState.CONFIRMED


@pytest.mark.parametrize("status", [408, 481])
def test_408_and_481_end_the_dialog(status: int) -> None:
    uac, _, _ = pair()
    info = uac.create_request("INFO", via=VIA)
    uac.receive_response("INFO", answer(info, status))
    assert uac.terminated


@pytest.mark.parametrize("status", [200, 404, 500])
def test_any_final_answer_to_bye_ends_the_dialog(status: int) -> None:
    uac, _, _ = pair()
    bye = uac.create_bye(via=VIA)
    assert not uac.terminated  # not before the answer
    uac.receive_response("BYE", answer(bye, status))
    assert uac.terminated


def test_uas_early_dialog_follows_its_own_final_response() -> None:
    req = invite()
    dialog = Dialog.as_uas(req, answer(req, 180))
    dialog.sent_response("INVITE", answer(req, 200))
    assert dialog.state is DialogState.CONFIRMED
    other = Dialog.as_uas(req, answer(req, 180))
    other.sent_response("INVITE", answer(req, 603))
    assert other.terminated
    dialog.sent_response("INVITE", answer(req, 500))  # a confirmed dialog is not undone
    assert dialog.state is DialogState.CONFIRMED


def test_response_in_dialog_carries_our_tag_and_contact() -> None:
    uac, uas, _ = pair()
    reinvite = in_dialog(uac, "INVITE")
    ok = wire_response(response_in_dialog(uas, reinvite, 200))
    assert ok.to_tag == "bob-tag"
    assert [str(c.uri) for c in ok.contacts] == ["sip:bob@198.51.100.20:5070"]
    info_ok = response_in_dialog(uas, in_dialog(uac, "INFO"), 200)
    assert info_ok.contacts == []


def test_a_whole_call_through_two_proxies() -> None:
    """INVITE/200/ACK, a re-INVITE from the callee, BYE from the caller."""
    uac, uas, req = pair()
    ack = wire_request(uac.create_ack(via=VIA, invite=req))
    assert uas.receive_request(ack) is None
    # The callee's re-INVITE travels the route set the other way round.
    reinvite = wire_request(uas.create_request("INVITE", via=VIA))
    assert reinvite.headers.get_all("Route") == PROXIES
    assert reinvite.uri == "sip:alice@192.0.2.10:5060"
    assert uac.receive_request(reinvite) is None
    ok = wire_response(response_in_dialog(uac, reinvite, 200))
    uas.receive_response("INVITE", ok)
    assert str(uas.remote_target) == "sip:alice@192.0.2.10:5060"
    bye = wire_request(uac.create_bye(via=VIA))
    assert bye.cseq.seq == 2
    assert uas.receive_request(bye) is None and uas.terminated
    uac.receive_response("BYE", wire_response(response_in_dialog(uas, bye, 200)))
    assert uac.terminated


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 2**31 - 1), min_size=1, max_size=20))
def test_remote_cseq_accepts_exactly_the_non_decreasing_numbers(numbers: list[int]) -> None:
    uac, uas, _ = pair()
    highest = 1
    for seq in numbers:
        refusal = uas.receive_request(in_dialog(uac, "INFO", seq))
        if seq < highest:
            assert refusal is not None and refusal.status == 500
        else:
            assert refusal is None
            highest = seq
        assert uas.remote_cseq == highest


hosts = st.from_regex(r"[a-z]{1,8}\.example\.com", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(hosts, st.booleans()), max_size=5))
def test_route_set_round_trips_through_request_uri_and_route(
    routes: list[tuple[str, bool]],
) -> None:
    record_route = [f"<sip:{host}{';lr' if lr else ''}>" for host, lr in routes]
    _, uas, _ = pair(record_route=record_route)
    request = wire_request(uas.create_request("INFO", via=VIA))
    got_routes = [str(parse_address_untrusted(v).uri) for v in request.headers.values("Route")]
    wanted = [str(a.uri) for a in uas.route_set]
    target = str(uas.remote_target)
    if not routes or routes[0][1]:
        assert request.uri == target and got_routes == wanted
    else:
        assert [request.uri, *got_routes[:-1]] == wanted
        assert got_routes[-1] == target
    assert isinstance(uas.next_hop, SipUri)
