"""The SIP legs' duties toward real phones: 2xx retransmission until ACK and a BYE when none
comes (RFC 3261 §13.3.1.4), 408 when the called phone never answers, a 2xx that races a CANCEL
(ACK then BYE), requests that belong to no call (481), what the service allows, a caller who
pretends to be someone else, an INVITE without SDP, and trunk calls through the real media
anchor."""

from __future__ import annotations

import secrets
from pathlib import Path

import trio

from shared.sip.dialog import Dialog
from shared.sip.message import Headers, SipRequest
from tests.callhelpers import GUARD, open_office, open_two_offices, sdp, sdp_lines


async def test_our_200_is_retransmitted_until_the_caller_acks_it(tmp_path: Path) -> None:
    async with (
        open_office(tmp_path, fast_timers=True) as office,
        trio.open_nursery() as nursery,
    ):
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            invite = await b.expect_request("INVITE")
            await b.reply(invite, 200, sdp(30002))
            first = await a.expect_response(200)
            again = await a.expect_response(200)  # no ACK yet: the same 200 again
            assert again.encode() == first.encode()
            dialog = Dialog.as_uac(call.invite, first)
            await a.send(dialog.create_ack(via=a.via()))
            await b.expect_request("ACK")
            await trio.sleep(0.3)  # several T1: nothing more once ACKed
            a.inbox.clear()
            await trio.sleep(0.3)
        assert [m for m in a.inbox if getattr(m, "status", None) == 200] == []
        await a.request_in(dialog, "BYE")
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_no_ack_for_our_200_ends_the_call_with_bye_on_both_sides(tmp_path: Path) -> None:
    async with (
        open_office(tmp_path, fast_timers=True) as office,
        trio.open_nursery() as nursery,
    ):
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            await a.call("202", sdp(30000))
            invite = await b.expect_request("INVITE")
            await b.answer(invite, sdp(30002))
            await a.expect_response(200)  # and never ACKed
            await a.expect_request("BYE")
            await b.expect_request("BYE")
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_a_called_phone_that_never_answers_gives_408(tmp_path: Path) -> None:
    async with (
        open_office(tmp_path, fast_timers=True) as office,
        trio.open_nursery() as nursery,
    ):
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            await b.expect_request("INVITE")  # and silence: not even 100 Trying
            timeout = await a.expect_response(408)
        assert timeout.reason == "Request Timeout (the called phone does not answer)"
        await a.ack_failure(call, timeout)
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_a_200_racing_our_cancel_is_acked_then_byed(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            invite = await b.expect_request("INVITE")
            await b.reply(invite, 180)
            await a.cancel(call)
            terminated = await a.expect_response(487)
            await b.expect_request("CANCEL")
            await b.reply(invite, 200, sdp(30002))  # answered just too late
            ack = await b.expect_request("ACK")
            bye = await b.expect_request("BYE")
        assert ack.call_id == bye.call_id == invite.call_id
        assert bye.to_tag == "callee"
        await a.ack_failure(call, terminated)
        await office.settled()
        nursery.cancel_scope.cancel()


def _out_of_call(method: str, phone_port: int, to_tag: str | None = "nope") -> SipRequest:
    headers = Headers()
    branch = "z9hG4bK" + secrets.token_hex(6)
    headers.add("Via", f"SIP/2.0/UDP 127.0.0.1:{phone_port};branch={branch};rport")
    headers.add("Max-Forwards", "70")
    headers.add("From", "<sip:201@branchpbx.test>;tag=abc")
    headers.add("To", "<sip:202@branchpbx.test>" + (f";tag={to_tag}" if to_tag else ""))
    headers.add("Call-ID", f"no-such-call-{method}")
    headers.add("CSeq", f"5 {method}")
    return SipRequest(method, "sip:202@127.0.0.1", headers)


async def test_requests_of_no_call(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        with trio.fail_after(GUARD):
            for method in ("BYE", "INFO", "UPDATE", "MESSAGE"):
                await a.send(_out_of_call(method, a.port))
                answer = await a.expect_response(method=method)
                assert answer.status == 481, (method, answer.status)
            await a.send(_out_of_call("CANCEL", a.port, to_tag=None))
            assert (await a.expect_response(method="CANCEL")).status == 481
            # A MESSAGE outside any call is not ours to serve (pager mode is not a call).
            await a.send(_out_of_call("MESSAGE", a.port, to_tag=None))
            refused = await a.expect_response(method="MESSAGE")
            await a.send(_out_of_call("OPTIONS", a.port, to_tag=None))
            options = await a.expect_response(method="OPTIONS")
        assert refused.status == 405
        allow = (options.headers.get("Allow") or "").split(", ")
        assert {"INVITE", "ACK", "BYE", "CANCEL", "INFO", "UPDATE"} <= set(allow)
        assert office.controller.calls == {}
        nursery.cancel_scope.cancel()


async def test_a_caller_may_call_only_as_its_own_extension(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        b = await office.phone("202", nursery)
        a.ext = "203"  # From says 203 ...
        a.auth_user = "201"  # ... the credentials (good ones) say 201
        with trio.fail_after(GUARD):
            call = await a.call("202", sdp(30000))
            refused = await a.expect_response(403)
        assert refused.reason == "Forbidden (you may call only as your own extension)"
        assert call.invite.from_.uri.user == "203"  # type: ignore[union-attr]
        await a.ack_failure(call, refused)
        assert b.received("INVITE") == []
        assert office.controller.calls == {}
        nursery.cancel_scope.cancel()


async def test_an_invite_without_sdp_is_488(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        a = await office.phone("201", nursery)
        await office.phone("202", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("202", b"")
            refused = await a.expect_response(488)
        assert "SDP" in refused.reason
        await a.ack_failure(call, refused)
        await office.settled()
        nursery.cancel_scope.cancel()


async def test_a_call_between_offices_through_the_real_media_anchor(tmp_path: Path) -> None:
    async with (
        open_two_offices(tmp_path, real_anchor=True) as (lyon, paris, _),
        trio.open_nursery() as nursery,
    ):
        a = await lyon.phone("201", nursery)
        b = await paris.phone("301", nursery)
        with trio.fail_after(GUARD):
            call = await a.call("301", sdp(30000))
            invite = await b.expect_request("INVITE")
            dialog = await b.answer(invite, sdp(30010))
            await a.answered(call)
        assert lyon.media_anchor is not None and paris.media_anchor is not None
        assert lyon.media_anchor.statistics().calls == 1
        (call_id,) = lyon.controller.calls
        media = paris.media_anchor.call(call_id)
        assert media is not None
        # The phone's SDP names the anchor's real socket, and the anchor knows its relay leg.
        assert sdp_lines(invite.body, "m=")[0].startswith(f"m=audio {media.local_port} ")
        assert media.leg is not None
        with trio.fail_after(GUARD):
            await b.request_in(dialog, "BYE")
            await a.expect_request("BYE")
        await lyon.settled()
        await paris.settled()
        assert paris.media_anchor.call(call_id) is None
        nursery.cancel_scope.cancel()
