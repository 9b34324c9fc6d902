"""mainhost.relay on loopback: the control API, the packet path, attacks, re-keying, bursts.

The two offices are played by plain UDP sockets that seal and open packets themselves
(`FakeOffice`), so every byte the relay sees is chosen by the test. Where a test must show that
nothing was forwarded, it sends a good packet afterwards and waits for it: the relay handles its
one receive queue in order, so anything forwarded earlier would have arrived first.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from mainhost.relay import MediaRelay, RelayStatistics
from shared.media.rtp import RtpPacket
from shared.media.wan import (
    DIRECTION_FROM_RELAY,
    DIRECTION_TO_RELAY,
    KIND_KEEPALIVE,
    KIND_MEDIA,
    WanPacket,
    WanPacketError,
    open_untrusted,
    seal,
    seal_keepalive,
)

LOOPBACK = "127.0.0.1"


def rtp(sequence: int, ssrc: int = 0x5151, size: int = 160) -> bytes:
    return RtpPacket(
        payload_type=0,
        sequence=sequence & 0xFFFF,
        timestamp=sequence * 160,
        ssrc=ssrc,
        payload=bytes([sequence & 0xFF]) * size,
    ).encode()


async def start_relay(
    nursery: trio.Nursery, keys: dict[str, bytes], **kwargs: Any
) -> tuple[MediaRelay, tuple[str, int]]:
    relay = MediaRelay(keys.get, **kwargs)
    address: tuple[str, int] = await nursery.start(relay.serve, (LOOPBACK, 0))
    return relay, address


class FakeOffice:
    """An office's WAN side as the relay sees it: one UDP socket, a key, a leg, counters."""

    opened: list[FakeOffice] = []  # closed after each test by the `close_offices` fixture

    def __init__(self, key: bytes, leg: int, relay: tuple[str, int]) -> None:
        self.key = key
        self.leg = leg
        self.relay = relay
        self.counter = 0
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock = trio.socket.from_stdlib_socket(self.raw)
        FakeOffice.opened.append(self)

    async def bind(self) -> FakeOffice:
        await self.sock.bind((LOOPBACK, 0))
        return self

    @property
    def address(self) -> tuple[str, int]:
        name = self.sock.getsockname()
        return (name[0], name[1])

    def seal(self, payload: bytes, *, kind: int = KIND_MEDIA) -> bytes:
        packet = seal(self.key, DIRECTION_TO_RELAY, self.leg, self.counter, payload, kind=kind)
        self.counter += 1
        return packet

    async def send_raw(self, packet: bytes) -> None:
        await self.sock.sendto(packet, self.relay)

    async def send(self, payload: bytes) -> bytes:
        packet = self.seal(payload)
        await self.send_raw(packet)
        return packet

    async def keepalive(self) -> bytes:
        packet = self.seal(b"", kind=KIND_KEEPALIVE)
        await self.send_raw(packet)
        return packet

    async def receive_raw(self) -> bytes:
        with trio.fail_after(5):
            data: bytes = await self.sock.recv(4096)
        return data

    async def receive(self) -> WanPacket:
        return open_untrusted(self.key, await self.receive_raw(), DIRECTION_FROM_RELAY)

    def close(self) -> None:
        # The stdlib socket, so that a synchronous fixture can close it after the test.
        self.raw.close()


async def call_between(
    relay: MediaRelay, address: tuple[str, int], keys: dict[str, bytes], call_id: str = "c1"
) -> tuple[FakeOffice, FakeOffice]:
    """Offer from office a, answer from office b, both latched by a keepalive."""
    a = await FakeOffice(keys["a"], relay.offer(call_id, "a"), address).bind()
    b = await FakeOffice(keys["b"], relay.answer(call_id, "b"), address).bind()
    await a.keepalive()
    await b.keepalive()
    await wait_for(lambda: relay.statistics().keepalives >= 2)
    return a, b


async def wait_for(condition: Any, timeout: float = 5) -> None:
    """Poll a condition at trio's pace (a hang guard only, nothing is timed)."""
    with trio.fail_after(timeout):
        while True:
            if condition():
                return
            await trio.sleep(0.001)


@pytest.fixture(autouse=True)
def close_offices() -> Iterator[None]:
    yield
    while FakeOffice.opened:
        FakeOffice.opened.pop().close()


@pytest.fixture
def keys() -> dict[str, bytes]:
    return {"a": os.urandom(32), "b": os.urandom(32)}


# -- control API ------------------------------------------------------------------------------


def test_offer_and_answer_give_two_legs(keys: dict[str, bytes]) -> None:
    relay = MediaRelay(keys.get)
    offer = relay.offer("c1", "a")
    answer = relay.answer("c1", "b")
    assert offer != answer
    assert relay.offer("c1", "a") == offer
    assert relay.answer("c1", "b") == answer
    report = relay.query("c1")
    assert report["call_id"] == "c1"
    assert report["offer"]["leg"] == offer
    assert report["offer"]["office"] == "a"
    assert report["offer"]["address"] is None
    assert report["answer"]["leg"] == answer
    assert relay.statistics().calls == 1
    assert relay.statistics().legs == 2


def test_answer_needs_an_offer(keys: dict[str, bytes]) -> None:
    relay = MediaRelay(keys.get)
    with pytest.raises(KeyError):
        relay.answer("nope", "b")
    with pytest.raises(KeyError):
        relay.query("nope")
    relay.delete("nope")  # deleting an unknown call is harmless


def test_offer_from_another_office_is_refused(keys: dict[str, bytes]) -> None:
    relay = MediaRelay(keys.get)
    relay.offer("c1", "a")
    with pytest.raises(ValueError):
        relay.offer("c1", "b")


def test_answer_from_another_office_replaces_the_answer_leg(keys: dict[str, bytes]) -> None:
    relay = MediaRelay(keys.get)
    relay.offer("c1", "a")
    first = relay.answer("c1", "b")
    second = relay.answer("c1", "c")
    assert first != second
    assert relay.query("c1")["answer"]["office"] == "c"
    assert relay.statistics().legs == 2


def test_delete_forgets_both_legs(keys: dict[str, bytes]) -> None:
    relay = MediaRelay(keys.get)
    relay.offer("c1", "a")
    relay.answer("c1", "b")
    relay.delete("c1")
    assert relay.statistics().calls == 0
    assert relay.statistics().legs == 0
    with pytest.raises(KeyError):
        relay.query("c1")


def test_leg_ids_are_never_reused(keys: dict[str, bytes]) -> None:
    relay = MediaRelay(keys.get)
    seen: set[int] = set()
    for number in range(500):
        seen.add(relay.offer(f"c{number}", "a"))
        seen.add(relay.answer(f"c{number}", "b"))
        relay.delete(f"c{number}")
    assert len(seen) == 1000
    assert 0 not in seen


def test_leg_ids_wrap_and_skip_live_ones(keys: dict[str, bytes]) -> None:
    relay = MediaRelay(keys.get)
    relay._next_leg = 0xFFFFFFFF
    first = relay.offer("c1", "a")
    second = relay.answer("c1", "b")
    assert (first, second) == (0xFFFFFFFF, 1)  # 0 is skipped
    relay._next_leg = first
    assert relay.offer("c2", "a") == 2


# -- the packet path --------------------------------------------------------------------------


async def test_media_flows_both_ways(nursery: trio.Nursery, keys: dict[str, bytes]) -> None:
    relay, address = await start_relay(nursery, keys)
    a, b = await call_between(relay, address, keys)
    for sequence in range(20):
        await a.send(rtp(sequence))
        got = await b.receive()
        assert got == WanPacket(b.leg, sequence, KIND_MEDIA, rtp(sequence))
        await b.send(rtp(1000 + sequence, ssrc=7))
        back = await a.receive()
        assert back.payload == rtp(1000 + sequence, ssrc=7)
        assert back.leg == a.leg
    report = relay.query("c1")
    assert report["offer"]["address"] == a.address
    assert report["answer"]["address"] == b.address
    assert report["offer"]["packets_in"] == 21  # with the keepalive
    assert report["offer"]["keepalives_in"] == 1
    assert report["offer"]["packets_out"] == 20
    assert report["answer"]["packets_out"] == 20
    assert report["offer"]["bytes_in"] == 20 * (len(rtp(0)) + 32) + 32
    assert relay.statistics().forwarded == 40


async def test_relay_reseals_with_its_own_counter_per_leg(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, address = await start_relay(nursery, keys)
    a, b = await call_between(relay, address, keys)
    a.counter = 10_000  # the sender's counter is not copied through
    await a.send(rtp(1))
    await a.send(rtp(2))
    assert (await b.receive()).counter == 0
    assert (await b.receive()).counter == 1


async def test_media_before_the_other_side_is_known_is_unrouted(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, address = await start_relay(nursery, keys)
    a = await FakeOffice(keys["a"], relay.offer("c1", "a"), address).bind()
    await a.send(rtp(1))
    b = await FakeOffice(keys["b"], relay.answer("c1", "b"), address).bind()
    await a.send(rtp(2))
    await wait_for(lambda: relay.statistics().unrouted == 2)
    await b.keepalive()
    await a.send(rtp(3))
    assert (await b.receive()).payload == rtp(3)
    assert relay.query("c1")["offer"]["unrouted"] == 2


async def test_a_logged_out_office_has_no_key(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, address = await start_relay(nursery, keys)
    a, b = await call_between(relay, address, keys)
    del keys["b"]
    await a.send(rtp(1))  # unrouted: nothing to seal for b with
    await b.send(rtp(2))  # dropped: b's leg has no key
    await wait_for(lambda: relay.statistics().dropped_no_key == 1)
    await wait_for(lambda: relay.statistics().unrouted == 1)
    assert relay.query("c1")["answer"]["drops"]["no_key"] == 1


async def test_deleted_call_is_an_unknown_leg(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, address = await start_relay(nursery, keys)
    a, _b = await call_between(relay, address, keys)
    relay.delete("c1")
    await a.send(rtp(1))
    await wait_for(lambda: relay.statistics().dropped_unknown_leg == 1)
    assert relay.statistics().forwarded == 0


async def test_two_calls_of_one_office_are_kept_apart(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, address = await start_relay(nursery, keys)
    a1, b1 = await call_between(relay, address, keys, "c1")
    a2, b2 = await call_between(relay, address, keys, "c2")
    await a1.send(rtp(1, ssrc=1))
    await a2.send(rtp(1, ssrc=2))
    first = await b1.receive()
    second = await b2.receive()
    assert first.payload == rtp(1, ssrc=1)
    assert second.payload == rtp(1, ssrc=2)
    # Same key, same counter: only the per-leg keys keep the ciphertexts apart.
    assert first.counter == second.counter == 0


# -- attacks: dropped, counted, and no address moves ------------------------------------------


async def test_unauthentic_packets_are_dropped_counted_and_move_nothing(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, address = await start_relay(nursery, keys)
    a, b = await call_between(relay, address, keys)
    good = await a.send(rtp(1))
    assert (await b.receive()).payload == rtp(1)
    await b.send(rtp(2))
    to_a = await a.receive_raw()

    attacker = await FakeOffice(keys["a"], a.leg, address).bind()
    rng = random.Random(1)
    flipped = bytearray(good)
    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    wrong_key = seal(keys["b"], DIRECTION_TO_RELAY, a.leg, 99, rtp(3))
    wrong_direction = to_a  # the relay's own packet for a, sent back at it
    unknown_leg = seal(keys["a"], DIRECTION_TO_RELAY, a.leg ^ 0x5555, 0, rtp(4))
    for packet in [
        os.urandom(10),  # too short
        os.urandom(200),  # random: an unknown leg, almost surely
        bytes(flipped),
        good,  # a replay
        wrong_key,
        wrong_direction,
        unknown_leg,
    ]:
        await attacker.send_raw(packet)
    # The marker: only this one may reach b.
    await a.send(rtp(5))
    assert (await b.receive()).payload == rtp(5)

    stats = relay.statistics()
    assert stats.dropped_malformed == 1
    assert stats.dropped_unknown_leg == 2
    assert stats.dropped_bad_tag == 2
    assert stats.dropped_replay == 1
    assert stats.dropped_wrong_direction == 1
    assert stats.address_changes == 2  # a and b, once each
    report = relay.query("c1")
    assert report["offer"]["address"] == a.address
    assert report["answer"]["address"] == b.address
    assert report["offer"]["drops"] == {
        "bad_tag": 2,
        "replay": 1,
        "wrong_direction": 1,  # the relay's packet for a carries a's leg
        "malformed": 0,
        "no_key": 0,
    }
    assert report["answer"]["drops"]["wrong_direction"] == 0
    # And the attacker was never sent anything.
    with pytest.raises(BlockingIOError):
        attacker.raw.recv(4096)


async def test_a_replayed_keepalive_from_elsewhere_does_not_steal_the_leg(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    # RTP bleed: someone who captured a's keepalive replays it from their own address to have
    # b's audio sent to them.
    relay, address = await start_relay(nursery, keys)
    a, b = await call_between(relay, address, keys)
    captured = await a.keepalive()
    await wait_for(lambda: relay.query("c1")["offer"]["keepalives_in"] == 2)
    thief = await FakeOffice(keys["a"], a.leg, address).bind()
    await thief.send_raw(captured)
    await wait_for(lambda: relay.statistics().dropped_replay == 1)
    await b.send(rtp(1))
    assert (await a.receive()).payload == rtp(1)
    assert relay.query("c1")["offer"]["address"] == a.address


async def test_reordered_packets_within_the_window_pass(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, address = await start_relay(nursery, keys)
    a, b = await call_between(relay, address, keys)
    packets = [a.seal(rtp(n)) for n in range(30)]
    order = list(range(30))
    random.Random(7).shuffle(order)
    for index in order:
        await a.send_raw(packets[index])
    received = {(await b.receive()).payload for _ in range(30)}
    assert received == {rtp(n) for n in range(30)}
    for index in order[:5]:
        await a.send_raw(packets[index])
    await wait_for(lambda: relay.statistics().dropped_replay == 5)


# -- re-keying --------------------------------------------------------------------------------


async def test_rekey_with_new_address_resumes_at_once(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, address = await start_relay(nursery, keys)
    a, b = await call_between(relay, address, keys)
    await a.send(rtp(1))
    assert (await b.receive()).payload == rtp(1)

    # Office a logs in again from a new public address: new key, new source port, and its
    # counter may start again at 0.
    old_key = keys["a"]
    keys["a"] = os.urandom(32)
    moved = await FakeOffice(keys["a"], a.leg, address).bind()
    # Late packets under the old key, from the old and the new address: refused, nothing moves.
    await a.send(rtp(2))
    stale = seal(old_key, DIRECTION_TO_RELAY, a.leg, 500, rtp(3))
    await moved.send_raw(stale)
    await wait_for(lambda: relay.statistics().dropped_bad_tag == 2)
    assert relay.query("c1")["offer"]["address"] == a.address

    await moved.send(rtp(4))  # counter 0 again, under the new key
    assert (await b.receive()).payload == rtp(4)
    assert relay.query("c1")["offer"]["address"] == moved.address
    await b.send(rtp(5))
    got = await moved.receive()  # sealed with the new key at once
    assert got.payload == rtp(5)
    with pytest.raises(WanPacketError):
        open_untrusted(old_key, seal(keys["a"], 1, a.leg, 0, b"x"), DIRECTION_FROM_RELAY)
    assert relay.statistics().address_changes == 3


# -- bursts, DSCP -----------------------------------------------------------------------------


async def test_a_burst_is_drained_in_few_wakeups(
    nursery: trio.Nursery, keys: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    wakeups = 0
    real_wait = trio.lowlevel.wait_readable

    async def counting_wait(sock: Any) -> None:
        nonlocal wakeups
        if sock is relay._sock:
            wakeups += 1
        await real_wait(sock)

    relay, address = await start_relay(nursery, keys)
    a, b = await call_between(relay, address, keys)
    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait)
    await a.send(rtp(0))  # the loop is now waiting in counting_wait
    assert (await b.receive()).payload == rtp(0)
    before = wakeups
    burst = 60
    for sequence in range(1, burst + 1):
        # The plain socket's sendto never yields: the whole burst is queued before the relay
        # task runs again.
        a.raw.sendto(a.seal(rtp(sequence, size=20)), address)
    for sequence in range(1, burst + 1):
        assert (await b.receive()).payload == rtp(sequence, size=20)
    assert wakeups - before <= 3


async def test_relay_socket_is_marked_expedited_forwarding(keys: dict[str, bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        async with trio.open_nursery() as nursery:
            relay = MediaRelay(keys.get)
            address = await nursery.start(relay.serve, sock)
            assert address == sock.getsockname()
            assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0xB8
            nursery.cancel_scope.cancel()
        # A socket passed in stays open: it is the caller's.
        assert sock.fileno() != -1


async def test_a_socket_the_relay_binds_has_room_for_a_pause(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, _ = await start_relay(nursery, keys)
    assert relay._sock is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert relay._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > default


async def test_ipv6_relay_sets_traffic_class(keys: dict[str, bytes]) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    relay = MediaRelay(keys.get)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(relay.serve, ("::1", 0))
        assert host == "::1"
        assert relay._sock is not None
        assert relay._sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS) == 0xB8
        # And it relays over IPv6.
        relay.offer("c1", "a")
        leg_b = relay.answer("c1", "b")
        with trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as b:
            await b.bind(("::1", 0))
            await b.sendto(seal_keepalive(keys["b"], 0, leg_b, 0), (host, port))
            await wait_for(lambda: relay.statistics().keepalives == 1)
        nursery.cancel_scope.cancel()
    assert relay._sock is None


# -- the packet path as a model (no sockets) --------------------------------------------------


class RecordingSocket:
    """Stands in for the relay's socket: hands out queued datagrams, records what is sent.

    `full` sends raise BlockingIOError (a full send buffer), as a non-blocking socket's would.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.queued: list[tuple[bytes, Any]] = []
        self.full = 0

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        if not self.queued:
            raise BlockingIOError
        data, source = self.queued.pop(0)
        return data[:size], source

    def sendto(self, data: bytes, address: Any) -> int:
        if self.full:
            self.full -= 1
            raise BlockingIOError
        self.sent.append((data, address))
        return len(data)


def relay_datagram(relay: MediaRelay, sock: RecordingSocket, data: bytes, source: Any) -> None:
    """One datagram through the relay's real receive path (`_drain`), without a socket."""
    sock.queued.append((data, source))
    more = relay._drain(sock)  # type: ignore[arg-type]
    assert not more and not sock.queued


def _drops(stats: RelayStatistics) -> int:
    return (
        stats.dropped_malformed
        + stats.dropped_unknown_leg
        + stats.dropped_bad_tag
        + stats.dropped_replay
        + stats.dropped_wrong_direction
    )


KINDS_OF_PACKET = ["media", "keepalive", "replay", "flip", "other_key", "reflected", "junk"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(KINDS_OF_PACKET), st.integers(0, 2)),
        max_size=40,
    ),
    st.randoms(use_true_random=False),
)
def test_packet_path_matches_a_model(steps: list[tuple[str, str, int]], rng: random.Random) -> None:
    keys = {"a": bytes(range(32)), "b": bytes(range(100, 132))}
    relay = MediaRelay(keys.get)
    legs = {"a": relay.offer("c1", "a"), "b": relay.answer("c1", "b")}
    peer = {"a": "b", "b": "a"}
    role = {"a": "offer", "b": "answer"}
    sock = RecordingSocket()
    counters = {"a": 0, "b": 0}
    accepted: dict[str, list[bytes]] = {"a": [], "b": []}
    address: dict[str, Any] = {"a": None, "b": None}
    tx = {"a": 0, "b": 0}
    forwarded = 0
    for office, kind, source_index in steps:
        source = (LOOPBACK, 40000 + source_index)
        leg = legs[office]
        good = kind in ("media", "keepalive")
        if kind == "media" or kind == "keepalive":
            payload = rtp(counters[office]) if kind == "media" else b""
            packet = seal(
                keys[office],
                DIRECTION_TO_RELAY,
                leg,
                counters[office],
                payload,
                kind=KIND_MEDIA if kind == "media" else KIND_KEEPALIVE,
            )
            counters[office] += 1
        elif kind == "replay" and accepted[office]:
            packet = rng.choice(accepted[office])
        elif kind == "flip" and accepted[office]:
            flipped = bytearray(rng.choice(accepted[office]))
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            packet = bytes(flipped)
        elif kind == "other_key":
            packet = seal(keys[peer[office]], DIRECTION_TO_RELAY, leg, 10**9, rtp(0))
        elif kind == "reflected":
            packet = seal(keys[office], DIRECTION_FROM_RELAY, leg, 10**9, rtp(0))
        else:
            packet = rng.randbytes(rng.randrange(0, 80))
        before = relay.statistics()
        sent_before = len(sock.sent)
        relay_datagram(relay, sock, packet, source)
        after = relay.statistics()
        assert after.received == before.received + 1
        if good:
            accepted[office].append(packet)
            address[office] = source
            other = peer[office]
            if kind == "media" and address[other] is not None:
                forwarded += 1
                data, to = sock.sent[-1]
                assert to == address[other]
                opened = open_untrusted(keys[other], data, DIRECTION_FROM_RELAY)
                assert opened.leg == legs[other]
                assert opened.counter == tx[other]
                assert opened.payload == payload
                tx[other] += 1
        else:
            # Whatever it was, it was dropped and counted, and nothing moved.
            assert len(sock.sent) == sent_before
            assert _drops(after) == _drops(before) + 1
        report = relay.query("c1")
        for name in ("a", "b"):
            assert report[role[name]]["address"] == address[name]
        assert len(sock.sent) == forwarded
        stats = relay.statistics()
        assert stats.received == (
            stats.forwarded
            + stats.keepalives
            + stats.unrouted
            + stats.dropped_malformed
            + stats.dropped_unknown_leg
            + stats.dropped_bad_tag
            + stats.dropped_replay
            + stats.dropped_wrong_direction
            + stats.dropped_no_key
        )


async def test_a_key_of_the_wrong_size_counts_as_no_key(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, address = await start_relay(nursery, keys)
    a, b = await call_between(relay, address, keys)
    keys["a"] = b"not 32 bytes"
    await a.send(rtp(1))
    await b.send(rtp(2))
    await wait_for(lambda: relay.statistics().dropped_no_key == 1)
    await wait_for(lambda: relay.statistics().unrouted == 1)
    # The relay is still serving.
    keys["a"] = a.key
    await a.send(rtp(3))
    assert (await b.receive()).payload == rtp(3)


# -- a full send buffer ------------------------------------------------------------------------


class StallingSocket(socket.socket):
    """A UDP socket whose next `stalls` sends find no room (EAGAIN), as under a burst."""

    stalls = 0
    refused = 0

    def sendto(self, data: Any, *args: Any) -> int:
        if self.stalls:
            self.stalls -= 1
            self.refused += 1
            raise BlockingIOError
        return super().sendto(data, *args)


async def test_a_full_send_buffer_is_waited_out_and_nothing_is_lost(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    sock = StallingSocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    try:
        relay = MediaRelay(keys.get)
        address = await nursery.start(relay.serve, sock)
        a, b = await call_between(relay, address, keys)
        sock.stalls = 3
        for sequence in range(5):
            a.raw.sendto(a.seal(rtp(sequence)), address)
        for sequence in range(5):
            # In order: the relay read nothing more while a packet waited for room.
            assert (await b.receive()).payload == rtp(sequence)
        assert sock.refused == 3
        stats = relay.statistics()
        assert stats.forwarded == 5
        assert stats.send_failures == 0
    finally:
        sock.close()


async def test_a_send_buffer_that_stays_full_drops_and_counts(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    sock = StallingSocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    try:
        relay = MediaRelay(keys.get)
        address = await nursery.start(relay.serve, sock)
        a, b = await call_between(relay, address, keys)
        sock.stalls = 10**9
        await a.send(rtp(1))
        await wait_for(lambda: relay.statistics().send_failures == 1)
        assert relay.statistics().forwarded == 0
        # The relay goes on: once there is room again, media flows.
        sock.stalls = 0
        await a.send(rtp(2))
        assert (await b.receive()).payload == rtp(2)
        assert relay.query("c1")["answer"]["packets_out"] == 1
    finally:
        sock.close()
