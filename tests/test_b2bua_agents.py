"""Our own softphone (phoneagent) against the office's back-to-back user agent: it registers
with the real registrar, answers the INVITE's 407, and in a call inside the office its audio
goes phone to phone (each hears the other's tone) while the remote host only signals (F5)."""

from __future__ import annotations

from pathlib import Path

import trio

from phoneagent.phone import Call, CallFailedError, Phone, open_phone
from phoneagent.tone import dominant_frequency
from tests.callhelpers import LossyLink, Office, open_office, open_two_offices

GUARD = 30.0


async def _answer_next(
    phone: Phone, calls: list[Call], tone: float | None = None, record: Path | None = None
) -> None:
    call = await phone.next_call()
    await call.ring()
    await call.answer(tone=tone, record=record)
    calls.append(call)


def _server(office: Office) -> str:
    return f"{office.address[0]}:{office.address[1]}"


async def test_agents_call_inside_the_office_and_hear_each_other(tmp_path: Path) -> None:
    heard_by_a, heard_by_b = tmp_path / "a.wav", tmp_path / "b.wav"
    async with open_office(tmp_path) as office:
        with trio.fail_after(GUARD):
            async with (
                open_phone(ext="201", password="secret-201", server=_server(office)) as a,
                open_phone(ext="202", password="secret-202", server=_server(office)) as b,
                trio.open_nursery() as nursery,
            ):
                answered: list[Call] = []
                nursery.start_soon(_answer_next, b, answered, 1000, heard_by_b)
                call = await a.call("202", tone=440, record=heard_by_a)
                await call.wait_answered()
                assert 180 in call.progress
                await trio.sleep(1.5)
                stats_a = await call.hangup()
                stats_b = await answered[0].wait_ended()
            await office.settled()
    assert dominant_frequency(heard_by_a) == 1000
    assert dominant_frequency(heard_by_b) == 440
    assert stats_a.answered and stats_b.answered
    assert stats_a.ended_by == "local" and stats_b.ended_by == "remote"
    assert office.anchor.calls == []  # phone to phone: the remote host carried no audio


async def test_an_agent_calling_an_unregistered_extension_hears_why(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office:
        with trio.fail_after(GUARD):
            async with open_phone(ext="201", password="secret-201", server=_server(office)) as a:
                call = await a.call("203")
                try:
                    await call.wait_answered()
                except CallFailedError as exc:
                    failure = exc
                else:  # pragma: no cover
                    raise AssertionError("the call was answered")
            await office.settled()
    assert failure.status == 480
    assert "203 is not registered" in failure.reason


async def test_agents_in_two_offices_call_through_the_anchors(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path, real_anchor=True) as (lyon, paris, _):
        with trio.fail_after(GUARD):
            async with (
                open_phone(ext="201", password="secret-201", server=_server(lyon)) as a,
                open_phone(ext="301", password="secret-301", server=_server(paris)) as b,
                trio.open_nursery() as nursery,
            ):
                answered: list[Call] = []
                nursery.start_soon(_answer_next, b, answered)
                call = await a.call("301", tone=440)
                await call.wait_answered()
                # The anchor's port is what the agent sends to (SDP from the remote host).
                assert call.plan is not None and call.plan.payload_type == 0
                assert lyon.media_anchor is not None
                assert lyon.media_anchor.statistics().calls == 1
                await trio.sleep(0.5)
                stats = await call.hangup()
                await answered[0].wait_ended()
            await lyon.settled()
            await paris.settled()
    assert stats.answered and stats.codec == "PCMU"


async def test_agents_hold_resume_and_dtmf_inside_the_office(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office:
        with trio.fail_after(GUARD):
            async with (
                open_phone(ext="201", password="secret-201", server=_server(office)) as a,
                open_phone(ext="202", password="secret-202", server=_server(office)) as b,
                trio.open_nursery() as nursery,
            ):
                answered: list[Call] = []
                nursery.start_soon(_answer_next, b, answered, 700)
                call = await a.call("202", tone=300)
                await call.wait_answered()
                # RFC 4733 events are RTP: they go phone to phone like the voice.
                await call.send_dtmf("42#")
                await call.hold()  # a re-INVITE with a=sendonly, through the remote host
                held = answered[0]
                assert call.plan is not None and call.plan.direction == "sendonly"
                assert held.plan is not None and held.plan.direction == "recvonly"
                await call.resume()
                assert held.plan is not None and held.plan.direction == "sendrecv"
                await trio.sleep(0.3)
                await held.hangup()  # the called phone hangs up this time
                stats = await call.wait_ended()
            await office.settled()
    assert stats.ended_by == "remote"
    assert held.stats().dtmf_received == "42#"


async def test_a_call_inside_the_office_over_a_terrible_network(tmp_path: Path) -> None:
    """Both phones' SIP crosses a link that drops, duplicates and reorders: retransmissions
    (ours of the 200, theirs of requests) carry the call through, and it ends clean."""
    async with open_office(tmp_path) as office, trio.open_nursery() as links:
        link_a = LossyLink(office.address, seed=4733)
        link_b = LossyLink(office.address, seed=3261)
        await links.start(link_a.serve)
        await links.start(link_b.serve)
        with trio.fail_after(120):
            async with (
                open_phone(ext="201", password="secret-201", server=link_a.address) as a,
                open_phone(ext="202", password="secret-202", server=link_b.address) as b,
                trio.open_nursery() as nursery,
            ):
                for _ in range(3):
                    answered: list[Call] = []
                    nursery.start_soon(_answer_next, b, answered)
                    call = await a.call("202", tone=440)
                    await call.wait_answered()
                    await trio.sleep(0.2)
                    await call.hangup()
                    await answered[0].wait_ended()
            await office.settled()
        assert link_a.dropped + link_b.dropped > 0
        links.cancel_scope.cancel()
