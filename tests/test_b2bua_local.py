"""Calls inside one office (F5, F6) through the remote host's back-to-back user agent: real SIP
over loopback UDP between scripted phones and the office's SIP service, the main host faked
(grants) or absent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trio

from remotehost.calls import CallPolicy
from shared.sip.dialog import Dialog
from shared.sip.message import SipRequest, SipResponse
from shared.wire.messages import GrantReply
from tests.callhelpers import GUARD, Outgoing, SipPhone, open_office, sdp, sdp_lines


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


async def test_local_call_granted_passes_sdp_untouched_both_ways(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        offer, answer = sdp(30000), sdp(30002)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, offer, answer)
        # Phone to phone on the LAN: both SDPs byte for byte, no anchor involved.
        assert c.invite.body == offer
        assert c.ok.body == answer
        assert sdp_lines(c.invite.body, "c=") == ["c=IN IP4 127.0.0.1"]
        assert sdp_lines(c.invite.body, "m=") == ["m=audio 30000 RTP/AVP 0 8 101"]
        assert sdp_lines(c.ok.body, "m=") == ["m=audio 30002 RTP/AVP 0 8 101"]
        assert office.anchor.calls == []
        # The callee sees the caller's extension; the call has a controller entry.
        assert c.invite.from_.uri.user == "201"  # type: ignore[union-attr]
        assert len(office.controller.calls) == 1
        with trio.fail_after(GUARD):
            await a.request_in(c.caller_dialog, "BYE")
            await b.expect_request("BYE")
            await a.expect_response(200, method="BYE")
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_bye_from_the_called_phone(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, sdp(30000), sdp(30002))
            bye = await b.request_in(c.dialog, "BYE")
            await a.expect_request("BYE")
            response = await b.expect_response(200, method="BYE")
        assert response.call_id == bye.call_id
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_refused_grant_is_403_with_the_main_hosts_reason(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        office.uplink.grant = GrantReply("x", False, "internal calls are barred tonight")
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            refused = await a.expect_response(403)
        assert refused.reason == "Forbidden (internal calls are barred tonight)"
        assert refused.headers.get("Warning") is not None
        assert "internal calls are barred tonight" in (refused.headers.get("Warning") or "")
        assert b.received("INVITE") == []
        await a.ack_failure(call, refused)
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_silent_main_host_the_office_decides_alone(tmp_path: Path) -> None:
    async with (
        open_office(tmp_path, policy=CallPolicy(grant_timeout=0.3)) as office,
        trio.open_nursery() as nursery,
    ):
        office.uplink.grant = None  # the main host never answers
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, sdp(30000), sdp(30002))
        assert c.invite.body == sdp(30000)
        await a.request_in(c.caller_dialog, "BYE")
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_trunk_down_local_calls_still_work_and_survive(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        office.uplink.online_flag = False
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, sdp(30000), sdp(30002))
        # The WAN dies again during the call: a call inside the office does not care.
        await office.controller.on_trunk_down()
        assert len(office.controller.calls) == 1
        with trio.fail_after(GUARD):
            await a.request_in(c.caller_dialog, "BYE")
            await b.expect_request("BYE")
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_cancel_gives_487_and_cancels_the_callee(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            invite = await b.expect_request("INVITE")
            await b.reply(invite, 180)
            await a.expect_response(180)
            await a.cancel(call)
            await a.expect_response(200, method="CANCEL")
            terminated = await a.expect_response(487)
            cancel = await b.expect_request("CANCEL")
            await b.reply(cancel, 200)
            response = await b.reply(invite, 487)
            await b.expect_request("ACK")  # the transaction layer ACKs the 487
        assert terminated.reason == "Request Terminated"
        assert cancel.call_id == invite.call_id
        assert response.status == 487
        await a.ack_failure(call, terminated)
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_busy_callee_486_is_passed_on(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            invite = await b.expect_request("INVITE")
            await b.reply(invite, 486)
            busy = await a.expect_response(486)
        assert busy.reason == "Busy Here"
        await a.ack_failure(call, busy)
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_no_answer_cancels_the_callee_and_tells_the_caller_480(tmp_path: Path) -> None:
    async with (
        open_office(tmp_path, policy=CallPolicy(no_answer_timeout=0.5)) as office,
        trio.open_nursery() as nursery,
    ):
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            invite = await b.expect_request("INVITE")
            await b.reply(invite, 180)
            cancel = await b.expect_request("CANCEL")
            failed = await a.expect_response(480)
            await b.reply(cancel, 200)
            await b.reply(invite, 487)
        assert failed.reason == "No answer"
        await a.ack_failure(call, failed)
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_unknown_extension_is_404(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("299", sdp(30000))
            missing = await a.expect_response(404)
        assert "299" in missing.reason
        await a.ack_failure(call, missing)
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_known_but_unregistered_extension_is_480(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("203", sdp(30000))
            away = await a.expect_response(480)
        assert away.reason == "Temporarily Unavailable (203 is not registered)"
        await a.ack_failure(call, away)
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_hold_and_resume_reinvite_passed_through(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, sdp(30000), sdp(30002))
            for offer, reply in (
                (sdp(30000, "sendonly"), sdp(30002, "recvonly")),
                (sdp(30000, "sendrecv"), sdp(30002, "sendrecv")),
            ):
                reinvite = await a.request_in(c.caller_dialog, "INVITE", offer, "application/sdp")
                passed = await b.expect_request("INVITE")
                assert passed.body == offer
                assert passed.to_tag == "callee"
                c.dialog.receive_request(passed)
                await b.answer_in(passed, 200, reply)
                answered = await a.expect_response(200, call_id=reinvite.call_id)
                assert answered.cseq.seq == reinvite.cseq.seq
                assert answered.body == reply
                await a.send(c.caller_dialog.create_ack(via=a.via(), invite=reinvite))
                await b.expect_request("ACK")
            await a.request_in(c.caller_dialog, "BYE")
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_info_is_passed_through_with_its_body(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            c = await _connect(a, b, sdp(30000), sdp(30002))
            body = b"Signal=5\r\nDuration=160\r\n"
            await a.request_in(c.caller_dialog, "INFO", body, "application/dtmf-relay")
            info = await b.expect_request("INFO")
            assert info.body == body
            assert info.content_type == "application/dtmf-relay"
            c.dialog.receive_request(info)
            await b.answer_in(info, 200)
            await a.expect_response(200, method="INFO")
            await a.request_in(c.caller_dialog, "BYE")
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_retransmitted_invite_starts_no_second_call(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            await a.send(call.invite)  # the phone did not hear the 100 Trying
            await a.send(call.invite)
            invite = await b.expect_request("INVITE")
            await trio.sleep(0.2)
        assert len(office.controller.calls) == 1
        assert b.received("INVITE") == []
        await b.reply(invite, 486)
        with trio.fail_after(GUARD):
            busy = await a.expect_response(486)
        await a.ack_failure(call, busy)
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_more_calls_than_allowed_get_503(tmp_path: Path) -> None:
    async with (
        open_office(tmp_path, policy=CallPolicy(max_calls=1)) as office,
        trio.open_nursery() as nursery,
    ):
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        c = await office.phone("203", nursery)
        with trio.fail_after(GUARD):
            first = await a.call("202", sdp(30000))
            invite = await b.expect_request("INVITE")
            second = await c.call("202", sdp(30004))
            refused = await c.expect_response(503)
        assert "at most 1 calls" in refused.reason
        await c.ack_failure(second, refused)
        await b.reply(invite, 486)
        with trio.fail_after(GUARD):
            busy = await a.expect_response(486)
        await a.ack_failure(first, busy)
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_unauthenticated_invite_is_challenged_and_never_rings(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        invite = a.make_invite("202", sdp(30000))
        await a.send(invite)
        with trio.fail_after(GUARD):
            challenge = await a.expect_response(407)
        values = challenge.headers.get_all("Proxy-Authenticate")
        assert values and all(v.startswith("Digest ") for v in values)
        await trio.sleep(0.1)
        assert b.received("INVITE") == []
        assert office.controller.calls == {}
        nursery.cancel_scope.cancel()


async def test_wrong_password_is_challenged_again(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        a.password = "not-the-password"
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            await a.call("202", sdp(30000))
            again = await a.expect_response(407)
        assert again.headers.get("Proxy-Authenticate") is not None
        assert b.received("INVITE") == []
        assert office.sip.registrar.stats.auth_failures == 1
        nursery.cancel_scope.cancel()


async def test_forking_first_answer_wins_the_other_is_cancelled(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        desk = await office.phone("202", nursery)
        soft = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            on_desk = await desk.expect_request("INVITE")
            on_soft = await soft.expect_request("INVITE")
            await desk.reply(on_desk, 180)
            await soft.reply(on_soft, 180)
            await soft.answer(on_soft, sdp(30008))
            ok = await a.answered(call)
            cancel = await desk.expect_request("CANCEL")
            await desk.reply(cancel, 200)
            await desk.reply(on_desk, 487)
        assert ok.body == sdp(30008)
        assert cancel.call_id == on_desk.call_id
        assert call.dialog is not None
        await a.request_in(call.dialog, "BYE")
        with trio.fail_after(GUARD):
            await soft.expect_request("BYE")
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_a_password_guesser_is_blocked_for_invites_too(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        a.password = "guess"
        b = await office.phone("202", nursery)
        limit = office.sip.registrar.policy.failures_before_block
        with trio.fail_after(GUARD):
            for _ in range(limit):
                await a.call("202", sdp(30000))
                await a.expect_response(407)
        assert office.sip.registrar.blocked("127.0.0.1", office.sip._wall())
        # Blocked: the right password now gets no answer at all, and nothing rings.
        a.password = "secret-201"
        a.inbox.clear()
        await a.send(a.make_invite("202", sdp(30000)))
        await trio.sleep(0.2)
        assert a.inbox == []
        assert b.received("INVITE") == []
        assert office.sip.stats.blocked_drops >= 1
        nursery.cancel_scope.cancel()


async def test_early_media_183_and_hold_from_the_called_phone(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            invite = await b.expect_request("INVITE")
            await b.reply(invite, 183, sdp(30002))
            early = await a.expect_response(183)
            assert early.body == sdp(30002)  # early media SDP, phone to phone, untouched
            dialog = await b.answer(invite, sdp(30002))
            await a.answered(call)
            assert call.dialog is not None
            # Now the called phone puts the caller on hold.
            reinvite = await b.request_in(
                dialog, "INVITE", sdp(30002, "sendonly"), "application/sdp"
            )
            passed = await a.expect_request("INVITE")
            assert passed.body == sdp(30002, "sendonly")
            call.dialog.receive_request(passed)
            await a.answer_in(passed, 200, sdp(30000, "recvonly"))
            answered = await b.expect_response(200, call_id=reinvite.call_id)
            assert answered.body == sdp(30000, "recvonly")
            await b.send(dialog.create_ack(via=b.via(), invite=reinvite))
            await a.expect_request("ACK")
            await b.request_in(dialog, "BYE")
            await a.expect_request("BYE")
        await office.settled()
        nursery.cancel_scope.cancel()
