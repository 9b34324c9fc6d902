"""Calls between offices (F3) through two remote hosts' back-to-back user agents and the main
host's real CallRouter: SIP phones on loopback UDP at both ends, the trunk faked by in-process
queues, the media anchor faked (what it is told is recorded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trio

from remotehost.calls import CallPolicy
from shared.sip.dialog import Dialog
from shared.sip.message import SipRequest, SipResponse
from shared.wire.messages import CallEnd, CallHold, CallInfo, CallSetup, MediaLeg
from tests.callhelpers import (
    GUARD,
    Office,
    Outgoing,
    SipPhone,
    open_two_offices,
    sdp,
    sdp_lines,
    wait_until,
)


@dataclass
class Connected:
    call: Outgoing
    invite: SipRequest  # as the called phone got it
    dialog: Dialog  # the called phone's
    ok: SipResponse  # as the caller got it

    @property
    def caller_dialog(self) -> Dialog:
        assert self.call.dialog is not None
        return self.call.dialog


async def _connect(caller: SipPhone, callee: SipPhone, offer: bytes, answer: bytes) -> Connected:
    call = await caller.call(callee.ext, offer)
    invite = await callee.expect_request("INVITE")
    await callee.reply(invite, 180)
    await caller.expect_response(180)
    dialog = await callee.answer(invite, answer)
    ok = await caller.answered(call)
    return Connected(call, invite, dialog, ok)


async def _settled(*offices: Office) -> None:
    for office in offices:
        await office.settled()


async def test_call_to_another_office_anchored_at_both_ends(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, main), trio.open_nursery() as nursery:
        a = await lyon.phone("201", nursery)
        b = await paris.phone("301", nursery)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, sdp(30000), sdp(30010))
        # Lyon sent a CallSetup with the caller's codecs on an odd channel of its own.
        setups = [(ch, m) for ch, m in lyon.uplink.sent if isinstance(m, CallSetup)]
        assert len(setups) == 1
        channel, setup = setups[0]
        assert channel % 2 == 1
        assert (setup.caller, setup.callee) == ("201", "301")
        assert setup.codecs == ["PCMU/8000", "PCMA/8000"]
        # The called phone got an offer pointing at Paris' anchor, with those codecs.
        (paris_media,) = paris.anchor.calls
        assert sdp_lines(c.invite.body, "c=") == ["c=IN IP4 127.0.0.1"]
        assert sdp_lines(c.invite.body, "m=") == [
            f"m=audio {paris_media.local_port} RTP/AVP 0 8 101"
        ]
        assert paris_media.phone_target == ("127.0.0.1", 30010)
        # The caller got an answer pointing at Lyon's anchor, with the answered codec.
        (lyon_media,) = lyon.anchor.calls
        assert sdp_lines(c.ok.body, "c=") == ["c=IN IP4 127.0.0.1"]
        assert sdp_lines(c.ok.body, "m=") == [f"m=audio {lyon_media.local_port} RTP/AVP 0 101"]
        assert lyon_media.phone_target == ("127.0.0.1", 30000)
        # MediaLeg wired each anchor to the relay with the login's media key.
        legs = {office: m.leg for office, _, m in main.delivered if isinstance(m, MediaLeg)}
        assert lyon_media.wan == (legs["lyon"], ("127.0.0.9", 5090), b"k" * 32)
        assert paris_media.wan == (legs["paris"], ("127.0.0.9", 5090), b"k" * 32)
        assert lyon_media.call_id == paris_media.call_id == setup.call_id
        with trio.fail_after(GUARD):
            await a.request_in(c.caller_dialog, "BYE")
            await a.expect_response(200, method="BYE")
            bye = await b.expect_request("BYE")
            c.dialog.receive_request(bye)
            await b.answer_in(bye)
        ends = [m for _, _, m in main.delivered if isinstance(m, CallEnd)]
        assert [(e.status, e.call_id) for e in ends] == [(0, setup.call_id)]
        await _settled(lyon, paris)
        assert main.router.live_calls() == []
        nursery.cancel_scope.cancel()


async def test_the_called_office_hangs_up(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, _), trio.open_nursery() as nursery:
        a = await lyon.phone("201", nursery)
        b = await paris.phone("301", nursery)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, sdp(30000), sdp(30010))
            await b.request_in(c.dialog, "BYE")
            await b.expect_response(200, method="BYE")
            bye = await a.expect_request("BYE")
        assert bye.call_id == c.call.invite.call_id
        await _settled(lyon, paris)
        nursery.cancel_scope.cancel()


async def test_a_call_from_another_office_the_other_way(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, _), trio.open_nursery() as nursery:
        a = await paris.phone("302", nursery)
        b = await lyon.phone("204", nursery)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, sdp(30020), sdp(30022))
        (lyon_media,) = lyon.anchor.calls
        (paris_media,) = paris.anchor.calls
        assert sdp_lines(c.invite.body, "m=") == [
            f"m=audio {lyon_media.local_port} RTP/AVP 0 8 101"
        ]
        assert sdp_lines(c.ok.body, "m=") == [f"m=audio {paris_media.local_port} RTP/AVP 0 101"]
        assert c.invite.from_.uri.user == "302"  # type: ignore[union-attr]
        with trio.fail_after(GUARD):
            await b.request_in(c.dialog, "BYE")
            await a.expect_request("BYE")
        await _settled(lyon, paris)
        nursery.cancel_scope.cancel()


async def test_busy_in_the_other_office(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, _), trio.open_nursery() as nursery:
        a = await lyon.phone("201", nursery)
        b = await paris.phone("301", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("301", sdp(30000))
            invite = await b.expect_request("INVITE")
            await b.reply(invite, 486)
            busy = await a.expect_response(486)
        assert busy.reason == "Busy Here"
        await a.ack_failure(call, busy)
        await _settled(lyon, paris)
        nursery.cancel_scope.cancel()


async def test_cancel_reaches_the_phone_in_the_other_office(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, _), trio.open_nursery() as nursery:
        a = await lyon.phone("201", nursery)
        b = await paris.phone("301", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("301", sdp(30000))
            invite = await b.expect_request("INVITE")
            await b.reply(invite, 180)
            await a.expect_response(180)
            await a.cancel(call)
            terminated = await a.expect_response(487)
            cancel = await b.expect_request("CANCEL")
            await b.reply(cancel, 200)
            await b.reply(invite, 487)
        await a.ack_failure(call, terminated)
        await _settled(lyon, paris)
        nursery.cancel_scope.cancel()


async def test_unknown_number_in_another_office_is_404_with_the_main_hosts_reason(
    tmp_path: Path,
) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, _), trio.open_nursery() as nursery:
        a = await lyon.phone("201", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("399", sdp(30000))
            missing = await a.expect_response(404)
        assert missing.reason == "Not Found (399 is not a phone)"
        assert "399 is not a phone" in (missing.headers.get("Warning") or "")
        await a.ack_failure(call, missing)
        await _settled(lyon, paris)
        nursery.cancel_scope.cancel()


async def test_the_other_office_offline_is_480(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, _), trio.open_nursery() as nursery:
        paris.uplink.online_flag = False
        a = await lyon.phone("201", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("301", sdp(30000))
            away = await a.expect_response(480)
        assert away.reason == "Temporarily Unavailable (office paris is offline right now)"
        await a.ack_failure(call, away)
        await _settled(lyon, paris)
        nursery.cancel_scope.cancel()


async def test_trunk_down_fails_ringing_calls_at_once_and_keeps_answered_ones(
    tmp_path: Path,
) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, _), trio.open_nursery() as nursery:
        a = await lyon.phone("201", nursery)
        b = await paris.phone("301", nursery)
        c2 = await lyon.phone("202", nursery)
        d = await paris.phone("302", nursery)
        with trio.fail_after(GUARD):
            answered = await _connect(a, b, sdp(30000), sdp(30010))
            ringing = await c2.call("302", sdp(30004))
            invite = await d.expect_request("INVITE")
            await d.reply(invite, 180)
            await c2.expect_response(180)
        await lyon.uplink.go_down()
        with trio.fail_after(GUARD):
            failed = await c2.expect_response(503)
        assert failed.reason == "Service Unavailable (main host unreachable)"
        await c2.ack_failure(ringing, failed)
        # The answered call waits for the trunk; a new login's key reaches its anchor call.
        await wait_until(lambda: len(lyon.controller.calls) == 1)
        (media,) = lyon.anchor.open
        await lyon.uplink.come_back(b"n" * 32)
        assert media.keys == [b"n" * 32]
        with trio.fail_after(GUARD):
            await a.request_in(answered.caller_dialog, "BYE")
            await b.expect_request("BYE")
        await lyon.settled()
        nursery.cancel_scope.cancel()


async def test_trunk_down_a_call_to_another_office_is_503(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, _, _), trio.open_nursery() as nursery:
        lyon.uplink.online_flag = False
        a = await lyon.phone("201", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("301", sdp(30000))
            failed = await a.expect_response(503)
        assert failed.reason == "Service Unavailable (main host unreachable)"
        assert lyon.anchor.calls == []
        await a.ack_failure(call, failed)
        await lyon.settled()
        nursery.cancel_scope.cancel()


async def test_hold_and_resume_across_offices(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, main), trio.open_nursery() as nursery:
        a = await lyon.phone("201", nursery)
        b = await paris.phone("301", nursery)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, sdp(30000), sdp(30010))
        (lyon_media,) = lyon.anchor.calls
        (paris_media,) = paris.anchor.calls
        for direction, answered, passed_on, on_hold in (
            ("sendonly", "recvonly", "sendonly", True),
            ("sendrecv", "sendrecv", "sendrecv", False),
        ):
            with trio.fail_after(GUARD):
                reinvite = await a.request_in(
                    c.caller_dialog, "INVITE", sdp(30000, direction), "application/sdp"
                )
                ok = await a.expect_response(200, call_id=reinvite.call_id)
                await a.send(c.caller_dialog.create_ack(via=a.via(), invite=reinvite))
                # Lyon answers from its anchor; Paris puts its phone on hold with an offer.
                assert sdp_lines(ok.body, "m=") == [
                    f"m=audio {lyon_media.local_port} RTP/AVP 0 101"
                ]
                assert sdp_lines(ok.body, "a=" + answered) == ["a=" + answered]
                held = await b.expect_request("INVITE")
                assert sdp_lines(held.body, "a=" + passed_on) == ["a=" + passed_on]
                # RFC 3264 §8: the same o= line as before toward each phone, version + 1.
                for before, now in ((c.ok.body, ok.body), (c.invite.body, held.body)):
                    *same, version, _, _, address = sdp_lines(before, "o=")[0].split()
                    *same_now, version_now, _, _, address_now = sdp_lines(now, "o=")[0].split()
                    assert same == same_now and address == address_now
                    assert int(version_now) == int(version) + (1 if on_hold else 2)
                assert sdp_lines(held.body, "m=")[0].startswith(
                    f"m=audio {paris_media.local_port} "
                )
                c.dialog.receive_request(held)
                reply = "recvonly" if on_hold else "sendrecv"
                await b.answer_in(held, 200, sdp(30010, reply))
                await b.expect_request("ACK")
            holds = [m for _, _, m in main.delivered if isinstance(m, CallHold)]
            assert holds[-1].on_hold is on_hold
        with trio.fail_after(GUARD):
            await a.request_in(c.caller_dialog, "BYE")
            await b.expect_request("BYE")
        await _settled(lyon, paris)
        nursery.cancel_scope.cancel()


async def test_no_answer_in_the_other_office(tmp_path: Path) -> None:
    policy = CallPolicy(no_answer_timeout=0.5)
    async with (
        open_two_offices(tmp_path, policy) as (lyon, paris, _),
        trio.open_nursery() as nursery,
    ):
        a = await lyon.phone("201", nursery)
        b = await paris.phone("301", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("301", sdp(30000))
            invite = await b.expect_request("INVITE")
            await b.reply(invite, 180)
            failed = await a.expect_response(480)
            cancel = await b.expect_request("CANCEL")
            await b.reply(cancel, 200)
            await b.reply(invite, 487)
        assert "No answer" in failed.reason
        await a.ack_failure(call, failed)
        await _settled(lyon, paris)
        nursery.cancel_scope.cancel()


async def test_main_host_call_setup_for_an_unregistered_phone_ends_480(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, main), trio.open_nursery() as nursery:
        a = await lyon.phone("201", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("302", sdp(30000))
            away = await a.expect_response(480)
        assert away.reason == "Temporarily Unavailable (302 is not registered)"
        assert paris.anchor.calls == []  # nothing to anchor for a phone that is not there
        await a.ack_failure(call, away)
        await _settled(lyon, paris)
        assert main.router.live_calls() == []
        nursery.cancel_scope.cancel()


async def test_info_travels_to_the_phone_in_the_other_office(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, main), trio.open_nursery() as nursery:
        a = await lyon.phone("201", nursery)
        b = await paris.phone("301", nursery)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, sdp(30000), sdp(30010))
            body = b"Signal=#\r\nDuration=100\r\n"
            await a.request_in(c.caller_dialog, "INFO", body, "application/dtmf-relay")
            await a.expect_response(200, method="INFO")
            info = await b.expect_request("INFO")
            c.dialog.receive_request(info)
            await b.answer_in(info, 200)
        assert info.body == body
        assert info.content_type == "application/dtmf-relay"
        infos = [m for _, _, m in main.delivered if isinstance(m, CallInfo)]
        assert [(i.method, i.body) for i in infos] == [("INFO", body)]
        with trio.fail_after(GUARD):
            await a.request_in(c.caller_dialog, "BYE")
            await b.expect_request("BYE")
        await _settled(lyon, paris)
        nursery.cancel_scope.cancel()


async def test_a_full_wan_is_503_with_the_main_hosts_reason_in_a_warning(tmp_path: Path) -> None:
    async with open_two_offices(tmp_path) as (lyon, paris, main), trio.open_nursery() as nursery:
        main.router.set_budget("lyon", 10)  # F7: not even one call fits
        a = await lyon.phone("201", nursery)
        b = await paris.phone("301", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("301", sdp(30000))
            full = await a.expect_response(503)
        assert full.reason.startswith("Service Unavailable (office lyon's WAN is full")
        warning = full.headers.get("Warning") or ""
        assert warning.startswith("399 ") and "office lyon's WAN is full" in warning
        assert b.received("INVITE") == []
        await a.ack_failure(call, full)
        await _settled(lyon, paris)
        nursery.cancel_scope.cancel()
