"""More of the phone agent's SDP handling and of the UA's answers to any final status."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoneagent.negotiation import MediaNegotiationError, MediaPlan, SdpSession, plan_from_answer
from phoneagent.rtpsession import RtpSession
from phoneagent.useragent import CallFailed, CallProgress, CallState
from shared.media.rtp import parse_rtp_untrusted
from shared.media.sdp import parse_sdp_untrusted
from shared.sip.message import SipRequest, make_response
from tests.phonehelpers import Network, answer_from


def sdp(*lines: str) -> bytes:
    head = ["v=0", "o=- 1 1 IN IP4 192.0.2.5", "s=-", "c=IN IP4 192.0.2.5", "t=0 0"]
    return ("\r\n".join(head + list(lines)) + "\r\n").encode()


def test_audio_after_a_video_stream_is_found() -> None:
    offer = sdp(
        "m=video 6000 RTP/AVP 96", "a=rtpmap:96 H264/90000",
        "m=audio 5004 RTP/AVP 0 97", "a=rtpmap:97 telephone-event/8000",
    )  # fmt: skip
    answer, plan = SdpSession("127.0.0.1", 4000).answer(offer)
    assert plan == MediaPlan(("192.0.2.5", 5004), 0, 97, "sendrecv")
    parsed = parse_sdp_untrusted(answer)
    assert [m.port for m in parsed.media] == [0, 4000]  # video refused, audio taken
    assert plan_from_answer(answer) == MediaPlan(("127.0.0.1", 4000), 0, 97, "sendrecv")


def test_media_level_connection_wins() -> None:
    offer = sdp("m=audio 5004 RTP/AVP 8", "c=IN IP4 198.51.100.7")
    _, plan = SdpSession("127.0.0.1", 4000).answer(offer)
    assert plan.remote == ("198.51.100.7", 5004)


def test_inactive_offer_means_no_sending() -> None:
    _, plan = SdpSession("127.0.0.1", 4000).answer(sdp("m=audio 5004 RTP/AVP 0", "a=inactive"))
    assert plan.direction == "inactive" and not plan.sends


def test_hold_address_offer_gives_no_remote() -> None:
    offer = sdp("m=audio 5004 RTP/AVP 0").replace(b"c=IN IP4 192.0.2.5", b"c=IN IP4 0.0.0.0")
    _, plan = SdpSession("127.0.0.1", 4000).answer(offer)
    assert plan.remote is None and not plan.sends


def test_answer_that_rejects_our_audio_is_an_error() -> None:
    with pytest.raises(MediaNegotiationError, match=r"no G\.711"):
        plan_from_answer(sdp("m=audio 0 RTP/AVP 0"))


def test_ipv6_session() -> None:
    ours = SdpSession("::1", 4000)
    parsed = parse_sdp_untrusted(ours.offer())
    assert parsed.origin.addrtype == "IP6"
    connection = parsed.connection_for(0)
    assert connection is not None and connection.address == "::1"
    answer, plan = SdpSession("::1", 4002).answer(ours.offer())
    assert plan.remote == ("::1", 4000)
    assert plan_from_answer(answer).remote == ("::1", 4002)


def test_dynamic_telephone_event_type_is_used_for_sending_and_receiving() -> None:
    sender, receiver = RtpSession(dtmf_payload_type=96), RtpSession(dtmf_payload_type=96)
    sender.send_digits("7")
    packets = []
    while sender.dtmf_pending:
        data = sender.tick(bytes(320))
        assert data is not None
        packets.append(parse_rtp_untrusted(data))
        receiver.receive_untrusted(data, len(packets) * 0.02)
    assert {p.payload_type for p in packets} == {96}
    assert packets[0].marker and not any(p.marker for p in packets[1:])
    assert len({p.timestamp for p in packets}) == 1  # one event, one timestamp (RFC 4733)
    assert receiver.dtmf_received == "7"


def test_a_stream_with_another_telephone_event_type_is_not_dtmf_here() -> None:
    sender, receiver = RtpSession(dtmf_payload_type=101), RtpSession(dtmf_payload_type=96)
    sender.send_digits("3")
    while sender.dtmf_pending:
        receiver.receive_untrusted(sender.tick(bytes(320)) or b"", 0.0)
    assert receiver.dtmf_received == ""


def test_play_waits_for_the_prefill_and_sequence_wraps_when_sending() -> None:
    sender, receiver = RtpSession(), RtpSession(prefill=3)
    sender._sequence = 65534
    heard = []
    for n in range(6):
        receiver.receive_untrusted(sender.tick(bytes(320)) or b"", n * 0.02)
        heard.append(receiver.play(n * 0.02))
    assert heard[:2] == [None, None]
    assert all(frame is not None for frame in heard[2:])
    assert receiver.statistics().packets_lost == 0
    assert len(receiver.drain()) == 2


# --- any final status to an INVITE -------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(101, 199), max_size=3),
    st.integers(300, 699).filter(lambda s: s not in (401, 407)),
    st.text(alphabet="abcdefgh XYZ", max_size=20),
)
def test_any_failure_status_ends_the_call_with_that_status(
    provisional: list[int], status: int, warning: str
) -> None:
    net = Network()
    node = net.add("2001", 5001, proxy=("127.0.0.1", 5060), domain="127.0.0.1")
    call_id, out = node.agent.invite("2002", b"v=0\r\n", net.now)
    net.feed(node, out)
    invite, _ = net.outside[0]
    assert isinstance(invite, SipRequest)
    for code in provisional:
        answer_from(net, node, make_response(invite, code, to_tag="t"), ("127.0.0.1", 5060))
    headers = [("Warning", f'399 pbx "{warning}"')] if warning else []
    final = make_response(invite, status, to_tag="t", headers=headers)
    answer_from(net, node, final, ("127.0.0.1", 5060))
    failures = [e for e in node.events if isinstance(e, CallFailed)]
    assert failures == [CallFailed(call_id, status, final.reason, warning or None)]
    assert [e.status for e in node.events if isinstance(e, CallProgress)] == provisional
    acks = [m for m, _ in net.outside if isinstance(m, SipRequest) and m.method == "ACK"]
    assert len(acks) == 1 and acks[0].cseq.seq == invite.cseq.seq
    assert node.agent.call_state(call_id) is CallState.ENDED
