"""The phone agent's RTP session (pure) and SDP negotiation: packets, DTMF, hold, statistics."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoneagent.negotiation import (
    MediaNegotiationError,
    MediaPlan,
    SdpSession,
    offer_is_hold,
    plan_from_answer,
)
from phoneagent.rtpsession import RtpSession
from phoneagent.tone import ToneGenerator, detect_tone, pcm_samples
from shared.media.rtp import parse_rtp_untrusted
from shared.media.sdp import parse_sdp_untrusted

PTIME = 0.02


def run_ticks(
    sender: RtpSession, receiver: RtpSession, ticks: int, pcm: bytes, *, start: float = 0.0
) -> list[bytes]:
    """Send `ticks` packets straight to `receiver`, playing one frame per tick."""
    heard = []
    for n in range(ticks):
        now = start + n * PTIME
        packet = sender.tick(pcm)
        if packet is not None:
            receiver.receive_untrusted(packet, now)
        frame = receiver.play(now)
        if frame is not None:
            heard.append(frame)
    return heard


def test_audio_packets_have_running_sequence_and_timestamp() -> None:
    session = RtpSession(payload_type=0, ssrc=1234)
    tone = ToneGenerator(440)
    packets = [parse_rtp_untrusted(session.tick(tone.frame()) or b"") for _ in range(5)]
    assert {p.ssrc for p in packets} == {1234}
    assert {p.payload_type for p in packets} == {0}
    assert [(p.sequence - packets[0].sequence) % 65536 for p in packets] == [0, 1, 2, 3, 4]
    assert [(p.timestamp - packets[0].timestamp) % 2**32 for p in packets] == [
        0,
        160,
        320,
        480,
        640,
    ]
    assert all(len(p.payload) == 160 for p in packets)


@pytest.mark.parametrize("payload_type", [0, 8])
def test_tone_survives_g711_both_laws(payload_type: int) -> None:
    sender = RtpSession(payload_type=payload_type)
    receiver = RtpSession(payload_type=payload_type)
    tone = ToneGenerator(1200)
    frames = []
    for n in range(30):
        packet = sender.tick(tone.frame())
        assert packet is not None
        receiver.receive_untrusted(packet, n * PTIME)
        frame = receiver.play(n * PTIME)
        if frame:
            frames.append(frame)
    heard = b"".join(frames)
    assert detect_tone(pcm_samples(heard), [600, 1200, 2400]) == 1200
    stats = receiver.statistics()
    assert stats.packets_received == 30 and stats.packets_lost == 0
    assert stats.codec == ("PCMA" if payload_type == 8 else "PCMU")


def test_not_sending_while_on_hold_but_the_clock_runs() -> None:
    session = RtpSession(ssrc=7)
    first = parse_rtp_untrusted(session.tick(bytes(320)) or b"")
    session.sending = False
    assert session.tick(bytes(320)) is None
    assert session.tick(bytes(320)) is None
    session.sending = True
    after = parse_rtp_untrusted(session.tick(bytes(320)) or b"")
    assert after.sequence == (first.sequence + 1) % 65536  # no sequence gap: nothing was lost
    assert (after.timestamp - first.timestamp) % 2**32 == 3 * 160  # but time went on
    assert session.packets_sent == 2


def test_dtmf_digits_arrive_exactly_once_each() -> None:
    sender = RtpSession(dtmf_payload_type=101)
    receiver = RtpSession(dtmf_payload_type=101)
    sender.send_digits("19*#AD")
    ticks = 0
    while sender.dtmf_pending:
        run_ticks(sender, receiver, 1, bytes(320), start=ticks * PTIME)
        ticks += 1
    run_ticks(sender, receiver, 10, bytes(320), start=ticks * PTIME)
    assert receiver.dtmf_received == "19*#AD"
    assert sender.dtmf_sent == "19*#AD"
    assert receiver.statistics().packets_lost == 0


def test_dtmf_with_the_end_packets_lost_still_counts_once() -> None:
    sender = RtpSession(dtmf_payload_type=101)
    receiver = RtpSession(dtmf_payload_type=101)
    sender.send_digits("55")
    now = 0.0
    while sender.dtmf_pending:
        packet = sender.tick(bytes(320))
        assert packet is not None
        parsed = parse_rtp_untrusted(packet)
        is_end = parsed.payload_type == 101 and parsed.payload[1] & 0x80
        if not is_end:
            receiver.receive_untrusted(packet, now)
        receiver.play(now)
        now += PTIME
    for _ in range(40):
        receiver.play(now)
        now += PTIME
    assert receiver.dtmf_received == "55"


def test_dtmf_needs_telephone_event_and_real_digits() -> None:
    with pytest.raises(ValueError, match="telephone-event"):
        RtpSession(dtmf_payload_type=None).send_digits("1")
    with pytest.raises(ValueError, match="not DTMF"):
        RtpSession().send_digits("12x")


def test_g729_is_not_our_codec() -> None:
    with pytest.raises(ValueError):
        RtpSession(payload_type=18)


def test_loss_duplicates_and_reordering_are_counted() -> None:
    sender = RtpSession(ssrc=99)
    receiver = RtpSession()
    packets = [sender.tick(bytes(320)) for _ in range(100)]
    rng = random.Random(4)
    kept = [p for i, p in enumerate(packets) if i % 10 != 5]  # 10 lost
    kept += kept[:5]  # 5 duplicates
    head, tail = kept[:3], kept[3:]
    rng.shuffle(tail)
    for n, packet in enumerate(head + tail):
        assert packet is not None
        receiver.receive_untrusted(packet, n * PTIME)
    stats = receiver.statistics()
    assert stats.packets_received == 95
    assert stats.duplicates == 5
    assert stats.packets_lost == 10


def test_a_new_ssrc_starts_new_statistics_but_keeps_old_losses() -> None:
    first, second = RtpSession(ssrc=1), RtpSession(ssrc=2)
    receiver = RtpSession()
    for n in range(10):
        packet = first.tick(bytes(320))
        if n != 4:
            receiver.receive_untrusted(packet or b"", n * PTIME)
    for n in range(10):
        receiver.receive_untrusted(second.tick(bytes(320)) or b"", (10 + n) * PTIME)
    assert receiver.statistics().packets_lost == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_receive_untrusted_takes_any_bytes(data: bytes) -> None:
    receiver = RtpSession()
    receiver.receive_untrusted(data, 0.0)
    receiver.play(0.0)
    receiver.statistics()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 127), st.integers(0, 65535), st.binary(max_size=200)),
        max_size=30,
    )
)
def test_any_rtp_stream_plays_without_error(packets: list[tuple[int, int, bytes]]) -> None:
    from shared.media.rtp import RtpPacket

    receiver = RtpSession(prefill=1)
    for n, (payload_type, sequence, payload) in enumerate(packets):
        data = RtpPacket(payload_type, sequence, n * 160, 5, payload).encode()
        receiver.receive_untrusted(data, n * PTIME)
        frame = receiver.play(n * PTIME)
        assert frame is None or len(frame) % 2 == 0
    receiver.drain()


# --- SDP ---------------------------------------------------------------------------------------


def test_offer_lists_pcmu_pcma_and_telephone_event() -> None:
    ours = SdpSession("127.0.0.1", 40000)
    offer = parse_sdp_untrusted(ours.offer())
    media = offer.media[0]
    assert media.port == 40000
    assert [(pt, c.encoding) for pt, c in media.codecs()] == [
        (0, "PCMU"),
        (8, "PCMA"),
        (101, "telephone-event"),
    ]
    assert offer.direction(0) == "sendrecv"
    again = parse_sdp_untrusted(ours.offer("sendonly"))
    assert again.origin.session_version == offer.origin.session_version + 1  # RFC 3264 §8
    assert again.origin.session_id == offer.origin.session_id
    assert again.direction(0) == "sendonly"


def test_answer_and_plan_both_ways() -> None:
    caller, callee = SdpSession("127.0.0.1", 40000), SdpSession("127.0.0.2", 40002)
    answer, callee_plan = callee.answer(caller.offer())
    assert callee_plan == MediaPlan(("127.0.0.1", 40000), 0, 101, "sendrecv")
    assert plan_from_answer(answer) == MediaPlan(("127.0.0.2", 40002), 0, 101, "sendrecv")


def test_pcma_only_peer_gets_pcma() -> None:
    offer = (
        b"v=0\r\no=- 1 1 IN IP4 127.0.0.9\r\ns=-\r\nc=IN IP4 127.0.0.9\r\nt=0 0\r\n"
        b"m=audio 5000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n"
    )
    _, plan = SdpSession("127.0.0.1", 4000).answer(offer)
    assert plan == MediaPlan(("127.0.0.9", 5000), 8, None, "sendrecv")


def test_hold_offer_is_answered_recvonly_and_we_stop_sending() -> None:
    holder, held = SdpSession("127.0.0.1", 40000), SdpSession("127.0.0.2", 40002)
    held.answer(holder.offer())
    hold_offer = holder.offer("sendonly")
    assert offer_is_hold(hold_offer)
    answer, plan = held.answer(hold_offer)
    assert parse_sdp_untrusted(answer).direction(0) == "recvonly"
    assert not plan.sends
    holder_plan = plan_from_answer(answer, "sendonly")
    assert holder_plan.direction == "sendonly"
    assert not offer_is_hold(holder.offer("sendrecv"))
    old_style = hold_offer.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 0.0.0.0")
    assert offer_is_hold(old_style)
    assert not offer_is_hold(b"garbage")


@pytest.mark.parametrize(
    "sdp",
    [
        b"",
        b"not sdp at all",
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\nm=video 5000 RTP/AVP 96\r\n",
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\n"
        b"m=audio 5000 RTP/AVP 18\r\n",
    ],
)
def test_unusable_offers_are_refused(sdp: bytes) -> None:
    with pytest.raises(MediaNegotiationError):
        SdpSession("127.0.0.1", 4000).answer(sdp)
    with pytest.raises(MediaNegotiationError):
        plan_from_answer(sdp)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_answering_junk_raises_only_our_error(data: bytes) -> None:
    try:
        SdpSession("127.0.0.1", 4000).answer(data)
    except MediaNegotiationError:
        pass
    try:
        plan_from_answer(data)
    except MediaNegotiationError:
        pass
