"""The main host's call router (mainhost/calls.py) with a fake trunk: routing, bridging, grants,
the relay's legs, and calls outliving a re-login for a grace period."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from mainhost.calls import CallRouter, OfficeRange
from shared.wire.messages import (
    CallAnswer,
    CallEnd,
    CallProgress,
    CallSetup,
    GrantReply,
    GrantRequest,
    MediaLeg,
    Message,
)


@dataclass
class FakeRelay:
    legs: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    next_leg: int = 100

    def _leg(self, call_id: str, office: str) -> int:
        self.next_leg += 1
        self.legs.setdefault(call_id, []).append((office, self.next_leg))
        return self.next_leg

    def offer(self, call_id: str, office: str) -> int:
        return self._leg(call_id, office)

    def answer(self, call_id: str, office: str) -> int:
        return self._leg(call_id, office)

    def delete(self, call_id: str) -> None:
        self.deleted.append(call_id)


class Net:
    def __init__(self, online: set[str]) -> None:
        self.online = online
        self.sent: list[tuple[str, int, Message]] = []

    async def send(self, office: str, msg: Message, channel: int) -> bool:
        if office not in self.online:
            return False
        self.sent.append((office, channel, msg))
        return True

    def to(self, office: str) -> list[tuple[int, Message]]:
        return [(c, m) for o, c, m in self.sent if o == office]


DIRECTORY = {"berlin": {"2001", "2002"}, "lisbon": {"3001"}}


def make(online: set[str] | None = None) -> tuple[CallRouter, Net, FakeRelay]:
    net = Net(online if online is not None else {"berlin", "lisbon"})
    relay = FakeRelay()
    router = CallRouter(
        send=net.send,
        is_online=lambda office: office in net.online,
        ranges=lambda: [
            OfficeRange("berlin", 2000, 2099, 4),
            OfficeRange("lisbon", 3000, 3099, 4),
        ],
        directory_has=lambda office, ext: ext in DIRECTORY.get(office, set()),
        relay=relay,
        relay_port=5090,
        grace=10.0,
    )
    router.set_budget("berlin", 2000)
    router.set_budget("lisbon", 2000)
    return router, net, relay


async def test_call_between_offices_is_routed_and_bridged() -> None:
    router, net, relay = make()
    await router.on_message("berlin", 1, CallSetup("c1", "2001", "3001", ["PCMU/8000"]))
    lisbon = net.to("lisbon")
    assert isinstance(lisbon[0][1], CallSetup)
    channel = lisbon[0][0]
    assert channel % 2 == 0 and channel != 0  # the main host's channels are even
    assert lisbon[0][1].origin_office == "berlin"
    # Both offices learn their own relay leg.
    legs = dict(relay.legs["c1"])
    berlin_leg = [m for _, m in net.to("berlin") if isinstance(m, MediaLeg)]
    lisbon_leg = [m for _, m in lisbon if isinstance(m, MediaLeg)]
    assert berlin_leg[0].leg == legs["berlin"] and lisbon_leg[0].leg == legs["lisbon"]
    # Progress and answer go back to the caller's channel.
    await router.on_message("lisbon", channel, CallProgress("c1", 180))
    await router.on_message("lisbon", channel, CallAnswer("c1", "PCMU/8000"))
    back = [m for c, m in net.to("berlin") if c == 1]
    assert [type(m).__name__ for m in back] == ["MediaLeg", "CallProgress", "CallAnswer"]
    # Hangup from the caller reaches the callee and frees the relay.
    await router.on_message("berlin", 1, CallEnd("c1"))
    assert isinstance(net.to("lisbon")[-1][1], CallEnd)
    assert relay.deleted == ["c1"]
    assert router.live_calls() == []


@pytest.mark.parametrize(
    ("callee", "online", "status"),
    [("4001", {"berlin", "lisbon"}, 404), ("3002", {"berlin", "lisbon"}, 404),
     ("3001", {"berlin"}, 480)],
    ids=["no-office", "no-phone", "office-offline"],
)  # fmt: skip
async def test_unroutable_calls_are_refused_with_a_reason(
    callee: str, online: set[str], status: int
) -> None:
    router, net, relay = make(online)
    await router.on_message("berlin", 3, CallSetup("c2", "2001", callee))
    (channel, reply), *_ = net.to("berlin")
    assert channel == 3
    assert isinstance(reply, CallEnd) and reply.status == status and reply.reason
    assert router.live_calls() == [] and "c2" not in relay.legs


async def test_grants_only_for_phones_of_the_asking_office() -> None:
    router, net, _ = make()
    await router.on_message("berlin", 5, GrantRequest("g1", "2001", "2002"))
    await router.on_message("berlin", 7, GrantRequest("g2", "2001", "3001"))
    replies = {c: m for c, m in net.to("berlin")}
    assert isinstance(replies[5], GrantReply) and replies[5].granted
    assert isinstance(replies[7], GrantReply) and not replies[7].granted
    assert "3001" in replies[7].reason


async def test_calls_wait_for_a_relogin_then_end_after_the_grace() -> None:
    router, net, relay = make()
    await router.on_message("berlin", 1, CallSetup("c3", "2001", "3001"))
    await router.office_lost("berlin", now=100.0)
    await router.reap(now=105.0)
    assert len(router.live_calls()) == 1  # within the grace period: kept
    router.office_back("berlin")
    await router.reap(now=200.0)
    assert len(router.live_calls()) == 1  # it came back: kept
    await router.office_lost("berlin", now=300.0)
    await router.reap(now=311.0)
    assert router.live_calls() == []
    ended = [m for _, m in net.to("lisbon") if isinstance(m, CallEnd)]
    assert ended and ended[0].status == 503 and "berlin" in ended[0].reason
    assert relay.deleted == ["c3"]


G711 = 92.8  # kbit/s: 160 bytes of G.711 + RTP + our WAN header and tag + UDP + IPv4, 50/s


async def test_a_call_costs_its_codec_on_both_wans_until_it_ends() -> None:
    router, _, _ = make()
    await router.on_message("berlin", 1, CallSetup("c", "2001", "3001", ["PCMA/8000"]))
    for office in ("berlin", "lisbon"):
        assert router.bandwidth(office)["used_kbps"] == G711
        assert router.bandwidth(office)["calls"] == 1
    await router.on_message("berlin", 1, CallEnd("c"))
    for office in ("berlin", "lisbon"):
        assert router.bandwidth(office)["used_kbps"] == 0
        assert router.bandwidth(office)["calls"] == 0


async def test_a_full_wan_refuses_with_503_naming_the_office() -> None:
    router, net, relay = make()
    router.set_budget("lisbon", 150)  # room for one G.711 call, not two
    await router.on_message("berlin", 1, CallSetup("c1", "2001", "3001", ["PCMU/8000"]))
    await router.on_message("berlin", 3, CallSetup("c2", "2002", "3001", ["PCMU/8000"]))
    refusal = [m for c, m in net.to("berlin") if c == 3][-1]
    assert isinstance(refusal, CallEnd) and refusal.status == 503
    assert "lisbon" in refusal.reason and "WAN" in refusal.reason
    assert router.bandwidth("lisbon")["refused"] == 1
    assert router.bandwidth("berlin")["refused"] == 0
    assert "c2" not in relay.legs
    # The first call's end frees the room for the next.
    await router.on_message("berlin", 1, CallEnd("c1"))
    await router.on_message("berlin", 5, CallSetup("c3", "2002", "3001", ["PCMU/8000"]))
    assert isinstance([m for c, m in net.to("lisbon")][-2], CallSetup)


async def test_a_cheaper_codec_both_phones_offer_is_chosen_when_the_first_does_not_fit() -> None:
    router, net, _ = make()
    router.set_budget("berlin", 60)  # no room for G.711 (92.8), room for G.729 (36.8)
    codecs = ["PCMU/8000", "G729/8000", "telephone-event/8000"]
    await router.on_message("berlin", 1, CallSetup("c", "2001", "3001", codecs))
    setup = next(m for _, m in net.to("lisbon") if isinstance(m, CallSetup))
    assert setup.codecs == ["G729/8000", "telephone-event/8000"]
    assert router.bandwidth("berlin")["used_kbps"] == 36.8
    # The callee's answer decides what is paid for from then on.
    channel = next(c for c, m in net.to("lisbon") if isinstance(m, CallSetup))
    await router.on_message("lisbon", channel, CallAnswer("c", "G729/8000"))
    assert router.bandwidth("lisbon")["used_kbps"] == 36.8


class BatchingNet(Net):
    """A trunk that also takes several messages in one write, and remembers the writes."""

    def __init__(self, online: set[str]) -> None:
        super().__init__(online)
        self.writes: list[tuple[str, list[type]]] = []

    async def send(self, office: str, msg: Message, channel: int) -> bool:
        delivered = await super().send(office, msg, channel)
        if delivered:
            self.writes.append((office, [type(msg)]))
        return delivered

    async def send_many(self, office: str, messages: Sequence[tuple[Message, int]]) -> bool:
        if office not in self.online:
            return False
        self.sent += [(office, channel, msg) for msg, channel in messages]
        self.writes.append((office, [type(msg) for msg, _ in messages]))
        return True


def make_batching(online: set[str] | None = None) -> tuple[CallRouter, BatchingNet, FakeRelay]:
    net = BatchingNet(online if online is not None else {"berlin", "lisbon"})
    relay = FakeRelay()
    router = CallRouter(
        send=net.send,
        send_many=lambda office, messages: net.send_many(office, messages),
        is_online=lambda office: office in net.online,
        ranges=lambda: [
            OfficeRange("berlin", 2000, 2099, 4),
            OfficeRange("lisbon", 3000, 3099, 4),
        ],
        directory_has=lambda office, ext: ext in DIRECTORY.get(office, set()),
        relay=relay,
        relay_port=5090,
    )
    return router, net, relay


async def test_the_callee_office_gets_setup_and_media_leg_in_one_write() -> None:
    router, net, relay = make_batching()
    await router.on_message("berlin", 1, CallSetup("c1", "2001", "3001", ["PCMU/8000"]))
    assert net.writes == [("berlin", [MediaLeg]), ("lisbon", [CallSetup, MediaLeg])]
    (setup_channel, setup), (leg_channel, leg) = net.to("lisbon")
    assert isinstance(setup, CallSetup) and isinstance(leg, MediaLeg)
    assert setup_channel == leg_channel and leg.leg == dict(relay.legs["c1"])["lisbon"]


async def test_a_setup_the_callee_office_cannot_take_is_refused_and_undone() -> None:
    router, net, relay = make_batching()
    original = net.send_many

    async def gone(office: str, messages: Sequence[tuple[Message, int]]) -> bool:
        net.online.discard("lisbon")  # it went offline just now
        return await original(office, messages)

    net.send_many = gone  # type: ignore[method-assign]
    await router.on_message("berlin", 1, CallSetup("c1", "2001", "3001", ["PCMU/8000"]))
    assert net.to("lisbon") == []
    end = net.to("berlin")[-1][1]
    assert isinstance(end, CallEnd) and end.status == 480
    assert relay.deleted == ["c1"] and router.live_calls() == []
