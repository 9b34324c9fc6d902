"""The call controller alone (STYLE.md: each layer tested with a fake below it): fake legs that
record what they are told, a fake directory, location, trunk and anchor. No sockets."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remotehost.calls import (
    Bindings,
    Call,
    CallController,
    CallEvent,
    CallPolicy,
    Connect,
    Disconnect,
    Fail,
    Offer,
    Ring,
    Update,
    UpdateResult,
    WanMedia,
    _codec_of,
)
from shared.wire.messages import CallEnd, CallSetup, GrantReply, Message
from tests.callhelpers import GUARD, FakeAnchor, FakeMedia, sdp, sdp_lines, wait_until

OFFER = sdp(30000)


@dataclass
class FakeLeg:
    name: str
    peer_ip: str = "192.0.2.10"
    call: Call | None = None
    got: list[CallEvent] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)
    closed: bool = False
    result: UpdateResult = field(default_factory=lambda: UpdateResult(200, "OK"))

    async def send(self, event: CallEvent) -> None:
        self.got.append(event)

    async def update(self, update: Update) -> UpdateResult:
        self.updates.append(update)
        return self.result

    def close(self) -> None:
        self.closed = True

    def told(self, kind: type) -> list[CallEvent]:
        return [e for e in self.got if isinstance(e, kind)]


@dataclass(frozen=True)
class FakeBinding:
    ext: str
    contact: str
    transport: str = "udp"
    source_ip: str = "192.0.2.20"
    source_port: int = 5060
    reachable: bool = True


@dataclass(frozen=True)
class Info:
    ext_first: int = 200
    ext_last: int = 299


class FakeDirectory:
    def __init__(self, exts: Sequence[str]) -> None:
        self.exts = set(exts)

    def lookup(self, ext: str) -> object | None:
        return ext if ext in self.exts else None

    def info(self) -> Info:
        return Info()


class FakeLocation:
    def __init__(self) -> None:
        self.bindings: dict[str, list[FakeBinding]] = {}

    def get(self, ext: str) -> Sequence[Bindings]:
        return self.bindings.get(ext, [])


class FakeTrunk:
    def __init__(self) -> None:
        self.online = True
        self.media_key: bytes | None = b"k" * 32
        self.grant: GrantReply | None = None
        self.silent = False
        self.asked: list[tuple[str, str]] = []

    async def request_grant(
        self, call_id: str, caller: str, callee: str, *, timeout: float = 1.0
    ) -> GrantReply | None:
        self.asked.append((caller, callee))
        if self.silent or not self.online:
            await trio.sleep(timeout)
            return None
        return self.grant or GrantReply(call_id, True)


class FakeLegs:
    def __init__(self) -> None:
        self.sip: list[FakeLeg] = []
        self.trunk: list[FakeLeg] = []
        self.channels = itertools.count(1, 2)
        self.messages: list[Message] = []
        self.controller: CallController | None = None

    def sip_leg(self, binding: Bindings) -> FakeLeg:
        leg = FakeLeg(f"sip {binding.contact}", binding.source_ip)
        self.sip.append(leg)
        return leg

    def trunk_leg(self, call_id: str, channel: int | None = None) -> FakeLeg:
        leg = FakeLeg(f"trunk {call_id}", "")
        self.trunk.append(leg)
        assert self.controller is not None
        self.controller.register_trunk_leg(channel or next(self.channels), self._record)
        return leg

    async def _record(self, msg: Message) -> None:
        self.messages.append(msg)


@dataclass
class World:
    controller: CallController
    legs: FakeLegs
    location: FakeLocation
    trunk: FakeTrunk
    anchor: FakeAnchor

    def register(self, ext: str, n: int = 1) -> None:
        self.location.bindings[ext] = [
            FakeBinding(ext, f"sip:{ext}@192.0.2.{20 + i}", source_ip=f"192.0.2.{20 + i}")
            for i in range(n)
        ]

    async def ended(self) -> None:
        await wait_until(lambda: not self.controller.calls)


@asynccontextmanager
async def world(policy: CallPolicy | None = None) -> AsyncIterator[World]:
    legs = FakeLegs()
    location = FakeLocation()
    trunk = FakeTrunk()
    anchor = FakeAnchor()
    controller = CallController(
        legs=legs,
        directory=FakeDirectory(["201", "202", "203"]),
        location=location,
        trunk=trunk,
        anchor=anchor,
        media_address=lambda ip: "192.0.2.1",
        main_host="203.0.113.5",
        policy=policy or CallPolicy(),
    )
    legs.controller = controller
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.serve)
        yield World(controller, legs, location, trunk, anchor)
        nursery.cancel_scope.cancel()


async def _start(w: World, callee: str = "202", forks: int = 1) -> FakeLeg:
    w.register(callee, forks)
    a = FakeLeg("caller")
    await w.controller.new_call(a, Offer("201", callee, OFFER))
    await wait_until(lambda: len(w.legs.sip) == forks)
    return a


async def test_local_call_forks_and_the_first_answer_wins() -> None:
    async with world() as w:
        with trio.fail_after(GUARD):
            a = await _start(w, forks=2)
            b1, b2 = w.legs.sip
            assert b1.got == [Offer("201", "202", OFFER)] == b2.got
            await w.controller.on_event(b1, Ring(183, "Session Progress", b"early"))
            await w.controller.on_event(b2, Connect(b"answer"))
            assert a.got == [Ring(183, "Session Progress", b"early"), Connect(b"answer")]
            assert b1.told(Disconnect) == [Disconnect("answered elsewhere")]
            await w.controller.on_event(b1, Fail(487, "Request Terminated"))
            assert a.told(Fail) == []
            await w.controller.on_event(a, Disconnect("hung up"))
            await w.ended()
        assert b2.told(Disconnect) == [Disconnect("hung up")]
        assert a.closed and b1.closed and b2.closed
        assert w.trunk.asked == [("201", "202")]


async def test_all_forks_fail_the_caller_hears_the_most_telling_failure() -> None:
    async with world() as w:
        with trio.fail_after(GUARD):
            a = await _start(w, forks=3)
            b1, b2, b3 = w.legs.sip
            await w.controller.on_event(b1, Fail(480, "Temporarily Unavailable"))
            await w.controller.on_event(b2, Fail(486, "Busy Here"))
            assert a.got == []
            await w.controller.on_event(b3, Fail(408, "Request Timeout"))
            await w.ended()
        assert a.got == [Fail(486, "Busy Here")]


async def test_decline_beats_busy() -> None:
    async with world() as w:
        with trio.fail_after(GUARD):
            a = await _start(w, forks=2)
            b1, b2 = w.legs.sip
            await w.controller.on_event(b1, Fail(486, "Busy Here"))
            await w.controller.on_event(b2, Fail(603, "Decline"))
            await w.ended()
        assert a.got == [Fail(603, "Decline")]


async def test_caller_gives_up_while_the_main_host_is_asked() -> None:
    async with world(CallPolicy(grant_timeout=0.3)) as w:
        w.trunk.silent = True
        w.register("202")
        a = FakeLeg("caller")
        with trio.fail_after(GUARD):
            await w.controller.new_call(a, Offer("201", "202", OFFER))
            await wait_until(lambda: bool(w.trunk.asked))
            (call,) = w.controller.calls.values()
            await w.controller.on_event(a, Disconnect("cancelled by the caller"))
            await w.ended()
            await trio.sleep(0.4)  # past the grant timeout: still nothing rings
        assert w.legs.sip == []
        assert call.state == "ended"


async def test_refused_grant_carries_the_reason_as_warning() -> None:
    async with world() as w:
        w.trunk.grant = GrantReply("x", False, "202 is not a phone of office lyon")
        with trio.fail_after(GUARD):
            a = FakeLeg("caller")
            w.register("202")
            await w.controller.new_call(a, Offer("201", "202", OFFER))
            await w.ended()
        (fail,) = a.got
        assert fail == Fail(
            403,
            "Forbidden (202 is not a phone of office lyon)",
            "202 is not a phone of office lyon",
        )
        assert w.legs.sip == []


async def test_updates_need_an_established_call_and_pass_through_when_it_is() -> None:
    async with world() as w:
        with trio.fail_after(GUARD):
            a = await _start(w)
            (b,) = w.legs.sip
            early = await w.controller.on_update(a, Update("INFO", "text/plain", b"x"))
            assert early.status == 491
            await w.controller.on_event(b, Connect(b"answer"))
            b.result = UpdateResult(200, "OK", "application/sdp", b"held")
            result = await w.controller.on_update(a, Update("INVITE", "application/sdp", b"hold"))
            assert result == UpdateResult(200, "OK", "application/sdp", b"held")
            assert b.updates == [Update("INVITE", "application/sdp", b"hold")]
            back = await w.controller.on_update(b, Update("INFO", "application/dtmf", b"5"))
            assert back.status == 200
            assert a.updates == [Update("INFO", "application/dtmf", b"5")]
            await w.controller.on_event(b, Disconnect("hung up"))
            await w.ended()
        assert a.told(Disconnect) == [Disconnect("hung up")]


async def test_max_calls_refuses_with_503_and_keeps_nothing() -> None:
    async with world(CallPolicy(max_calls=1)) as w:
        with trio.fail_after(GUARD):
            first = await _start(w)
            second = FakeLeg("caller 2")
            await w.controller.new_call(second, Offer("203", "202", OFFER))
        assert [type(e) for e in second.got] == [Fail]
        assert second.got[0].status == 503  # type: ignore[union-attr]
        assert second.closed
        assert len(w.controller.calls) == 1
        await w.controller.on_event(first, Disconnect())
        await w.ended()


async def test_outbound_call_gets_an_anchor_answer_with_the_chosen_codec() -> None:
    async with world() as w:
        a = FakeLeg("caller", peer_ip="192.0.2.10")
        with trio.fail_after(GUARD):
            await w.controller.new_call(a, Offer("201", "301", OFFER))
            await wait_until(lambda: bool(w.legs.trunk))
            (t,) = w.legs.trunk
            assert t.got == [Offer("201", "301", None, ("PCMU/8000", "PCMA/8000"))]
            await w.controller.on_event(t, WanMedia(7, "", 5090))
            (media,) = w.anchor.calls
            assert media.wan == (7, ("203.0.113.5", 5090), b"k" * 32)
            assert media.phone_target == ("127.0.0.1", 30000)
            await w.controller.on_event(t, Ring())
            await w.controller.on_event(t, Connect(codec="PCMA/8000"))
        ring, answer = a.got
        assert ring == Ring(180, "Ringing", None)
        assert isinstance(answer, Connect) and answer.sdp is not None
        assert sdp_lines(answer.sdp, "c=") == ["c=IN IP4 192.0.2.1"]
        assert sdp_lines(answer.sdp, "m=") == [f"m=audio {media.local_port} RTP/AVP 8 101"]
        await w.controller.on_trunk_down()
        assert len(w.controller.calls) == 1  # answered: it waits for the trunk
        await w.controller.on_trunk_up(b"new" * 8)
        assert media.keys == [b"new" * 8]
        await w.controller.on_event(a, Disconnect("hung up"))
        await w.ended()
        assert t.got[-1] == Disconnect("hung up") and t.closed and media.closed


async def test_outbound_call_with_unusable_sdp_is_488() -> None:
    async with world() as w:
        for body in (b"not sdp at all", sdp(30000).replace(b"0 8 101", b"101")):
            a = FakeLeg("caller")
            with trio.fail_after(GUARD):
                await w.controller.new_call(a, Offer("201", "301", body))
                await w.ended()
            (fail,) = a.got
            assert isinstance(fail, Fail) and fail.status == 488
        assert w.anchor.calls == [] and w.legs.trunk == []


async def test_unanswered_trunk_calls_fail_when_the_trunk_goes_down() -> None:
    async with world() as w:
        a = FakeLeg("caller")
        with trio.fail_after(GUARD):
            await w.controller.new_call(a, Offer("201", "301", OFFER))
            await wait_until(lambda: bool(w.legs.trunk))
            (t,) = w.legs.trunk
            await w.controller.on_event(t, Ring())
            await w.controller.on_trunk_down()
            await w.ended()
        assert a.got[-1] == Fail(503, "Service Unavailable (main host unreachable)")
        assert t.told(Disconnect) and t.closed
        assert all(m.closed for m in w.anchor.calls)


async def test_inbound_call_from_the_trunk_offers_the_anchor_to_the_phone() -> None:
    async with world() as w:
        w.register("202", 2)
        with trio.fail_after(GUARD):
            # A setup on an odd channel would be one of ours: not a call from the trunk.
            await w.controller.on_trunk_message(3, CallSetup("stray", "301", "202"))
            assert w.controller.calls == {}
            await w.controller.on_trunk_message(
                2, CallSetup("c1", "301", "202", ["PCMA/8000", "G722/8000"], "Ann", "paris")
            )
            await wait_until(lambda: len(w.legs.sip) == 2)
            (t,) = w.legs.trunk
            await w.controller.on_event(t, WanMedia(8, "198.51.100.7", 5090))
            b1, b2 = w.legs.sip
            offer = b1.got[0]
            assert isinstance(offer, Offer) and offer.sdp is not None and offer.caller == "301"
            (media,) = w.anchor.calls
            assert sdp_lines(offer.sdp, "m=") == [f"m=audio {media.local_port} RTP/AVP 8 9 101"]
            assert sdp_lines(offer.sdp, "c=") == ["c=IN IP4 192.0.2.1"]
            assert media.wan == (8, ("198.51.100.7", 5090), b"k" * 32)
            await w.controller.on_event(b2, Connect(sdp(30040).replace(b"0 8 101", b"8 101")))
            assert t.got == [Connect(codec="PCMA/8000")]
            assert media.phone_target == ("127.0.0.1", 30040)
            assert b1.told(Disconnect)
            await w.controller.on_trunk_message(2, CallEnd("c1", 0, ""))
            assert w.legs.messages == [CallEnd("c1", 0, "")]  # to the call's trunk leg
            await w.controller.on_event(t, Disconnect("far end hung up"))
            await w.ended()
        assert b2.told(Disconnect) and media.closed


def test_codec_names() -> None:
    assert _codec_of("PCMU/8000") is not None
    assert _codec_of("PCMU/8000").payload_type == 0  # type: ignore[union-attr]
    assert _codec_of("opus/48000").payload_type is None  # type: ignore[union-attr]
    assert _codec_of("") is None
    assert _codec_of("PCMU/fast") is None


# --- Any order of what the forks and the caller do ------------------------------------------

ACTIONS = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.sampled_from(["ring", "connect", "busy", "decline", "timeout", "bye", "caller_bye"]),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forks=st.integers(1, 3), actions=ACTIONS)
def test_any_sequence_ends_clean_with_one_final_answer(
    forks: int, actions: list[tuple[int, str]]
) -> None:
    """Whatever the phones do, in any order: the caller hears at most one final answer, no
    fork is told twice to stop, and when the caller hangs up everything is closed."""

    async def main() -> None:
        async with world() as w:
            with trio.fail_after(GUARD):
                a = await _start(w, forks=forks)
                done: set[int] = set()  # forks that ended or were told to
                for index, what in actions:
                    if what == "caller_bye":
                        await w.controller.on_event(a, Disconnect("caller"))
                        break
                    if index >= forks or index in done:
                        continue
                    leg = w.legs.sip[index]
                    if leg.told(Disconnect):
                        done.add(index)
                        continue
                    events: dict[str, CallEvent] = {
                        "ring": Ring(),
                        "connect": Connect(b"answer"),
                        "busy": Fail(486, "Busy Here"),
                        "decline": Fail(603, "Decline"),
                        "timeout": Fail(408, "Request Timeout"),
                        "bye": Disconnect("callee"),
                    }
                    event = events[what]
                    if isinstance(event, Fail | Disconnect):
                        done.add(index)
                    await w.controller.on_event(leg, event)
                await w.controller.on_event(a, Disconnect("caller"))
                await w.ended()
            finals = [e for e in a.got if isinstance(e, Connect | Fail)]
            assert len(finals) <= 1
            assert len(a.told(Ring)) <= len(actions)
            for leg in w.legs.sip:
                assert len(leg.told(Disconnect)) <= 1, leg.got
                assert leg.closed
            assert a.closed

    trio.run(main)


SDP_LINES = st.sampled_from(
    [
        "v=0",
        "o=- 1 1 IN IP4 192.0.2.10",
        "s=-",
        "c=IN IP4 192.0.2.10",
        "c=IN IP4 0.0.0.0",
        "t=0 0",
        "m=audio 30000 RTP/AVP 0 8 101",
        "m=audio 0 RTP/AVP 0",
        "m=video 30002 RTP/AVP 96",
        "m=audio 30000 RTP/SAVP 0",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:96 opus/48000/2",
        "a=rtpmap:101 telephone-event/8000",
        "a=sendonly",
        "a=inactive",
        "m=audio x RTP/AVP 0",
    ]
)
BODIES = st.one_of(
    st.binary(max_size=200),
    st.lists(SDP_LINES, max_size=12).map(lambda lines: ("\r\n".join(lines) + "\r\n").encode()),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES)
def test_any_offer_to_another_office_is_either_set_up_or_refused_488(body: bytes) -> None:
    """What a phone puts in its INVITE cannot break the controller: the call goes to the trunk
    with the offer's audio codecs, or the caller gets 488, and nothing is left open."""

    async def main() -> None:
        async with world() as w:
            a = FakeLeg("caller")
            with trio.fail_after(GUARD):
                await w.controller.new_call(a, Offer("201", "301", body))
                await wait_until(lambda: bool(a.got) or bool(w.legs.trunk))
                if w.legs.trunk:
                    (t,) = w.legs.trunk
                    offer = t.got[0]
                    assert isinstance(offer, Offer) and offer.codecs
                    assert not any("telephone-event" in c for c in offer.codecs)
                    await w.controller.on_event(a, Disconnect("caller"))
                else:
                    (fail,) = a.got
                    assert isinstance(fail, Fail) and fail.status == 488
                await w.ended()
            assert all(m.closed for m in w.anchor.calls)
            assert all(leg.closed for leg in (a, *w.legs.trunk))

    trio.run(main)


class BrokenAnchor(FakeAnchor):
    async def open_call(self, call_id: str) -> FakeMedia:
        raise RuntimeError("the anchor is not serving")


async def test_a_failing_call_gets_500_and_the_controller_goes_on() -> None:
    async with world() as w:
        w.controller.anchor = BrokenAnchor()
        a = FakeLeg("caller")
        with trio.fail_after(GUARD):
            await w.controller.new_call(a, Offer("201", "301", OFFER))
            await w.ended()
            assert a.got == [Fail(500, "Server Internal Error (call control failed)")]
            assert a.closed
            # The next call (inside the office) is served as usual.
            b = await _start(w)
            await w.controller.on_event(b, Disconnect())
            await w.ended()


async def test_relay_named_by_host_name_is_resolved_for_the_anchor() -> None:
    async with world() as w:
        w.controller.main_host = "localhost"
        a = FakeLeg("caller")
        with trio.fail_after(GUARD):
            await w.controller.new_call(a, Offer("201", "301", OFFER))
            await wait_until(lambda: bool(w.legs.trunk))
            (t,) = w.legs.trunk
            await w.controller.on_event(t, WanMedia(9, "", 5090))
            (media,) = w.anchor.calls
            assert media.wan is not None
            assert media.wan[1] in (("127.0.0.1", 5090), ("::1", 5090))
            await w.controller.on_event(a, Disconnect())
            await w.ended()


async def test_media_leg_without_a_key_is_wired_at_the_next_login() -> None:
    async with world() as w:
        a = FakeLeg("caller")
        with trio.fail_after(GUARD):
            await w.controller.new_call(a, Offer("201", "301", OFFER))
            await wait_until(lambda: bool(w.legs.trunk))
            (t,) = w.legs.trunk
            w.trunk.media_key = None  # the trunk dropped just now
            await w.controller.on_event(t, WanMedia(9, "203.0.113.9", 5090))
            (media,) = w.anchor.calls
            assert media.wan is None
            w.trunk.media_key = b"z" * 32
            await w.controller.on_trunk_up(b"z" * 32)
            assert media.wan == (9, ("203.0.113.9", 5090), b"z" * 32)
            assert media.keys == []  # wired with the new key, not re-keyed
            await w.controller.on_event(a, Disconnect())
            await w.ended()


async def test_trunk_call_updates_never_carry_a_phones_sdp_across() -> None:
    async with world() as w:
        a = FakeLeg("caller")
        with trio.fail_after(GUARD):
            await w.controller.new_call(a, Offer("201", "301", OFFER))
            await wait_until(lambda: bool(w.legs.trunk))
            (t,) = w.legs.trunk
            await w.controller.on_event(t, Connect(codec="PCMU/8000"))
            (media,) = w.anchor.calls
            # An offerless re-INVITE gets our offer: the anchor, the codec in use.
            asked = await w.controller.on_update(a, Update("INVITE"))
            assert asked.status == 200
            assert sdp_lines(asked.body, "m=") == [f"m=audio {media.local_port} RTP/AVP 0 101"]
            # SDP outside an offer, or session changes from the far side: not passed on.
            odd = await w.controller.on_update(a, Update("INFO", "application/sdp", OFFER))
            assert odd.status == 488
            far = await w.controller.on_update(t, Update("UPDATE", "application/sdp", OFFER))
            assert far.status == 488
            assert t.updates == [] and a.updates == []
            # DTMF as INFO does travel, both ways.
            dtmf = Update("INFO", "application/dtmf-relay", b"Signal=1")
            assert (await w.controller.on_update(a, dtmf)).status == 200
            assert (await w.controller.on_update(t, dtmf)).status == 200
            assert t.updates == [dtmf] and a.updates == [dtmf]
            await w.controller.on_event(a, Disconnect())
            await w.ended()


async def test_an_answered_trunk_call_failed_by_the_main_host_hangs_up_the_phone() -> None:
    async with world() as w:
        a = FakeLeg("caller")
        with trio.fail_after(GUARD):
            await w.controller.new_call(a, Offer("201", "301", OFFER))
            await wait_until(lambda: bool(w.legs.trunk))
            (t,) = w.legs.trunk
            await w.controller.on_event(t, Connect(codec="PCMU/8000"))
            reason = "office paris lost its connection"
            await w.controller.on_event(t, Fail(503, f"Service Unavailable ({reason})", reason))
            await w.ended()
        assert a.got[-1] == Disconnect(f"Service Unavailable ({reason})")
        assert all(m.closed for m in w.anchor.calls)


async def test_answered_trunk_calls_wait_the_grace_period_then_hang_up() -> None:
    async with world(CallPolicy(trunk_grace=0.3)) as w:
        w.register("202")
        a = FakeLeg("caller")
        with trio.fail_after(GUARD):
            await w.controller.new_call(a, Offer("201", "301", OFFER))
            await wait_until(lambda: bool(w.legs.trunk))
            (t,) = w.legs.trunk
            await w.controller.on_event(t, Connect(codec="PCMU/8000"))
            local = await _start(w)  # a call inside the office: never affected
            (b,) = w.legs.sip
            await w.controller.on_event(b, Connect(b"answer"))
            # Down, then back within the grace period: the call goes on.
            w.trunk.online = False
            await w.controller.on_trunk_down()
            w.trunk.online = True
            await w.controller.on_trunk_up(b"k" * 32)
            await trio.sleep(0.5)
            assert len(w.controller.calls) == 2
            # Down for longer than the grace period: the phone is hung up on.
            w.trunk.online = False
            await w.controller.on_trunk_down()
            await wait_until(lambda: len(w.controller.calls) == 1)
        assert a.got[-1] == Disconnect("main host unreachable")
        assert t.closed and not local.closed
        await w.controller.on_event(local, Disconnect())
        await w.ended()


async def test_no_number_dialled_is_404_and_status_lists_live_calls() -> None:
    async with world() as w:
        a = FakeLeg("caller")
        with trio.fail_after(GUARD):
            await w.controller.new_call(a, Offer("201", "", OFFER))
            await w.ended()
            assert a.got == [Fail(404, "Not Found (no number dialled)")]
            b = await _start(w)
            (live,) = w.controller.status()
            assert (live["caller"], live["callee"], live["kind"]) == ("201", "202", "local")
            assert live["anchored"] is False
            await w.controller.on_event(b, Disconnect())
            await w.ended()
        assert w.controller.status() == []


async def test_a_trunk_loss_after_serve_stopped_is_harmless() -> None:
    async with world() as w:
        pass  # serve has stopped
    await w.controller.on_trunk_down()  # the uplink's own clean-up comes after ours
    assert w.controller.calls == {}
    a = FakeLeg("caller")
    w.register("202")
    await w.controller.new_call(a, Offer("201", "202", OFFER))
    assert a.got == [Fail(503, "Service Unavailable (shutting down)")]
    assert w.controller.calls == {} and a.closed


# --- the call waits for its record (F15: on disk before the call goes on) ---------------------


class SlowRecords:
    """A call listener whose writes take until the test releases them, as a busy disk would."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.release = trio.Event()

    async def record_event(self, call_id: str, event: str, **kwargs: object) -> None:
        await self.release.wait()
        self.written.append(event)


async def test_the_caller_is_answered_only_once_the_answer_is_recorded() -> None:
    records = SlowRecords()
    records.release.set()
    async with world() as w:
        w.controller.listener = records
        with trio.fail_after(GUARD):
            w.register("202")
            a = FakeLeg("caller")
            await w.controller.new_call(a, Offer("201", "202", OFFER))
            await wait_until(lambda: len(w.legs.sip) == 1)
            (b,) = w.legs.sip
            records.release = trio.Event()  # the disk is slow from now on
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.controller.on_event, b, Ring())
                await trio.testing.wait_all_tasks_blocked()
                assert not a.told(Ring)  # 180 waits for the "ringing" row
                records.release.set()
            assert a.told(Ring) and records.written[-1] == "ringing"
            records.release = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.controller.on_event, b, Connect(b"answer"))
                await trio.testing.wait_all_tasks_blocked()
                assert not a.told(Connect)  # 200 waits for the "answered" row
                records.release.set()
            assert a.told(Connect) and records.written[-1] == "answered"
            await w.controller.on_event(a, Disconnect("bye"))
            await w.ended()
    assert records.written == ["started", "ringing", "answered", "ended"]


async def test_an_answer_while_the_ringing_row_is_written_is_not_undone() -> None:
    """The 180's row is slow, the 200 comes meanwhile: the call stays connected and the caller
    gets the answer, never a 180 after it."""
    records = SlowRecords()
    records.release.set()
    async with world() as w:
        w.controller.listener = records
        with trio.fail_after(GUARD):
            w.register("202")
            a = FakeLeg("caller")
            await w.controller.new_call(a, Offer("201", "202", OFFER))
            await wait_until(lambda: len(w.legs.sip) == 1)
            (b,) = w.legs.sip
            records.release = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.controller.on_event, b, Ring())
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(w.controller.on_event, b, Connect(b"answer"))
                await trio.testing.wait_all_tasks_blocked()
                records.release.set()
            (call,) = w.controller.calls.values()
            assert call.state == "connected" and call.winner is b
            assert [type(e) for e in a.got] == [Connect]
            await w.controller.on_event(a, Disconnect("bye"))
            await w.ended()


async def test_forks_are_cancelled_when_the_caller_leaves_while_the_answer_is_recorded() -> None:
    records = SlowRecords()
    records.release.set()
    async with world() as w:
        w.controller.listener = records
        with trio.fail_after(GUARD):
            w.register("202", n=2)
            a = FakeLeg("caller")
            await w.controller.new_call(a, Offer("201", "202", OFFER))
            await wait_until(lambda: len(w.legs.sip) == 2)
            first, second = w.legs.sip
            records.release = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.controller.on_event, first, Connect(b"answer"))
                await trio.testing.wait_all_tasks_blocked()
                await w.controller.on_event(a, Disconnect("gone"))
                records.release.set()
            await w.ended()
    assert not a.told(Connect)  # it hung up before the answer could be given
    assert first.told(Disconnect)  # the answered fork is hung up
    assert second.told(Disconnect)  # the other fork is cancelled
