"""F4, direct media between offices: the path state machine (remotehost.directpath) with time as
an input, the direct packets of shared.media.wan, and two anchors with the relay on loopback
switching to the direct path and back.

On loopback a "firewall" is an anchor whose WAN sends to some addresses vanish (`Firewalled`):
that is what a NAT that filters the other office's packets does to them.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mainhost.calls import CallRouter
from mainhost.relay import MediaRelay
from remotehost.anchor import CallMedia, MediaAnchor
from remotehost.directpath import DirectPathState, DirectPathTimers, PathState
from shared.media.rtp import parse_rtp_untrusted
from shared.media.wan import (
    DIRECTION_DIRECT_ANSWER,
    DIRECTION_DIRECT_OFFER,
    DIRECTION_FROM_RELAY,
    DIRECTION_TO_RELAY,
    KIND_KEEPALIVE,
    WanDefect,
    WanPacketError,
    open_untrusted,
    peek_direction_untrusted,
    seal,
    seal_direct,
)
from shared.wire.messages import CallSetup, DirectPath
from tests.test_anchor import Phone
from tests.test_callrouter import FakeRelay, Net, make
from tests.test_relay import LOOPBACK, rtp, start_relay, wait_for

T = DirectPathTimers()
KEY = bytes(range(32))


# --- the state machine, time as an input ------------------------------------------------------


def test_starts_relayed_and_probes_at_once() -> None:
    path = DirectPathState(100.0)
    assert path.state is PathState.RELAYED and not path.direct
    assert path.get_timer() == 100.0
    assert path.handle_timer(100.0) is True
    assert path.handle_timer(100.0) is False  # one probe per instant
    assert path.get_timer() == pytest.approx(100.0 + T.fast_interval)


def test_probes_fast_at_first_then_slowly() -> None:
    path = DirectPathState(0.0)
    sent = []
    now = 0.0
    while now < 10.0:
        if path.handle_timer(now):
            sent.append(now)
        now = max(path.get_timer(), now + 1e-6)
    fast = [t for t in sent if t < T.fast_for]
    slow = [t for t in sent if t >= T.fast_for]
    # 50 ms apart for 5 s (about 100 probes), then once a second.
    assert 95 <= len(fast) <= 101
    assert 4 <= len(slow) <= 6
    assert all(b - a >= T.slow_interval - 1e-9 for a, b in itertools.pairwise(slow))


def test_hearing_the_peer_is_not_enough() -> None:
    path = DirectPathState(0.0)
    path.on_packet(0.1, peer_hears_us=False)
    assert path.hears_peer(0.1)
    assert not path.direct  # the peer has not heard us: our packets may not get there


def test_switches_once_confirmed_both_ways() -> None:
    path = DirectPathState(0.0)
    path.on_packet(0.1, peer_hears_us=False)
    path.on_packet(0.15, peer_hears_us=True)
    assert path.direct and path.switches_to_direct == 1


def test_media_from_the_peer_confirms_the_path() -> None:
    path = DirectPathState(0.0)
    path.on_packet(0.2, peer_hears_us=True)  # the anchor passes True for direct media
    assert path.direct


def test_falls_back_after_one_second_of_silence() -> None:
    path = DirectPathState(0.0)
    path.on_packet(1.0, peer_hears_us=True)
    path.on_sent(1.0)
    assert path.direct
    assert path.get_timer() <= 1.0 + T.silence
    path.handle_timer(1.0 + T.silence - 0.001)
    assert path.direct
    # The silence deadline: back to the relay, and a probe at once (telling the peer).
    assert path.handle_timer(1.0 + T.silence) is True
    assert not path.direct and path.fallbacks == 1
    assert not path.hears_peer(1.0 + T.silence)


def test_falls_back_at_once_when_the_peer_no_longer_hears_us() -> None:
    path = DirectPathState(0.0)
    path.on_packet(0.1, peer_hears_us=True)
    assert path.direct
    # A one-way path: the peer's probes still come, but it says ours do not.
    path.on_packet(0.2, peer_hears_us=False)
    assert not path.direct and path.fallbacks == 1
    assert path.handle_timer(0.2) is True


def test_a_stale_probe_changes_nothing_but_being_heard() -> None:
    path = DirectPathState(0.0)
    path.on_packet(0.1, peer_hears_us=True)
    path.on_packet(0.2, peer_hears_us=None)  # reordered: its flag is older than the last one
    assert path.direct
    path.on_packet(0.3 + T.silence - 0.2, peer_hears_us=None)
    path.handle_timer(0.3 + T.silence - 0.2)
    assert path.direct  # it still counts as hearing the peer
    fresh = DirectPathState(0.0)
    fresh.on_packet(0.1, peer_hears_us=None)
    assert not fresh.direct and fresh.hears_peer(0.1)


def test_after_a_fallback_the_path_needs_confirming_again() -> None:
    path = DirectPathState(0.0)
    path.on_packet(0.1, peer_hears_us=True)
    path.handle_timer(0.1 + T.silence)
    assert not path.direct
    path.on_packet(3.0, peer_hears_us=False)
    assert not path.direct
    path.on_packet(3.05, peer_hears_us=True)
    assert path.direct and path.switches_to_direct == 2


def test_slow_probing_after_a_fallback() -> None:
    path = DirectPathState(0.0)
    path.on_packet(10.0, peer_hears_us=True)
    assert path.handle_timer(10.0 + T.silence)  # the fallback's probe
    assert path.get_timer() == pytest.approx(10.0 + T.silence + T.slow_interval)


def test_no_probes_while_media_flows_directly() -> None:
    path = DirectPathState(0.0)
    path.on_packet(0.0, peer_hears_us=True)
    probes = 0
    now = 0.0
    while now < 3.0:
        path.on_sent(now)  # our phone's packet goes directly every 20 ms
        path.on_packet(now, peer_hears_us=True)  # and the peer's comes
        probes += path.handle_timer(now)
        now += 0.02
    assert path.direct
    assert probes <= 1


def test_a_silent_phone_keeps_the_path_warm_with_probes() -> None:
    path = DirectPathState(0.0)
    path.on_packet(0.0, peer_hears_us=True)
    path.on_sent(0.0)
    sent = []
    now = 0.0
    while now < 2.0:
        if path.handle_timer(now):
            sent.append(now)
            path.on_sent(now)
        path.on_packet(now, peer_hears_us=True)  # the peer keeps talking
        now += 0.01
    assert path.direct
    # Every keep_interval or so, never longer than the peer's silence timeout.
    gaps = [b - a for a, b in zip([0.0, *sent], sent, strict=False)]
    assert sent and max(gaps) < T.silence


class PathMachine(RuleBasedStateMachine):
    """Every sequence of inputs: direct only while confirmed both ways and heard lately."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.path = DirectPathState(0.0)
        self.last_heard = -float("inf")
        self.last_flag = False

    @rule(dt=st.floats(0, 2.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        before = self.path.get_timer()
        probe = self.path.handle_timer(self.now)
        if probe:
            assert self.now >= before

    @rule(flag=st.sampled_from([True, False, None]))
    def packet(self, flag: bool | None) -> None:
        self.path.on_packet(self.now, peer_hears_us=flag)
        self.last_heard = self.now
        if flag is not None:
            self.last_flag = flag

    @rule()
    def sent(self) -> None:
        self.path.on_sent(self.now)

    @precondition(lambda self: self.path.direct)
    @rule()
    def timer_is_never_after_the_silence_deadline(self) -> None:
        assert self.path.get_timer() <= self.last_heard + T.silence

    @invariant()
    def direct_only_when_confirmed(self) -> None:
        if self.path.direct:
            assert self.last_flag
            assert self.now - self.last_heard < T.silence

    @invariant()
    def counts_agree(self) -> None:
        switches, fallbacks = self.path.switches_to_direct, self.path.fallbacks
        assert switches - fallbacks == (1 if self.path.direct else 0)


TestPathMachine = PathMachine.TestCase
TestPathMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# --- direct packets ---------------------------------------------------------------------------


@given(
    st.sampled_from([DIRECTION_DIRECT_OFFER, DIRECTION_DIRECT_ANSWER]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=300),
)
def test_direct_packets_round_trip(direction: int, leg: int, counter: int, data: bytes) -> None:
    packet = seal_direct(KEY, direction, leg, counter, data)
    assert peek_direction_untrusted(packet) == direction
    assert open_untrusted(KEY, packet, direction).payload == data


def test_the_two_sides_of_a_direct_path_never_share_a_nonce() -> None:
    a = seal_direct(KEY, DIRECTION_DIRECT_OFFER, 7, 0, b"x" * 40)
    b = seal_direct(KEY, DIRECTION_DIRECT_ANSWER, 7, 0, b"x" * 40)
    assert a[16:] != b[16:]
    with pytest.raises(WanPacketError) as info:
        open_untrusted(KEY, a, DIRECTION_DIRECT_ANSWER)  # a reflected packet
    assert info.value.defect is WanDefect.WRONG_DIRECTION


def test_seal_direct_takes_only_direct_directions() -> None:
    for direction in (DIRECTION_TO_RELAY, DIRECTION_FROM_RELAY, 4):
        with pytest.raises(ValueError):
            seal_direct(KEY, direction, 1, 0, b"")
    with pytest.raises(ValueError):
        seal(KEY, DIRECTION_DIRECT_OFFER, 1, 0, b"")


def test_the_relay_refuses_direct_packets() -> None:
    packet = seal_direct(KEY, DIRECTION_DIRECT_OFFER, 1, 0, b"audio")
    with pytest.raises(WanPacketError):
        open_untrusted(KEY, packet, DIRECTION_TO_RELAY)


@given(st.binary(max_size=64))
def test_peek_direction_raises_only_our_error(data: bytes) -> None:
    try:
        assert 0 <= peek_direction_untrusted(data) <= 255
    except WanPacketError:
        pass


# --- two anchors and the relay on loopback ------------------------------------------------

FAST = DirectPathTimers(
    fast_interval=0.01, fast_for=0.5, slow_interval=0.05, keep_interval=0.05, silence=0.3
)


class Firewalled(MediaAnchor):
    """An anchor whose WAN packets to `blocked` addresses are lost on the way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blocked: set[tuple[str, int]] = set()

    def _wan_send(self, packet: bytes, address: Any) -> None:
        if (address[0], address[1]) in self.blocked:
            return
        super()._wan_send(packet, address)


@pytest.fixture(autouse=True)
def close_phones() -> Iterator[None]:
    yield
    while Phone.opened:
        Phone.opened.pop().raw.close()


class Pair:
    """Two offices' anchors with one call, wired to one relay as the main host would."""

    def __init__(self, relay: MediaRelay, relay_address: tuple[str, int]) -> None:
        self.relay = relay
        self.relay_address = relay_address
        self.keys = {"a": os.urandom(32), "b": os.urandom(32)}
        self.anchors: dict[str, Firewalled] = {}
        self.media: dict[str, CallMedia] = {}
        self.phones: dict[str, Phone] = {}
        self.sequence = 0

    async def start(self, nursery: trio.Nursery) -> None:
        legs = {"a": self.relay.offer("c1", "a"), "b": self.relay.answer("c1", "b")}
        for name in ("a", "b"):
            anchor = Firewalled(LOOPBACK, wan_ip=LOOPBACK, direct_timers=FAST)
            await nursery.start(anchor.serve)
            media = await anchor.open_call("c1")
            phone = Phone()
            media.set_phone_target(*phone.address)
            media.set_wan(legs[name], self.relay_address, self.keys[name])
            self.anchors[name], self.media[name], self.phones[name] = anchor, media, phone

    def wan(self, name: str) -> tuple[str, int]:
        return (LOOPBACK, self.anchors[name].wan_port)

    async def direct_path(self) -> None:
        """What the main host does (mainhost.calls): both legs latched, DirectPath to both."""
        await wait_for(
            lambda: all(
                self.relay.query("c1")[role]["address"] is not None for role in ("offer", "answer")
            )
        )
        media = self.relay.query("c1")
        key = os.urandom(32)
        offer, answer = media["offer"], media["answer"]
        self.media["a"].set_direct(tuple(answer["address"]), answer["leg"], key, 2)
        self.media["b"].set_direct(tuple(offer["address"]), offer["leg"], key, 3)

    async def talk(self, packets: int = 5) -> None:
        """Each phone sends `packets` RTP packets; each must reach the other phone."""
        for _ in range(packets):
            self.sequence += 1
            for name in ("a", "b"):
                await self.phones[name].send(rtp(self.sequence), self.media[name])
            for name in ("a", "b"):
                data, _ = await self.phones[name].receive()
                assert parse_rtp_untrusted(data).sequence <= self.sequence
            await trio.sleep(0.005)

    async def babble(self) -> None:
        """Each phone sends one packet, and takes whatever came (some may be lost)."""
        self.sequence += 1
        for name in ("a", "b"):
            await self.phones[name].send(rtp(self.sequence), self.media[name])
        await trio.sleep(0.01)
        for name in ("a", "b"):
            self.phones[name].pending()

    def path(self, name: str) -> str:
        return self.media[name].media_path


async def open_pair(nursery: trio.Nursery) -> Pair:
    relay, address = await start_relay(nursery, {})
    pair = Pair(relay, address)
    relay._key_for = pair.keys.get
    await pair.start(nursery)
    return pair


async def test_two_anchors_switch_to_the_direct_path() -> None:
    async with trio.open_nursery() as nursery:
        pair = await open_pair(nursery)
        await pair.talk()  # through the relay, as before F4
        assert pair.path("a") == pair.path("b") == "relayed"
        assert pair.relay.statistics().forwarded >= 10
        await pair.direct_path()
        with trio.fail_after(5):
            while not (pair.path("a") == pair.path("b") == "direct"):
                await pair.talk(1)
        # From now on the relay forwards nothing: the audio goes host to host, both ways.
        forwarded = pair.relay.statistics().forwarded
        out = {n: pair.media[n].statistics().direct_packets_out for n in "ab"}
        await pair.talk(20)
        assert pair.relay.statistics().forwarded == forwarded
        for name in "ab":
            stats = pair.media[name].statistics()
            assert stats.media_path == "direct"
            assert stats.direct_packets_out == out[name] + 20
            assert stats.direct_packets_in >= 20
            assert stats.direct_probes_in > 0 and stats.direct_switches == 1
            assert stats.dropped_bad_auth == 0
        nursery.cancel_scope.cancel()


async def test_a_blocked_path_falls_back_to_the_relay_and_comes_back() -> None:
    async with trio.open_nursery() as nursery:
        pair = await open_pair(nursery)
        await pair.direct_path()
        with trio.fail_after(5):
            while not (pair.path("a") == pair.path("b") == "direct"):
                await pair.talk(1)
        # A's packets to B vanish from now on (B's NAT forgot the hole, a firewall rule).
        pair.anchors["a"].blocked.add(pair.wan("b"))
        with trio.fail_after(5):
            while not (pair.path("a") == pair.path("b") == "relayed"):
                await pair.babble()  # A's audio is lost until A falls back
        forwarded = pair.relay.statistics().forwarded
        await pair.talk(10)
        assert pair.relay.statistics().forwarded >= forwarded + 20  # the relay carries it all
        for name in "ab":
            assert pair.media[name].statistics().direct_fallbacks == 1
        # The path heals: slow probing finds it again, both ways confirmed, audio direct.
        pair.anchors["a"].blocked.clear()
        with trio.fail_after(5):
            while not (pair.path("a") == pair.path("b") == "direct"):
                await pair.talk(1)
        assert pair.media["a"].statistics().direct_switches == 2
        nursery.cancel_scope.cancel()


async def test_a_one_way_path_is_never_used() -> None:
    async with trio.open_nursery() as nursery:
        pair = await open_pair(nursery)
        # B's packets reach A, A's never reach B: A hears B, but B says it does not hear A.
        pair.anchors["a"].blocked.add(pair.wan("b"))
        await pair.direct_path()
        await wait_for(lambda: pair.media["a"].statistics().direct_probes_in >= 20)
        await pair.talk(10)
        assert pair.path("a") == pair.path("b") == "relayed"
        for name in "ab":
            stats = pair.media[name].statistics()
            assert stats.direct_switches == 0 and stats.direct_packets_out == 0
        assert pair.media["b"].statistics().direct_probes_in == 0
        nursery.cancel_scope.cancel()


async def test_direct_packets_under_another_key_are_dropped() -> None:
    async with trio.open_nursery() as nursery:
        pair = await open_pair(nursery)
        await pair.direct_path()
        with trio.fail_after(5):
            while not (pair.path("a") == pair.path("b") == "direct"):
                await pair.talk(1)
        before = pair.media["b"].statistics()
        leg_b = pair.relay.query("c1")["answer"]["leg"]
        forged = seal_direct(os.urandom(32), DIRECTION_DIRECT_OFFER, leg_b, 10**6, rtp(1))
        probe = seal_direct(os.urandom(32), DIRECTION_DIRECT_OFFER, leg_b, 10**6, b"\x00")
        pair.anchors["a"]._wan_send(forged, pair.wan("b"))
        pair.anchors["a"]._wan_send(probe[:20], pair.wan("b"))
        await wait_for(lambda: pair.media["b"].statistics().dropped_bad_auth >= 1)
        after = pair.media["b"].statistics()
        assert after.phone_packets_out == before.phone_packets_out
        assert after.media_path == "direct"  # a forgery changes nothing
        nursery.cancel_scope.cancel()


async def test_set_direct_refuses_a_bad_key_or_direction_and_ignores_a_repeat() -> None:
    async with trio.open_nursery() as nursery:
        pair = await open_pair(nursery)
        media = pair.media["a"]
        with pytest.raises(ValueError):
            media.set_direct(pair.wan("b"), 1, b"short", 2)
        with pytest.raises(ValueError):
            media.set_direct(pair.wan("b"), 1, KEY, 1)
        media.set_direct(pair.wan("b"), 1, KEY, 2)
        await wait_for(lambda: media.statistics().direct_probes_sent >= 3)
        sent = media._direct_tx
        media.set_direct(pair.wan("b"), 1, KEY, 2)  # the same DirectPath again: no restart
        assert media._direct_tx >= sent
        assert media.statistics().direct_peer == pair.wan("b")
        nursery.cancel_scope.cancel()


async def test_probes_carry_whether_we_hear_the_peer() -> None:
    async with trio.open_nursery() as nursery:
        pair = await open_pair(nursery)
        # A sniffer in B's place: what does A's probe say before and after hearing B?
        sniffer = Phone()
        leg = 77
        pair.media["a"].set_direct(sniffer.address, leg, KEY, DIRECTION_DIRECT_OFFER)
        data, _ = await sniffer.receive()
        first = open_untrusted(KEY, data, DIRECTION_DIRECT_OFFER)
        assert first.kind == KIND_KEEPALIVE and first.payload == b"\x00" and first.leg == leg
        leg_a = pair.relay.query("c1")["offer"]["leg"]
        hello = seal_direct(KEY, DIRECTION_DIRECT_ANSWER, leg_a, 0, b"\x00", kind=KIND_KEEPALIVE)
        sniffer.raw.sendto(hello, pair.wan("a"))
        with trio.fail_after(5):
            while True:
                data, _ = await sniffer.receive()
                if open_untrusted(KEY, data, DIRECTION_DIRECT_OFFER).payload == b"\x01":
                    break
        assert pair.path("a") == "relayed"  # we hear it, it has not said it hears us
        nursery.cancel_scope.cancel()


# --- the main host's side: when DirectPath goes out (mainhost.calls) --------------------------


class QueryRelay(FakeRelay):
    """The call router's fake relay, with `query` as mainhost.relay answers it."""

    def __init__(self) -> None:
        super().__init__()
        self.addresses: dict[str, tuple[str, int] | None] = {"berlin": None, "lisbon": None}
        self.media_in = 0

    def query(self, call_id: str) -> dict[str, Any]:
        if call_id not in self.legs:
            raise KeyError(call_id)
        (office_a, leg_a), (office_b, leg_b) = self.legs[call_id][:2]

        def leg(office: str, leg_id: int) -> dict[str, Any]:
            return {
                "leg": leg_id,
                "office": office,
                "address": self.addresses[office],
                "packets_in": self.media_in + 3,
                "keepalives_in": 3,
            }

        return {"call_id": call_id, "offer": leg(office_a, leg_a), "answer": leg(office_b, leg_b)}


NATS = {"berlin": "Restric Port NAT", "lisbon": "Full Cone"}


async def routed_call(nats: dict[str, str] | None = None) -> tuple[CallRouter, Net, QueryRelay]:
    router, net, _ = make()
    relay = QueryRelay()
    router.relay = relay
    types = NATS if nats is None else nats
    router.nat_type_of = lambda office: types.get(office, "unknown")
    await router.on_message("berlin", 1, CallSetup("c1", "2001", "3001", ["PCMU/8000"]))
    return router, net, relay


def direct_paths(net: Net, office: str) -> list[DirectPath]:
    return [m for _, m in net.to(office) if isinstance(m, DirectPath)]


async def test_direct_path_waits_for_both_addresses() -> None:
    router, net, relay = await routed_call()
    await router.check_direct_paths()
    relay.addresses["berlin"] = ("198.51.100.7", 40000)
    await router.check_direct_paths()
    assert direct_paths(net, "berlin") == direct_paths(net, "lisbon") == []


async def test_both_offices_get_the_other_address_one_key_and_their_direction() -> None:
    router, net, relay = await routed_call()
    relay.addresses.update(berlin=("198.51.100.7", 40000), lisbon=("203.0.113.9", 50000))
    await router.check_direct_paths()
    await router.check_direct_paths()  # nothing moved: not sent again
    [to_berlin], [to_lisbon] = direct_paths(net, "berlin"), direct_paths(net, "lisbon")
    legs = dict(relay.legs["c1"])
    assert (to_berlin.peer_ip, to_berlin.peer_port) == ("203.0.113.9", 50000)
    assert (to_lisbon.peer_ip, to_lisbon.peer_port) == ("198.51.100.7", 40000)
    assert to_berlin.peer_leg == legs["lisbon"] and to_lisbon.peer_leg == legs["berlin"]
    assert to_berlin.key == to_lisbon.key and len(to_berlin.key) == 32
    assert (to_berlin.direction, to_lisbon.direction) == (2, 3)
    # On the calls' own channels.
    channels = {c for c, m in net.to("berlin") if isinstance(m, DirectPath)}
    assert channels == {1}
    assert router.direct_offered == 1


async def test_a_moved_address_gets_a_new_direct_path_with_a_new_key() -> None:
    router, net, relay = await routed_call()
    relay.addresses.update(berlin=("198.51.100.7", 40000), lisbon=("203.0.113.9", 50000))
    await router.check_direct_paths()
    relay.addresses["lisbon"] = ("203.0.113.9", 50001)  # a NAT rebinding, a new login
    await router.check_direct_paths()
    first, second = direct_paths(net, "berlin")
    assert second.peer_port == 50001 and second.key != first.key


@pytest.mark.parametrize(
    "nat", ["Symmetric NAT", "unknown", "Blocked", "Symmetric UDP Firewall", "error"]
)
async def test_hopeless_nat_types_get_no_direct_path(nat: str) -> None:
    router, net, relay = await routed_call({"berlin": "Full Cone", "lisbon": nat})
    relay.addresses.update(berlin=("198.51.100.7", 40000), lisbon=("203.0.113.9", 50000))
    await router.check_direct_paths()
    assert direct_paths(net, "berlin") == direct_paths(net, "lisbon") == []
    bridge = router.live_calls()[0]
    assert bridge.direct_skipped == f"office lisbon's NAT: {nat}"
    assert bridge.media_path == "relayed"


async def test_a_nat_type_learned_later_allows_the_direct_path() -> None:
    types = {"berlin": "Full Cone", "lisbon": "unknown"}
    router, net, relay = await routed_call(types)
    relay.addresses.update(berlin=("198.51.100.7", 40000), lisbon=("203.0.113.9", 50000))
    await router.check_direct_paths()
    assert direct_paths(net, "lisbon") == []
    types["lisbon"] = "Restric NAT"  # its STUN probe ended
    await router.check_direct_paths()
    assert len(direct_paths(net, "lisbon")) == 1
    assert router.live_calls()[0].direct_skipped == ""


async def test_switched_off_means_relayed_only() -> None:
    router, net, relay = await routed_call()
    router.direct_media = False
    relay.addresses.update(berlin=("198.51.100.7", 40000), lisbon=("203.0.113.9", 50000))
    await router.check_direct_paths()
    assert direct_paths(net, "berlin") == []
    assert router.live_calls()[0].direct_skipped == "direct media is off"
    router.direct_media = True  # switched on during the call: offered at the next check
    await router.check_direct_paths()
    assert len(direct_paths(net, "berlin")) == 1


async def test_media_path_follows_the_relays_counters() -> None:
    router, _, relay = await routed_call()
    relay.addresses.update(berlin=("198.51.100.7", 40000), lisbon=("203.0.113.9", 50000))
    bridge = router.live_calls()[0]
    relay.media_in = 50
    await router.check_direct_paths()
    assert bridge.media_path == "relayed"  # offered just now; audio still at the relay
    relay.media_in = 80
    await router.check_direct_paths()
    assert bridge.media_path == "relayed"
    await router.check_direct_paths()  # no more media at the relay since the last check
    assert bridge.media_path == "direct"
    relay.media_in = 81  # a fallback: media at the relay again
    await router.check_direct_paths()
    assert bridge.media_path == "relayed"


async def test_a_relay_without_query_gets_no_direct_paths() -> None:
    router, net, _ = make()
    router.nat_type_of = NATS.__getitem__
    await router.on_message("berlin", 1, CallSetup("c1", "2001", "3001", ["PCMU/8000"]))
    await router.check_direct_paths()
    assert direct_paths(net, "berlin") == []


async def test_an_ended_call_is_not_checked() -> None:
    router, net, relay = await routed_call()
    relay.addresses.update(berlin=("198.51.100.7", 40000), lisbon=("203.0.113.9", 50000))
    del relay.legs["c1"]  # the relay forgot the call first
    await router.check_direct_paths()
    assert direct_paths(net, "berlin") == []


async def test_junk_tagged_with_our_leg_changes_nothing() -> None:
    async with trio.open_nursery() as nursery:
        pair = await open_pair(nursery)
        await pair.direct_path()
        with trio.fail_after(5):
            while not (pair.path("a") == pair.path("b") == "direct"):
                await pair.talk(1)
        leg_b = pair.relay.query("c1")["answer"]["leg"]
        rng = random.Random(4)
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for n in range(300):
                body = rng.randbytes(rng.randrange(0, 120))
                header = bytes([rng.choice([1, 2, 9]), rng.choice([0, 1, 2, 3, 7]), 0, 0])
                packet = header + leg_b.to_bytes(4, "big") + body if n % 3 else body
                junk.sendto(packet, pair.wan("b"))
        finally:
            junk.close()
        await wait_for(lambda: pair.anchors["b"].statistics().received >= 300)
        await pair.talk(5)  # still direct, both ways, and nothing of the junk reached a phone
        assert pair.path("a") == pair.path("b") == "direct"
        assert pair.media["b"].statistics().direct_peer == pair.wan("a")
        nursery.cancel_scope.cancel()
