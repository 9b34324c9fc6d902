"""Phone agents on loopback: real SIP over UDP, real RTP, real audio, many agents per process.

Every wait has a `trio.fail_after` hang guard; nothing asserts on timing. Calls talk for a
second or two of real time because audio is paced by the clock.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from phoneagent.audio import ToneSource, WavRecorder
from phoneagent.media import open_media_stream
from phoneagent.negotiation import MediaPlan
from phoneagent.phone import Call, CallFailedError, Phone, PhoneError, open_phone, parse_server
from phoneagent.tone import dominant_frequency
from shared.sip.message import SipResponse, parse_message_untrusted

GUARD = 30.0


async def answer_next(phone: Phone, **media: object) -> Call:
    call = await phone.next_call()
    await call.ring()
    await call.answer(**media)  # type: ignore[arg-type]
    return call


async def test_two_agents_hear_each_others_tone(tmp_path: Path) -> None:
    heard_by_a, heard_by_b = tmp_path / "a.wav", tmp_path / "b.wav"
    with trio.fail_after(GUARD):
        async with open_phone(ext="2001") as a, open_phone(ext="2002") as b:
            async with trio.open_nursery() as nursery:
                callee: list[Call] = []

                async def take() -> None:
                    callee.append(await answer_next(b, tone=1000, record=heard_by_b))

                nursery.start_soon(take)
                call = await a.call(b.uri, tone=440, record=heard_by_a)
                await call.wait_answered()
                assert 180 in call.progress
                await trio.sleep(2.0)
                stats_a = await call.hangup()
            stats_b = await callee[0].wait_ended()
    assert dominant_frequency(heard_by_a) == 1000
    assert dominant_frequency(heard_by_b) == 440
    for stats, other in ((stats_a, stats_b), (stats_b, stats_a)):
        assert stats.answered and stats.codec == "PCMU"
        assert stats.packets_received > 50
        assert stats.packets_lost <= stats.packets_received // 100  # < 1 %
        assert stats.packets_received <= other.packets_sent
    assert stats_a.ended_by == "local" and stats_b.ended_by == "remote"
    assert stats_a.duration > 0


async def test_dtmf_digits_arrive_exactly() -> None:
    with trio.fail_after(GUARD):
        async with open_phone(ext="2001") as a, open_phone(ext="2002") as b:
            async with trio.open_nursery() as nursery:
                callee: list[Call] = []

                async def take() -> None:
                    call = await answer_next(b)
                    callee.append(call)
                    await call.send_dtmf("#0*")

                nursery.start_soon(take)
                call = await a.call(b.uri, tone=500)
                await call.wait_answered()
                await call.send_dtmf("1234567890*#ABCD")
                await trio.sleep(0.5)
                stats = await call.hangup()
            other = await callee[0].wait_ended()
    assert other.dtmf_received == "1234567890*#ABCD"
    assert stats.dtmf_received == "#0*"
    assert stats.dtmf_sent == "1234567890*#ABCD"


async def test_hold_stops_audio_both_ways_and_resume_restarts_it() -> None:
    with trio.fail_after(GUARD):
        async with (
            open_phone(ext="2001") as a,
            open_phone(ext="2002") as b,
            trio.open_nursery() as nursery,
        ):
            callee: list[Call] = []

            async def take() -> None:
                callee.append(await answer_next(b, tone=700))

            nursery.start_soon(take)
            call = await a.call(b.uri, tone=300)
            await call.wait_answered()
            await trio.sleep(0.3)
            await call.hold()
            held = callee[0]
            assert call.plan is not None and call.plan.direction == "sendonly"
            assert held.plan is not None and held.plan.direction == "recvonly"
            assert held.remote_hold and call.local_hold
            await trio.sleep(0.2)  # packets in flight land
            sent_a, sent_b = call.stats().packets_sent, held.stats().packets_sent
            got_a, got_b = call.stats().packets_received, held.stats().packets_received
            await trio.sleep(0.5)
            assert call.stats().packets_sent == sent_a  # nothing sent while held
            assert held.stats().packets_sent == sent_b
            assert call.stats().packets_received == got_a
            assert held.stats().packets_received == got_b
            await call.resume()
            assert call.plan is not None and call.plan.direction == "sendrecv"
            assert held.plan is not None and held.plan.direction == "sendrecv"
            assert not held.remote_hold and not call.local_hold
            await trio.sleep(0.5)
            assert call.stats().packets_sent > sent_a
            assert held.stats().packets_received > got_b
            await call.hangup()


async def test_busy_callee_gives_486() -> None:
    with trio.fail_after(GUARD):
        async with (
            open_phone(ext="2001") as a,
            open_phone(ext="2002") as b,
            trio.open_nursery() as nursery,
        ):

            async def refuse() -> None:
                await (await b.next_call()).reject(486)

            nursery.start_soon(refuse)
            call = await a.call(b.uri)
            with pytest.raises(CallFailedError) as failure:
                await call.wait_answered()
    assert failure.value.status == 486
    assert str(failure.value) == "486 Busy Here"
    assert call.stats().status == 486 and not call.stats().answered


async def test_cancel_before_answer_gives_487_on_both_sides() -> None:
    with trio.fail_after(GUARD):
        async with open_phone(ext="2001") as a, open_phone(ext="2002") as b:
            call = await a.call(b.uri)
            incoming = await b.next_call()
            await incoming.ring()
            await call.wait_ringing()
            assert call.progress == [180]
            stats = await call.hangup()
            await incoming.wait_ended()
    assert stats.status == 487 and not stats.answered
    assert incoming.stats().status == 487
    with pytest.raises(CallFailedError):
        await call.wait_answered()


async def test_message_is_shown_in_the_api_and_the_call_stats() -> None:
    with trio.fail_after(GUARD):
        async with open_phone(ext="2001") as a, open_phone(ext="2002") as b:
            async with trio.open_nursery() as nursery:
                callee: list[Call] = []

                async def take() -> None:
                    callee.append(await answer_next(b))

                nursery.start_soon(take)
                call = await a.call(b.uri)
                await call.wait_answered()
            assert await b.send_text(a.uri, "meeting moved to 3pm") == 200
            messages = await a.wait_message()
            stats = await call.hangup()
    assert [(m.sender, m.text) for m in messages] == [
        (b.uri.split(":")[0] + ":2002@127.0.0.1", "meeting moved to 3pm")
    ]
    assert stats.messages == ["meeting moved to 3pm"]


async def test_options_is_answered_200() -> None:
    with trio.fail_after(GUARD):
        async with open_phone(ext="2001") as a:
            sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            request = (
                f"OPTIONS {a.uri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKopt1;rport\r\n"
                "Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=x\r\n"
                f"To: <{a.uri}>\r\nCall-ID: opt1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            )
            await sock.sendto(request.encode(), ("127.0.0.1", a.port))
            data, _ = await sock.recvfrom(65536)
            sock.close()
    response = parse_message_untrusted(data)
    assert isinstance(response, SipResponse) and response.status == 200
    assert "INVITE" in (response.headers.get("Allow") or "")


async def test_many_agents_in_one_process_call_in_pairs(tmp_path: Path) -> None:
    tones = [400, 600, 800, 1000, 1200, 1400]
    with trio.fail_after(GUARD):
        async with (
            open_phone(ext="3000") as p0,
            open_phone(ext="3001") as p1,
            open_phone(ext="3002") as p2,
            open_phone(ext="3003") as p3,
            open_phone(ext="3004") as p4,
            open_phone(ext="3005") as p5,
        ):
            phones = [p0, p1, p2, p3, p4, p5]
            async with trio.open_nursery() as nursery:
                for index in (1, 3, 5):

                    async def take(index: int = index) -> None:
                        call = await answer_next(
                            phones[index],
                            tone=tones[index],
                            record=tmp_path / f"{index}.wav",
                        )
                        await call.wait_ended()

                    nursery.start_soon(take)
                calls = [
                    await phones[i].call(
                        phones[i + 1].uri, tone=tones[i], record=tmp_path / f"{i}.wav"
                    )
                    for i in (0, 2, 4)
                ]
                for call in calls:
                    await call.wait_answered()
                await trio.sleep(1.5)
                for call in calls:
                    await call.hangup()
    for i in (0, 2, 4):
        assert dominant_frequency(tmp_path / f"{i}.wav") == tones[i + 1]
        assert dominant_frequency(tmp_path / f"{i + 1}.wav") == tones[i]


async def test_operator_mistakes_are_phone_errors() -> None:
    with pytest.raises(PhoneError, match="bad server"):
        parse_server("not a host!")
    with pytest.raises(PhoneError, match="IP address"):
        parse_server("pbx.example.com")
    assert parse_server("127.0.0.1") == ("127.0.0.1", 5060)
    assert parse_server("127.0.0.1:5070") == ("127.0.0.1", 5070)
    with trio.fail_after(GUARD):
        async with open_phone(ext="2001") as a:
            with pytest.raises(PhoneError, match="needs a server"):
                await a.call("2002")
            with pytest.raises(PhoneError, match="no server"):
                await a.register()
            with pytest.raises(PhoneError):
                await a.call(a.uri, tone=440, play="x.wav")


async def test_unreachable_server_fails_registration_with_a_clear_error() -> None:
    silent = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    with trio.fail_after(GUARD), pytest.raises(PhoneError, match=r"no answer from 127\.0\.0\.1"):
        async with open_phone(ext="2001", server=f"127.0.0.1:{port}", register_timeout=1.0):
            pass
    silent.close()


# --- a terrible network between two media streams ------------------------------------------


class LossyProxy:
    """Forwards RTP between two endpoints with seeded drop, duplication, reordering, delay."""

    def __init__(
        self, seed: int, *, drop: float = 0.05, dup: float = 0.05, reorder: float = 0.1
    ) -> None:
        self.rng = random.Random(seed)
        self.drop, self.dup, self.reorder = drop, dup, reorder
        self.dropped = {"ab": 0, "ba": 0}
        self.duplicated = {"ab": 0, "ba": 0}
        self.running = True

    async def relay(
        self,
        inbound: trio.socket.SocketType,
        outbound: trio.socket.SocketType,
        destination: tuple[str, int],
        direction: str,
        nursery: trio.Nursery,
    ) -> None:
        while True:
            data, _ = await inbound.recvfrom(2048)
            if not self.running:
                continue
            if self.rng.random() < self.drop:
                self.dropped[direction] += 1
                continue
            copies = 2 if self.rng.random() < self.dup else 1
            self.duplicated[direction] += copies - 1
            for _ in range(copies):
                delay = self.rng.uniform(0, 0.015)
                if self.rng.random() < self.reorder:
                    delay += self.rng.uniform(0.02, 0.05)  # overtaken by the next packets
                nursery.start_soon(self._later, outbound, data, destination, delay)

    async def _later(
        self, sock: trio.socket.SocketType, data: bytes, destination: tuple[str, int], delay: float
    ) -> None:
        await trio.sleep(delay)
        await sock.sendto(data, destination)


@pytest.mark.parametrize("seed", [1, 2])
async def test_audio_survives_a_terrible_network(tmp_path: Path, seed: int) -> None:
    a = await open_media_stream("127.0.0.1")
    b = await open_media_stream("127.0.0.1")
    face_a = trio.socket.socket(type=trio.socket.SOCK_DGRAM)  # A talks to this one
    face_b = trio.socket.socket(type=trio.socket.SOCK_DGRAM)  # B talks to this one
    await face_a.bind(("127.0.0.1", 0))
    await face_b.bind(("127.0.0.1", 0))
    proxy = LossyProxy(seed)
    a.source, b.source = ToneSource(500), ToneSource(1500)
    a.recorder, b.recorder = WavRecorder(tmp_path / "a.wav"), WavRecorder(tmp_path / "b.wav")
    a.configure(MediaPlan(face_a.getsockname(), 0, 101, "sendrecv"))
    b.configure(MediaPlan(face_b.getsockname(), 8, 101, "sendrecv"))
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy.relay, face_a, face_b, b.address, "ab", nursery)
            nursery.start_soon(proxy.relay, face_b, face_a, a.address, "ba", nursery)
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await trio.sleep(0.2)
            assert a.session is not None and b.session is not None
            await a.send_digits("42")
            await trio.sleep(3.0)
            a.session.sending = b.session.sending = False
            await trio.sleep(0.3)  # what is in flight lands
            nursery.cancel_scope.cancel()
    a.close()
    b.close()
    face_a.close()
    face_b.close()
    stats_a, stats_b = a.statistics(), b.statistics()
    assert stats_a is not None and stats_b is not None
    assert dominant_frequency(tmp_path / "b.wav") == 500
    assert dominant_frequency(tmp_path / "a.wav") == 1500
    assert stats_b.codec == "PCMA" and stats_a.codec == "PCMU"
    for stats, direction in ((stats_b, "ab"), (stats_a, "ba")):
        # Losses at the very start (RTP probation) or end (never expected) may go uncounted.
        assert proxy.dropped[direction] - 3 <= stats.packets_lost <= proxy.dropped[direction]
        assert stats.duplicates == proxy.duplicated[direction]
        assert stats.packets_lost > 0
        assert stats.concealed + stats.late > 0
    assert stats_b.dtmf_received == "42"


# --- the API's edges ---------------------------------------------------------------------------


async def test_leaving_open_phone_hangs_up_its_calls() -> None:
    with trio.fail_after(GUARD):
        async with open_phone(ext="2002") as b:
            async with open_phone(ext="2001") as a:
                call = await a.call(b.uri)
                incoming = await answer_next(b)
                await call.wait_answered()
            stats = await incoming.wait_ended()
    assert stats.ended_by == "remote" and stats.answered
    assert call.ended and call.stats().ended_by == "local"


async def test_misuse_is_a_phone_error() -> None:
    with trio.fail_after(GUARD):
        async with open_phone(ext="2001") as a, open_phone(ext="2002") as b:
            call = await a.call(b.uri)
            with pytest.raises(PhoneError, match="only an incoming call"):
                await call.answer()
            with pytest.raises(PhoneError, match="answered call"):
                await call.send_dtmf("1")
            with pytest.raises(PhoneError, match="not established"):
                await call.hold()
            incoming = await b.next_call()
            await incoming.answer()
            await call.wait_answered()
            with pytest.raises(PhoneError, match="not DTMF"):
                await call.send_dtmf("1x")
            with pytest.raises(PhoneError):
                await incoming.answer()  # twice
            await call.hangup()
            await incoming.wait_ended()
            with pytest.raises(PhoneError, match="not established"):
                await call.resume()
            assert (await call.hangup()).ended_by == "local"  # again: nothing more happens


async def test_callee_can_hold_the_caller() -> None:
    with trio.fail_after(GUARD):
        async with open_phone(ext="2001") as a, open_phone(ext="2002") as b:
            call = await a.call(b.uri, tone=350)
            incoming = await answer_next(b, tone=900)
            await call.wait_answered()
            await incoming.hold()
            assert call.remote_hold and incoming.local_hold
            assert call.plan is not None and call.plan.direction == "recvonly"
            await incoming.resume()
            assert not call.remote_hold
            assert call.plan is not None and call.plan.direction == "sendrecv"
            await call.hangup()


async def test_invite_without_sdp_is_refused_with_488() -> None:
    with trio.fail_after(GUARD):
        async with open_phone(ext="2002") as b:
            sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            invite = (
                f"INVITE {b.uri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKlate1;rport\r\n"
                "Max-Forwards: 70\r\nFrom: <sip:late@127.0.0.1>;tag=l1\r\n"
                f"To: <{b.uri}>\r\nCall-ID: late-offer-1\r\nCSeq: 1 INVITE\r\n"
                f"Contact: <sip:late@127.0.0.1:{port}>\r\nContent-Length: 0\r\n\r\n"
            )
            await sock.sendto(invite.encode(), ("127.0.0.1", b.port))
            incoming = await b.next_call()
            with pytest.raises(PhoneError, match="cannot answer"):
                await incoming.answer()
            statuses = []
            while 488 not in statuses:
                data, _ = await sock.recvfrom(65536)
                response = parse_message_untrusted(data)
                assert isinstance(response, SipResponse)
                statuses.append(response.status)
            sock.close()
    assert statuses[0] == 100 and statuses[-1] == 488


async def raw_invite(
    phone: Phone, sock: trio.socket.SocketType, rtp_port: int, *, call_id: str, pt: int = 8
) -> None:
    """An INVITE from a hand-made peer on `sock` offering only payload type `pt`."""
    port = sock.getsockname()[1]
    body = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {rtp_port} RTP/AVP {pt}\r\na=sendrecv\r\n"
    )
    invite = (
        f"INVITE {phone.uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:raw@127.0.0.1>;tag=r1\r\n"
        f"To: <{phone.uri}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:raw@127.0.0.1:{port}>\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    )
    await sock.sendto(invite.encode(), ("127.0.0.1", phone.port))


def raw_ack(ok: SipResponse) -> bytes:
    """The hand-made peer's ACK for the phone's 200 (RFC 3261 §13.2.2.4)."""
    contact = ok.contacts[0].uri
    via = ok.headers.get("Via") or ""
    sent_by = via.split()[1].split(";")[0]
    return (
        f"ACK {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {sent_by};branch=z9hG4bKack{ok.call_id}\r\n"
        f"Max-Forwards: 70\r\nFrom: {ok.headers.get('From')}\r\nTo: {ok.headers.get('To')}\r\n"
        f"Call-ID: {ok.call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def test_pcma_only_caller_gets_a_law_from_the_port_in_our_sdp() -> None:
    from shared.media.rtp import parse_rtp_untrusted
    from shared.media.sdp import parse_sdp_untrusted

    with trio.fail_after(GUARD):
        async with open_phone(ext="2002") as b:
            sip = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            rtp = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            await sip.bind(("127.0.0.1", 0))
            await rtp.bind(("127.0.0.1", 0))
            await raw_invite(b, sip, rtp.getsockname()[1], call_id="pcma1")
            incoming = await b.next_call()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: incoming.answer(tone=1000))
                answer = None
                while answer is None:
                    data, _ = await sip.recvfrom(65536)
                    response = parse_message_untrusted(data)
                    if isinstance(response, SipResponse) and response.status == 200:
                        answer = parse_sdp_untrusted(response.body)
                        await sip.sendto(raw_ack(response), ("127.0.0.1", b.port))
            packet, source = await rtp.recvfrom(2048)
            assert parse_rtp_untrusted(packet).payload_type == 8
            assert source[1] == answer.media[0].port  # symmetric: sent from our SDP port
            assert [c.encoding for _, c in answer.media[0].codecs()] == ["PCMA"]
            assert incoming.stats().codec == "PCMA"
            sip.close()
            rtp.close()


async def test_too_many_unanswered_calls_are_busy() -> None:
    """Nobody takes calls from the phone: after its queue (16) fills, callers get 486."""
    with trio.fail_after(GUARD):
        async with open_phone(ext="2002") as b:
            sip = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            await sip.bind(("127.0.0.1", 0))
            for n in range(17):
                await raw_invite(b, sip, 9, call_id=f"flood{n}")
            busy: list[str] = []
            while not busy:
                data, _ = await sip.recvfrom(65536)
                response = parse_message_untrusted(data)
                if isinstance(response, SipResponse) and response.status == 486:
                    busy.append(response.call_id)
            sip.close()
            waiting = [await b.next_call() for _ in range(16)]
    assert busy == ["flood16"]
    assert [call.call_id for call in waiting] == [f"flood{n}" for n in range(16)]


async def test_received_messages_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import phoneagent.phone

    monkeypatch.setattr(phoneagent.phone, "MAX_MESSAGES", 3)
    with trio.fail_after(GUARD):
        async with open_phone(ext="2001") as a, open_phone(ext="2002") as b:
            assert await a.send_text(b.uri, "before the call") == 200
            call = await a.call(b.uri)
            incoming = await answer_next(b)
            await call.wait_answered()
            for n in range(5):
                assert await a.send_text(b.uri, f"text {n}") == 200
            kept = await b.wait_message(6)
            stats = incoming.stats()
            await call.hangup()
    assert b.messages_received == 6
    assert [m.text for m in kept] == ["text 2", "text 3", "text 4"]
    assert stats.messages == ["text 2", "text 3", "text 4"]  # the call's, as far as kept
