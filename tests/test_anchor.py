"""remotehost.anchor with mainhost.relay on loopback: two offices' anchors, one relay, phones.

The phones are plain UDP sockets that send RTP (shared.media.rtp). Where a test needs to see or
spoil the WAN path between an anchor and the relay, it puts a small UDP proxy there
(`WanPath`): like a NAT, it has one socket facing the anchor and one facing the relay, so the
relay sees the proxy's address, and `rebind()` gives it a new public port. With a seed it
drops, duplicates and reorders packets ("terrible network").
"""

from __future__ import annotations

import functools
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from mainhost.relay import MediaRelay
from remotehost import anchor as anchor_module
from remotehost.anchor import CallMedia, MediaAnchor
from shared.media.rtp import parse_rtp_untrusted
from shared.media.wan import (
    DIRECTION_FROM_RELAY,
    DIRECTION_TO_RELAY,
    KIND_KEEPALIVE,
    WanPacket,
    open_untrusted,
    seal,
)
from tests.test_relay import LOOPBACK, rtp, start_relay, wait_for

Address = tuple[str, int]


class Phone:
    """A phone's RTP socket on the office LAN."""

    opened: list[Phone] = []

    def __init__(self) -> None:
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.raw.bind((LOOPBACK, 0))
        self.sock = trio.socket.from_stdlib_socket(self.raw)
        Phone.opened.append(self)

    @property
    def address(self) -> Address:
        name = self.raw.getsockname()
        return (name[0], name[1])

    async def send(self, data: bytes, media: CallMedia) -> None:
        await self.sock.sendto(data, (LOOPBACK, media.local_port))

    async def receive(self) -> tuple[bytes, Address]:
        with trio.fail_after(5):
            data, source = await self.sock.recvfrom(4096)
        return data, (source[0], source[1])

    def pending(self) -> list[bytes]:
        """Everything already queued, without waiting."""
        out = []
        while True:
            try:
                out.append(self.raw.recv(4096))
            except BlockingIOError:
                return out


@dataclass
class PathCounts:
    seen: int = 0
    dropped: int = 0
    delivered: int = 0
    """Distinct packets passed on."""
    duplicates: int = 0
    """Extra copies passed on."""
    reordered: int = 0


class WanPath:
    """A UDP proxy between one anchor and the relay, NAT-like, optionally terrible."""

    def __init__(
        self,
        relay: Address,
        *,
        seed: int = 0,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
    ) -> None:
        self.relay = relay
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.inner_raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.inner_raw.bind((LOOPBACK, 0))
        self.inner = trio.socket.from_stdlib_socket(self.inner_raw)
        self.outer_raw = self._outer()
        self.anchor: Any = None
        self.captured_up: list[bytes] = []
        self.captured_down: list[bytes] = []
        self.up = PathCounts()
        self.down = PathCounts()
        self._rng = {"up": random.Random(seed), "down": random.Random(seed + 1)}
        self._held: dict[str, list[tuple[bytes, Any]]] = {"up": [], "down": []}
        self._outer_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._closed: list[socket.socket] = []

    @staticmethod
    def _outer() -> socket.socket:
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind((LOOPBACK, 0))
        return raw

    @property
    def address(self) -> Address:
        """Where the anchor sends (its idea of the relay)."""
        name = self.inner_raw.getsockname()
        return (name[0], name[1])

    @property
    def public(self) -> Address:
        """Where the relay sees the office (its idea of our NAT's public address)."""
        name = self.outer_raw.getsockname()
        return (name[0], name[1])

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._inner_loop)
            nursery.start_soon(self._outer_loop, self._outer_scope, self.outer_raw)
            task_status.started()

    def rebind(self) -> None:
        """A NAT rebinding: from now on the office is seen from a new public port."""
        assert self._nursery is not None
        self._outer_scope.cancel()
        self._closed.append(self.outer_raw)
        self.outer_raw = self._outer()
        self._outer_scope = trio.CancelScope()
        self._nursery.start_soon(self._outer_loop, self._outer_scope, self.outer_raw)

    def close(self) -> None:
        for raw in [self.inner_raw, self.outer_raw, *self._closed]:
            raw.close()

    def flush(self) -> None:
        """Stop reordering and send what it held back (nothing else would push it out)."""
        self.reorder = 0.0
        for direction in ("up", "down"):
            for data, send in self._held[direction]:
                send(data)
            self._held[direction].clear()

    async def _inner_loop(self) -> None:
        while True:
            data, source = await self.inner.recvfrom(4096)
            self.anchor = source
            self.captured_up.append(data)
            self._impair("up", data, lambda d: self.outer_raw.sendto(d, self.relay))

    async def _outer_loop(self, scope: trio.CancelScope, raw: socket.socket) -> None:
        sock = trio.socket.from_stdlib_socket(raw)
        with scope:
            while True:
                data = await sock.recv(4096)
                self.captured_down.append(data)
                if self.anchor is not None:
                    send = functools.partial(self._send_inner, to=self.anchor)
                    self._impair("down", data, send)

    def _send_inner(self, data: bytes, *, to: Any) -> None:
        self.inner_raw.sendto(data, to)

    def _impair(self, direction: str, data: bytes, send: Any) -> None:
        rng = self._rng[direction]
        counts = self.up if direction == "up" else self.down
        counts.seen += 1
        if rng.random() < self.loss:
            counts.dropped += 1
            return
        copies = 2 if rng.random() < self.duplicate else 1
        counts.delivered += 1
        counts.duplicates += copies - 1
        held = self._held[direction]
        if rng.random() < self.reorder and not held:
            # Overtaken by the next packet.
            counts.reordered += 1
            held.extend([(data, send)] * copies)
            return
        for _ in range(copies):
            send(data)
        for late, late_send in held:
            late_send(late)
        held.clear()


@dataclass
class Office:
    name: str
    anchor: MediaAnchor
    media: CallMedia
    phone: Phone
    path: WanPath | None


@pytest.fixture(autouse=True)
def close_sockets() -> Iterator[list[WanPath]]:
    paths: list[WanPath] = []
    yield paths
    while Phone.opened:
        Phone.opened.pop().raw.close()
    for path in paths:
        path.close()


@pytest.fixture
def keys() -> dict[str, bytes]:
    return {"a": os.urandom(32), "b": os.urandom(32)}


async def start_anchor(nursery: trio.Nursery, **kwargs: Any) -> MediaAnchor:
    anchor = MediaAnchor(LOOPBACK, wan_ip=LOOPBACK, **kwargs)
    port = await nursery.start(anchor.serve)
    assert port == anchor.wan_port != 0
    return anchor


async def office(
    nursery: trio.Nursery,
    name: str,
    relay_address: Address,
    keys: dict[str, bytes],
    leg: int,
    paths: list[WanPath] | None = None,
    path_options: dict[str, Any] | None = None,
    call_id: str = "c1",
) -> Office:
    anchor = await start_anchor(nursery)
    media = await anchor.open_call(call_id)
    phone = Phone()
    media.set_phone_target(*phone.address)
    path = None
    target = relay_address
    if paths is not None:
        path = WanPath(relay_address, **(path_options or {}))
        paths.append(path)
        await nursery.start(path.run)
        target = path.address
    media.set_wan(leg, target, keys[name])
    return Office(name, anchor, media, phone, path)


async def two_offices(
    nursery: trio.Nursery,
    keys: dict[str, bytes],
    paths: list[WanPath] | None = None,
    path_options: dict[str, Any] | None = None,
) -> tuple[MediaRelay, Office, Office]:
    relay, address = await start_relay(nursery, keys)
    a = await office(nursery, "a", address, keys, relay.offer("c1", "a"), paths, path_options)
    b = await office(nursery, "b", address, keys, relay.answer("c1", "b"), paths, path_options)
    return relay, a, b


# -- media flows ------------------------------------------------------------------------------


async def test_phones_talk_both_ways_through_two_anchors_and_the_relay(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, a, b = await two_offices(nursery, keys)
    # The keepalives sent at set_wan have taught the relay both addresses: b's phone can speak
    # first and be heard.
    await wait_for(lambda: relay.statistics().keepalives == 2)
    report = relay.query("c1")
    assert report["offer"]["address"] == (LOOPBACK, a.anchor.wan_port)
    assert report["answer"]["address"] == (LOOPBACK, b.anchor.wan_port)
    for sequence in range(10):
        await b.phone.send(rtp(sequence, ssrc=2), b.media)
        data, source = await a.phone.receive()
        assert data == rtp(sequence, ssrc=2)
        assert source == (LOOPBACK, a.media.local_port)  # symmetric: from the port in our SDP
        await a.phone.send(rtp(100 + sequence, ssrc=1), a.media)
        data, source = await b.phone.receive()
        assert parse_rtp_untrusted(data).sequence == 100 + sequence
        assert source == (LOOPBACK, b.media.local_port)
    stats = a.media.statistics()
    assert stats.phone_packets_in == 10
    assert stats.wan_packets_out == 10
    assert stats.wan_packets_in == 10
    assert stats.phone_packets_out == 10
    assert stats.keepalives_sent == 1
    assert stats.latched
    assert stats.phone_address == a.phone.address
    assert stats.dropped_bad_auth == stats.dropped_replay == stats.dropped_wrong_source == 0
    assert relay.statistics().forwarded == 20


async def test_what_crosses_the_wan_is_sealed(
    nursery: trio.Nursery, keys: dict[str, bytes], close_sockets: list[WanPath]
) -> None:
    relay, a, b = await two_offices(nursery, keys, close_sockets)
    assert a.path is not None and b.path is not None
    payload = rtp(1, size=160)
    await a.phone.send(payload, a.media)
    assert (await b.phone.receive())[0] == payload
    up = a.path.captured_up[-1]
    down = b.path.captured_down[-1]
    assert payload[12:] not in up and payload[12:] not in down
    assert open_untrusted(keys["a"], up, DIRECTION_TO_RELAY).payload == payload
    assert open_untrusted(keys["b"], down, DIRECTION_FROM_RELAY).payload == payload
    keepalive = open_untrusted(keys["a"], a.path.captured_up[0], DIRECTION_TO_RELAY)
    assert keepalive.kind == KIND_KEEPALIVE
    assert relay.query("c1")["offer"]["address"] == a.path.public


async def test_media_before_set_wan_has_no_route(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    anchor = await start_anchor(nursery)
    media = await anchor.open_call("c1")
    phone = Phone()
    await phone.send(rtp(1), media)
    await wait_for(lambda: media.statistics().dropped_no_route == 1)
    assert media.statistics().phone_packets_in == 1
    assert media.statistics().latched


# -- the phone side: symmetric RTP ------------------------------------------------------------


async def test_phone_is_latched_where_it_really_sends_from(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay, a, b = await two_offices(nursery, keys)
    await wait_for(lambda: relay.statistics().keepalives == 2)
    # a's phone announced an address it does not use (a private one behind another NAT):
    # audio goes there until the phone's first packet shows where it really is.
    announced = Phone()
    real = Phone()
    a.media.set_phone_target(*announced.address)
    await b.phone.send(rtp(1), b.media)
    assert (await announced.receive())[0] == rtp(1)
    await real.send(rtp(50), a.media)
    assert (await b.phone.receive())[0] == rtp(50)
    assert a.media.statistics().phone_address == real.address
    # The SDP cannot move a latched phone.
    a.media.set_phone_target(*announced.address)
    await b.phone.send(rtp(2), b.media)
    assert (await real.receive())[0] == rtp(2)

    # Once latched, anyone else on the LAN is not heard.
    intruder = Phone()
    await intruder.send(rtp(666), a.media)
    await real.send(rtp(51), a.media)
    assert (await b.phone.receive())[0] == rtp(51)
    assert a.media.statistics().dropped_wrong_source == 1
    assert announced.pending() == []
    assert b.phone.pending() == []


async def test_non_rtp_on_the_phone_port_is_dropped(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    _relay, a, b = await two_offices(nursery, keys)
    stranger = Phone()
    await stranger.send(b"\x00\x01\x00\x00" + bytes(16), a.media)  # a STUN request header
    await stranger.send(b"junk", a.media)
    await a.phone.send(rtp(1), a.media)
    assert (await b.phone.receive())[0] == rtp(1)
    stats = a.media.statistics()
    assert stats.dropped_not_rtp == 2
    assert stats.phone_address == a.phone.address  # junk latches nothing


# -- attacks on the WAN -----------------------------------------------------------------------


async def test_unauthentic_wan_packets_are_dropped_counted_and_move_nothing(
    nursery: trio.Nursery, keys: dict[str, bytes], close_sockets: list[WanPath]
) -> None:
    relay, a, b = await two_offices(nursery, keys, close_sockets)
    assert a.path is not None and b.path is not None
    await a.phone.send(rtp(1), a.media)
    assert (await b.phone.receive())[0] == rtp(1)
    await b.phone.send(rtp(2), b.media)
    assert (await a.phone.receive())[0] == rtp(2)
    captured_up = a.path.captured_up[-1]  # a's packet to the relay
    captured_down = a.path.captured_down[-1]  # the relay's packet to a
    leg_a = relay.query("c1")["offer"]["leg"]

    attacker = Phone()  # just a UDP socket somewhere on the internet
    relay_address = relay.address
    assert relay_address is not None
    flipped = bytearray(captured_up)
    flipped[-5] ^= 0x10
    at_relay = [
        os.urandom(172),
        bytes(flipped),
        captured_up,  # replay
        seal(keys["b"], DIRECTION_TO_RELAY, leg_a, 10**6, rtp(3)),  # another office's key
    ]
    for packet in at_relay:
        await attacker.sock.sendto(packet, relay_address)
    at_anchor = [
        os.urandom(172),
        captured_down,  # replay
        seal(keys["b"], DIRECTION_FROM_RELAY, leg_a, 10**6, rtp(4)),
        captured_up,  # a's own packet reflected: wrong direction
    ]
    for packet in at_anchor:
        await attacker.sock.sendto(packet, (LOOPBACK, a.anchor.wan_port))
    # Markers both ways: nothing the attacker sent may arrive before them.
    await a.phone.send(rtp(5), a.media)
    assert (await b.phone.receive())[0] == rtp(5)
    await b.phone.send(rtp(6), b.media)
    assert (await a.phone.receive())[0] == rtp(6)
    await wait_for(lambda: a.media.statistics().dropped_bad_auth == 2)

    stats = relay.statistics()
    assert stats.dropped_bad_tag == 2
    assert stats.dropped_replay == 1
    assert stats.dropped_unknown_leg + stats.dropped_malformed == 1
    assert relay.query("c1")["offer"]["address"] == a.path.public
    assert relay.query("c1")["answer"]["address"] == b.path.public
    media = a.media.statistics()
    assert media.dropped_replay == 1
    assert media.dropped_bad_auth == 2  # another key, wrong direction
    assert a.anchor.statistics().dropped_unknown_leg + a.anchor.statistics().dropped_malformed == 1
    assert media.phone_packets_out == 2
    assert attacker.pending() == []
    assert a.phone.pending() == [] and b.phone.pending() == []


# -- re-keying after a NAT rebinding ----------------------------------------------------------


async def test_rekey_and_new_public_port_mid_call_resume_the_flow(
    nursery: trio.Nursery, keys: dict[str, bytes], close_sockets: list[WanPath]
) -> None:
    relay, a, b = await two_offices(nursery, keys, close_sockets)
    assert a.path is not None
    await a.phone.send(rtp(1), a.media)
    assert (await b.phone.receive())[0] == rtp(1)
    old_public = a.path.public

    # Office a's router gets a new public port; its uplink logs in again: a new media key on
    # both ends (the main host's key_for answers the new one at once).
    a.path.rebind()
    keys["a"] = os.urandom(32)
    a.media.update_key(keys["a"])
    # The keepalive under the new key moves the relay's latch: b can be heard at once.
    path = a.path
    await wait_for(lambda: relay.query("c1")["offer"]["address"] == path.public)
    assert a.path.public != old_public
    await b.phone.send(rtp(2), b.media)
    assert (await a.phone.receive())[0] == rtp(2)
    await a.phone.send(rtp(3), a.media)
    assert (await b.phone.receive())[0] == rtp(3)
    assert relay.query("c1")["offer"]["address_changes"] == 2


async def test_relay_learns_a_new_address_from_media_too(
    nursery: trio.Nursery, keys: dict[str, bytes], close_sockets: list[WanPath]
) -> None:
    # A rebinding without a re-login: the same key, a new port. The next authentic packet
    # moves the latch.
    relay, a, b = await two_offices(nursery, keys, close_sockets)
    assert a.path is not None
    await a.phone.send(rtp(1), a.media)
    assert (await b.phone.receive())[0] == rtp(1)
    a.path.rebind()
    await a.phone.send(rtp(2), a.media)
    assert (await b.phone.receive())[0] == rtp(2)
    assert relay.query("c1")["offer"]["address"] == a.path.public
    await b.phone.send(rtp(3), b.media)
    assert (await a.phone.receive())[0] == rtp(3)


# -- a terrible network -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_terrible_network_still_delivers_with_exact_accounting(
    nursery: trio.Nursery, keys: dict[str, bytes], close_sockets: list[WanPath], seed: int
) -> None:
    options = {"seed": seed, "loss": 0.1, "duplicate": 0.1, "reorder": 0.1}
    relay, a, b = await two_offices(nursery, keys, close_sockets, options)
    assert a.path is not None and b.path is not None
    count = 300
    sent_a = {rtp(n, ssrc=1, size=40) for n in range(count)}
    sent_b = {rtp(n, ssrc=2, size=40) for n in range(count)}
    for n in range(count):
        await a.phone.send(rtp(n, ssrc=1, size=40), a.media)
        await b.phone.send(rtp(n, ssrc=2, size=40), b.media)
        await trio.sleep(0.0002)  # pacing for the kernel's buffers, not a timing assertion
    a.path.flush()
    b.path.flush()

    legs = relay.query("c1")
    offer, answer = legs["offer"], legs["answer"]

    def settled() -> bool:
        nonlocal offer, answer
        legs = relay.query("c1")
        offer, answer = legs["offer"], legs["answer"]
        assert a.path is not None and b.path is not None
        # Every datagram the paths passed on was seen by the relay and the anchors.
        return (
            offer["packets_in"] + offer["drops"]["replay"]
            == a.path.up.delivered + a.path.up.duplicates
            and answer["packets_in"] + answer["drops"]["replay"]
            == b.path.up.delivered + b.path.up.duplicates
            and b.path.down.seen == answer["packets_out"]
            and a.path.down.seen == offer["packets_out"]
            and _wan_in(b.media) == b.path.down.delivered + b.path.down.duplicates
            and _wan_in(a.media) == a.path.down.delivered + a.path.down.duplicates
        )

    await wait_for(settled)
    # The relay: each distinct packet once, each duplicate refused as a replay.
    assert offer["packets_in"] == a.path.up.delivered
    assert offer["drops"]["replay"] == a.path.up.duplicates
    assert offer["drops"]["bad_tag"] == 0
    media_in = offer["packets_in"] - offer["keepalives_in"]
    assert media_in == answer["packets_out"] + offer["unrouted"]
    # The anchors: the same at their end.
    stats_b = b.media.statistics()
    assert stats_b.wan_packets_in == b.path.down.delivered
    assert stats_b.dropped_replay == b.path.down.duplicates
    assert stats_b.dropped_bad_auth == 0
    # The phones: only packets that were sent, never twice.
    got_b = b.phone.pending()
    got_a = a.phone.pending()
    assert len(got_b) == stats_b.phone_packets_out == len(set(got_b))
    assert len(got_a) == a.media.statistics().phone_packets_out == len(set(got_a))
    assert set(got_b) <= sent_a
    assert set(got_a) <= sent_b
    # Two hops of 10 % loss each: most still arrives; and the network really was terrible.
    assert len(got_b) > count // 2
    assert len(got_a) > count // 2
    assert a.path.up.reordered and a.path.up.duplicates and a.path.up.dropped
    assert b.path.down.reordered and b.path.down.duplicates and b.path.down.dropped


def _wan_in(media: CallMedia) -> int:
    stats = media.statistics()
    return (
        stats.wan_packets_in + stats.keepalives_in + stats.dropped_replay + stats.dropped_bad_auth
    )


# -- keepalives under a mock clock -----------------------------------------------------------


async def test_keepalives_every_interval_only_while_no_media_flows(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, keys: dict[str, bytes]
) -> None:
    relay_raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay_raw.bind((LOOPBACK, 0))
    relay_raw.setblocking(False)
    try:
        anchor = await start_anchor(nursery)
        media = await anchor.open_call("c1")
        phone = Phone()
        media.set_wan(7, relay_raw.getsockname(), keys["a"])
        kinds = _received_kinds(relay_raw, keys["a"])
        assert kinds == [KIND_KEEPALIVE]  # at once

        # The phone talks every second for 10 s: media keeps the binding open, no keepalive.
        for n in range(10):
            await phone.send(rtp(n), media)
            await trio.sleep(1)
        kinds = _received_kinds(relay_raw, keys["a"])
        assert kinds == [1] * 10

        # Silence for 10 s: a keepalive about every 2 s.
        await trio.sleep(10.5)
        kinds = _received_kinds(relay_raw, keys["a"])
        assert 4 <= len(kinds) <= 6
        assert set(kinds) == {KIND_KEEPALIVE}
        assert media.statistics().keepalives_sent == 1 + len(kinds)
    finally:
        relay_raw.close()


def _received_kinds(raw: socket.socket, key: bytes) -> list[int]:
    kinds = []
    counters = []
    while True:
        try:
            data = raw.recv(4096)
        except BlockingIOError:
            break
        packet = open_untrusted(key, data, DIRECTION_TO_RELAY)
        kinds.append(packet.kind)
        counters.append(packet.counter)
    assert counters == sorted(set(counters))
    return kinds


# -- sender counters never repeat under one key -----------------------------------------------


async def test_a_leg_reopened_under_the_same_key_continues_its_counter(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    relay_raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay_raw.bind((LOOPBACK, 0))
    relay_raw.setblocking(False)
    try:
        anchor = await start_anchor(nursery)
        first = await anchor.open_call("c1")
        first.set_wan(9, relay_raw.getsockname(), keys["a"])
        first.set_wan(9, relay_raw.getsockname(), keys["a"])  # again: nothing resets
        first.close()
        second = await anchor.open_call("c2")
        second.set_wan(9, relay_raw.getsockname(), keys["a"])
        counters: list[int] = []
        with trio.fail_after(5):
            while len(counters) < 3:
                await trio.lowlevel.wait_readable(relay_raw)
                packet = open_untrusted(keys["a"], relay_raw.recv(4096), DIRECTION_TO_RELAY)
                counters.append(packet.counter)
        assert counters == [0, 1, 2]
        # A new key is a new sender: it may start at 0.
        second.update_key(keys["b"])
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(relay_raw)
        assert open_untrusted(keys["b"], relay_raw.recv(4096), DIRECTION_TO_RELAY).counter == 0
    finally:
        relay_raw.close()


# -- lifecycle and misuse ---------------------------------------------------------------------


async def test_open_call_needs_a_serving_anchor() -> None:
    anchor = MediaAnchor(LOOPBACK)
    with pytest.raises(RuntimeError):
        await anchor.open_call("c1")


async def test_one_media_per_call_and_one_call_per_leg(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    anchor = await start_anchor(nursery)
    first = await anchor.open_call("c1")
    with pytest.raises(ValueError):
        await anchor.open_call("c1")
    second = await anchor.open_call("c2")
    first.set_wan(5, (LOOPBACK, 9), keys["a"])
    with pytest.raises(ValueError):
        second.set_wan(5, (LOOPBACK, 9), keys["a"])
    assert anchor.call("c1") is first


async def test_close_releases_the_call(nursery: trio.Nursery, keys: dict[str, bytes]) -> None:
    _relay, a, b = await two_offices(nursery, keys)
    await a.phone.send(rtp(1), a.media)
    assert (await b.phone.receive())[0] == rtp(1)
    b.media.close()
    assert b.media.closed
    await wait_for(lambda: b.media._sock.fileno() == -1)
    assert b.anchor.call("c1") is None
    assert b.anchor.statistics().calls == 0
    await a.phone.send(rtp(2), a.media)
    await wait_for(lambda: b.anchor.statistics().dropped_unknown_leg == 1)
    assert b.media.statistics().wan_packets_in == 1  # still readable after close
    again = await b.anchor.open_call("c1")
    assert again is not b.media
    b.media.close()  # twice is harmless


async def test_serve_ending_closes_every_call(keys: dict[str, bytes]) -> None:
    anchor = MediaAnchor(LOOPBACK, wan_ip=LOOPBACK)
    async with trio.open_nursery() as nursery:
        await nursery.start(anchor.serve)
        media = await anchor.open_call("c1")
        nursery.cancel_scope.cancel()
    assert media.closed
    assert media._sock.fileno() == -1
    assert anchor.statistics().calls == 0


async def test_the_wan_socket_has_room_for_a_pause(nursery: trio.Nursery) -> None:
    anchor = await start_anchor(nursery)
    media = await anchor.open_call("c1")
    assert anchor._wan_sock is not None
    wan = anchor._wan_sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Every call's audio from the relay shares it; a phone socket carries one phone's.
    assert wan > media._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


async def test_sockets_are_marked_expedited_forwarding(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    anchor = await start_anchor(nursery)
    media = await anchor.open_call("c1")
    assert anchor._wan_sock is not None
    assert anchor._wan_sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0xB8
    assert media._sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0xB8


async def test_a_key_of_the_wrong_size_is_refused_at_once(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    anchor = await start_anchor(nursery)
    media = await anchor.open_call("c1")
    with pytest.raises(ValueError):
        media.set_wan(5, (LOOPBACK, 9), b"short")
    assert media.leg is None
    media.set_wan(5, (LOOPBACK, 9), keys["a"])
    with pytest.raises(ValueError):
        media.update_key(b"x" * 16)
    assert media.leg == 5


async def test_a_relay_named_by_host_name_is_looked_up(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    # The configured main host is often a name; "localhost" resolves from /etc/hosts, so the
    # look-up sends nothing to any DNS server.
    relay_raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay_raw.bind((LOOPBACK, 0))
    try:
        anchor = await start_anchor(nursery)
        media = await anchor.open_call("c1")
        media.set_wan(3, ("localhost", relay_raw.getsockname()[1]), keys["a"])
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(relay_raw)
        packet = open_untrusted(keys["a"], relay_raw.recv(4096), DIRECTION_TO_RELAY)
        assert (packet.leg, packet.counter, packet.kind) == (3, 0, KIND_KEEPALIVE)
        assert media.relay == relay_raw.getsockname()
        phone = Phone()
        await phone.send(rtp(1), media)
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(relay_raw)
        packet = open_untrusted(keys["a"], relay_raw.recv(4096), DIRECTION_TO_RELAY)
        assert packet.payload == rtp(1)
    finally:
        relay_raw.close()


# -- one task for every socket ---------------------------------------------------------------


def _raw_relay() -> socket.socket:
    """A stand-in for the relay: a plain socket the test reads without waiting."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((LOOPBACK, 0))
    raw.setblocking(False)
    return raw


async def _sealed(raw: socket.socket, key: bytes, count: int) -> list[WanPacket]:
    """The next `count` packets the anchor sent to `raw`, opened (keepalives included)."""
    packets: list[WanPacket] = []
    with trio.fail_after(5):
        while len(packets) < count:
            await trio.lowlevel.wait_readable(raw)
            packets.append(open_untrusted(key, raw.recv(4096), DIRECTION_TO_RELAY))
    return packets


async def test_many_calls_bursting_at_once_are_all_carried(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    raw = _raw_relay()
    try:
        anchor = await start_anchor(nursery)
        calls, phones = [], []
        for n in range(20):
            media = await anchor.open_call(f"c{n}")
            media.set_wan(100 + n, raw.getsockname(), keys["a"])
            calls.append(media)
            phones.append(Phone())
        assert {p.kind for p in await _sealed(raw, keys["a"], 20)} == {KIND_KEEPALIVE}
        # Every phone's burst is queued before the anchor runs again: one wakeup sees them all.
        for n, phone in enumerate(phones):
            for sequence in range(5):
                phone.raw.sendto(rtp(sequence, ssrc=n), (LOOPBACK, calls[n].local_port))
        packets = await _sealed(raw, keys["a"], 100)
        by_leg: dict[int, list[bytes]] = {}
        for packet in packets:
            by_leg.setdefault(packet.leg, []).append(packet.payload)
        assert by_leg == {100 + n: [rtp(s, ssrc=n) for s in range(5)] for n in range(20)}
        for n, media in enumerate(calls):
            stats = media.statistics()
            assert stats.phone_packets_in == stats.wan_packets_out == 5
            assert stats.phone_address == phones[n].address
    finally:
        raw.close()


async def test_a_closed_call_reads_nothing_more(
    nursery: trio.Nursery, keys: dict[str, bytes]
) -> None:
    raw = _raw_relay()
    try:
        anchor = await start_anchor(nursery)
        media = await anchor.open_call("c1")
        other = await anchor.open_call("c2")
        media.set_wan(7, raw.getsockname(), keys["a"])
        other.set_wan(8, raw.getsockname(), keys["a"])
        await _sealed(raw, keys["a"], 2)
        phone = Phone()
        # Queued on the socket, then the call closes before the anchor's loop runs: the packet
        # must not be sealed (its counter went back to the anchor with the leg).
        phone.raw.sendto(rtp(1), (LOOPBACK, media.local_port))
        media.close()
        phone.raw.sendto(rtp(2), (LOOPBACK, other.local_port))
        [packet] = await _sealed(raw, keys["a"], 1)
        assert (packet.leg, packet.payload) == (8, rtp(2))
        assert media.statistics().phone_packets_in == 0
        await wait_for(lambda: media._sock.fileno() == -1)
        assert raw_is_empty(raw)
    finally:
        raw.close()


def raw_is_empty(raw: socket.socket) -> bool:
    try:
        raw.recv(4096)
    except BlockingIOError:
        return True
    return False


class StallingSocket(socket.socket):
    """A UDP socket whose next `stalls` sends find no room (EAGAIN)."""

    stalls = 0
    refused = 0

    def sendto(self, data: Any, *args: Any) -> int:
        if self.stalls:
            self.stalls -= 1
            self.refused += 1
            raise BlockingIOError
        return super().sendto(data, *args)


@pytest.fixture
def stalling_sockets(monkeypatch: pytest.MonkeyPatch) -> list[StallingSocket]:
    """Every socket the anchor opens from now on, in order (the WAN socket first)."""
    made: list[StallingSocket] = []

    def udp_socket(ip: str, receive_buffer: int = 0) -> socket.socket:
        sock = StallingSocket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ip, 0))
        sock.setblocking(False)
        made.append(sock)
        return sock

    monkeypatch.setattr(anchor_module, "_udp_socket", udp_socket)
    return made


async def test_a_full_send_buffer_is_waited_out_both_ways(
    nursery: trio.Nursery, keys: dict[str, bytes], stalling_sockets: list[StallingSocket]
) -> None:
    raw = _raw_relay()
    try:
        anchor = await start_anchor(nursery)
        media = await anchor.open_call("c1")
        wan, phone_side = stalling_sockets
        media.set_wan(7, raw.getsockname(), keys["a"])
        await _sealed(raw, keys["a"], 1)
        phone = Phone()
        wan.stalls = 3
        for sequence in range(4):
            phone.raw.sendto(rtp(sequence), (LOOPBACK, media.local_port))
        packets = await _sealed(raw, keys["a"], 4)
        assert [p.payload for p in packets] == [rtp(s) for s in range(4)]  # in order
        assert wan.refused == 3
        # And toward the phone.
        phone_side.stalls = 2
        for sequence in range(3):
            raw.sendto(seal(keys["a"], DIRECTION_FROM_RELAY, 7, sequence, rtp(sequence)),
                       ("127.0.0.1", anchor.wan_port))  # fmt: skip
        for sequence in range(3):
            assert (await phone.receive())[0] == rtp(sequence)
        assert phone_side.refused == 2
        stats = media.statistics()
        assert stats.wan_packets_out == 4
        assert stats.phone_packets_out == 3
        assert stats.send_failures == 0
    finally:
        raw.close()


async def test_a_send_buffer_that_stays_full_drops_counts_and_goes_on(
    nursery: trio.Nursery, keys: dict[str, bytes], stalling_sockets: list[StallingSocket]
) -> None:
    raw = _raw_relay()
    try:
        anchor = await start_anchor(nursery)
        media = await anchor.open_call("c1")
        wan, _ = stalling_sockets
        media.set_wan(7, raw.getsockname(), keys["a"])
        await _sealed(raw, keys["a"], 1)
        phone = Phone()
        wan.stalls = 10**9
        phone.raw.sendto(rtp(1), (LOOPBACK, media.local_port))
        await wait_for(lambda: media.statistics().send_failures == 1)
        wan.stalls = 0
        phone.raw.sendto(rtp(2), (LOOPBACK, media.local_port))
        [packet] = await _sealed(raw, keys["a"], 1)
        assert packet.payload == rtp(2)
        assert media.statistics().wan_packets_out == 1
    finally:
        raw.close()
