"""Tests for remotehost.natprobe: LAN interfaces, the pystun3 probe's failure modes (against
fake servers on loopback), and the Binding transaction, pure and over sockets."""

from __future__ import annotations

import heapq
import ipaddress
import socket
import threading
import time
from collections.abc import Callable

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from remotehost import natprobe
from remotehost.natprobe import (
    NAT_TIMEOUT,
    NAT_UNKNOWN,
    BindingTransaction,
    LanInterface,
    NatProbeResult,
    interfaces_from_table,
    lan_interfaces,
    probe_nat_type,
    stun_binding,
)
from shared.stun.message import (
    BINDING,
    ErrorCode,
    MappedAddress,
    Software,
    StunClass,
    StunMessage,
    TransportAddress,
    XorMappedAddress,
    parse_message_untrusted,
)
from shared.stun.server import ServerAddresses, StunServer

# --- LAN interfaces ---------------------------------------------------------------------------


def test_lan_interfaces_shape():
    interfaces = lan_interfaces()
    assert isinstance(interfaces, list)
    for interface in interfaces:
        assert isinstance(interface, LanInterface)
        assert interface.name
        assert interface.ipv4 or interface.ipv6
        for v4 in interface.ipv4:
            assert isinstance(v4, ipaddress.IPv4Interface)
            assert not v4.ip.is_loopback
        for v6 in interface.ipv6:
            assert isinstance(v6, ipaddress.IPv6Interface)
            assert not v6.ip.is_loopback
    assert "lo" not in [interface.name for interface in interfaces]


# What netifaces returned on the development machine, plus the odd cases.
TABLE = {
    "lo": {
        17: [{"addr": "00:00:00:00:00:00", "peer": "00:00:00:00:00:00"}],
        2: [{"addr": "127.0.0.1", "netmask": "255.0.0.0", "peer": "127.0.0.1"}],
        10: [{"addr": "::1", "netmask": "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"}],
    },
    "ifb0": {17: [{"addr": "82:36:20:ca:8f:4a", "broadcast": "ff:ff:ff:ff:ff:ff"}]},
    "eth0": {
        17: [{"addr": "02:fc:00:00:00:01", "broadcast": "ff:ff:ff:ff:ff:ff"}],
        2: [{"addr": "192.0.2.2", "netmask": "255.255.255.0", "broadcast": "192.0.2.255"}],
        10: [
            {"addr": "fd00::2", "netmask": "ffff:ffff:ffff:ffff::/64"},
            {"addr": "fe80::fc:ff:fe00:1%eth0", "netmask": "ffff:ffff:ffff:ffff::/64"},
        ],
    },
    "eth1": {
        2: [
            {"addr": "198.51.100.7"},  # no netmask: a host address
            {"addr": "not-an-address", "netmask": "255.255.255.0"},
            {"netmask": "255.255.255.0"},
        ],
        10: [{"addr": "2001:db8::5", "netmask": "ffff:ffff:ffff:ff00::"}],  # mask written out
    },
    "broken": {2: [{"addr": "203.0.113.1", "netmask": "junk"}]},
}


def test_interfaces_from_table():
    interfaces = {i.name: i for i in interfaces_from_table(TABLE)}
    assert sorted(interfaces) == ["eth0", "eth1"]
    eth0 = interfaces["eth0"]
    assert eth0.ipv4 == (ipaddress.IPv4Interface("192.0.2.2/24"),)
    assert eth0.ipv4[0].network == ipaddress.IPv4Network("192.0.2.0/24")
    assert [str(a) for a in eth0.ipv6] == ["fd00::2/64", "fe80::fc:ff:fe00:1%eth0/64"]
    eth1 = interfaces["eth1"]
    assert eth1.ipv4 == (ipaddress.IPv4Interface("198.51.100.7/32"),)
    assert eth1.ipv6 == (ipaddress.IPv6Interface("2001:db8::5/56"),)


def test_interfaces_from_table_uses_the_given_families():
    table = {"x": {99: [{"addr": "192.0.2.9", "netmask": "255.255.255.128"}]}}
    assert interfaces_from_table(table) == []
    [x] = interfaces_from_table(table, ipv4_family=99)
    assert x.ipv4 == (ipaddress.IPv4Interface("192.0.2.9/25"),)


# --- fake STUN servers on loopback ------------------------------------------------------------

Answer = Callable[[bytes], list[bytes]]


class FakeServer:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self.address: tuple[str, int] = ("127.0.0.1", 0)


async def start_fake(nursery: trio.Nursery, answer: Answer) -> FakeServer:
    fake = FakeServer(answer)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    fake.address = sock.getsockname()

    async def serve() -> None:
        with sock:
            while True:
                data, source = await sock.recvfrom(2048)
                fake.received.append(data)
                for reply in fake.answer(data):
                    await sock.sendto(reply, source)

    nursery.start_soon(serve)
    return fake


def silent(data: bytes) -> list[bytes]:
    return []


def rfc3489_reply(data: bytes, cls: StunClass, *attributes) -> bytes:
    return StunMessage(BINDING, cls, data[4:20], tuple(attributes)).encode()


# --- probe_nat_type ---------------------------------------------------------------------------


async def test_probe_timeout_against_a_silent_port(nursery):
    fake = await start_fake(nursery, silent)
    with trio.fail_after(20):
        result = await probe_nat_type(*fake.address, timeout=1)
    assert result.nat_type == NAT_TIMEOUT
    assert result.external_ip is None and result.external_port is None
    assert result.error
    assert fake.received  # it did ask


async def test_probe_trio_deadline_comes_first(nursery):
    fake = await start_fake(nursery, silent)
    with trio.fail_after(20):
        result = await probe_nat_type(*fake.address, timeout=0.2, attempt_timeout=30)
    assert result == NatProbeResult(NAT_TIMEOUT, None, None, "NAT probe did not finish in 0.2s")


async def test_probe_stops_pystun3_retransmitting_for_ever_on_error_responses(nursery):
    def error(data: bytes) -> list[bytes]:
        return [rfc3489_reply(data, StunClass.ERROR, ErrorCode(400, "Bad Request"))]

    fake = await start_fake(nursery, error)
    with trio.fail_after(20):
        result = await probe_nat_type(*fake.address, timeout=0.5)
    assert result.nat_type == NAT_TIMEOUT
    # pystun3 kept asking well past its four attempts: without the guard it never ends.
    assert len(fake.received) > 4


async def test_probe_survives_a_reply_pystun3_cannot_read(nursery):
    fake = await start_fake(nursery, lambda data: [b"\x09\x09" + data[2:]])
    with trio.fail_after(20):
        result = await probe_nat_type(*fake.address, timeout=2)
    assert result.nat_type == NAT_UNKNOWN
    assert result.error is not None and "pystun3 failed" in result.error


async def test_probe_without_changed_address_behind_a_nat(nursery):
    mapped = TransportAddress("203.0.113.5", 40000)

    def answer(data: bytes) -> list[bytes]:
        if len(data) > 20:  # a CHANGE-REQUEST: the reply is "filtered"
            return []
        return [rfc3489_reply(data, StunClass.SUCCESS, MappedAddress(mapped))]

    fake = await start_fake(nursery, answer)
    with trio.fail_after(20):
        result = await probe_nat_type(*fake.address, timeout=2)
    assert result.nat_type == NAT_UNKNOWN
    assert result.error == "the STUN server sent no CHANGED-ADDRESS"
    # The mapped address seen in the first test is still reported.
    assert (result.external_ip, result.external_port) == ("203.0.113.5", 40000)


async def test_probe_never_uses_default_servers():
    with trio.fail_after(5):
        result = await probe_nat_type("", 3478, timeout=1)
    assert result == NatProbeResult(NAT_UNKNOWN, None, None, "no STUN server given")


def test_guarded_socket_stops_on_request():
    stop = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.bind(("127.0.0.1", 0))
        raw.settimeout(0.01)
        guarded = natprobe._GuardedSocket(raw, time.monotonic() + 60, stop)
        with pytest.raises(TimeoutError):
            guarded.recvfrom(2048)
        stop.set()
        with pytest.raises(natprobe._ProbeStopped):
            guarded.sendto(b"x", raw.getsockname())
        with pytest.raises(natprobe._ProbeStopped):
            guarded.recvfrom(2048)
        assert guarded.sends == 0


def test_guarded_socket_stops_at_the_deadline_and_refuses_a_missing_address():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.bind(("127.0.0.1", 0))
        live = natprobe._GuardedSocket(raw, time.monotonic() + 60, threading.Event())
        with pytest.raises(natprobe._ProbeStopped, match="CHANGED-ADDRESS"):
            live.sendto(b"x", (None, None))
        expired = natprobe._GuardedSocket(raw, time.monotonic() - 1, threading.Event())
        with pytest.raises(natprobe._ProbeStopped):
            expired.sendto(b"x", raw.getsockname())


def test_guarded_socket_notes_the_first_mapped_address():
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
    ):
        raw.bind(("127.0.0.1", 0))
        raw.settimeout(5)
        guarded = natprobe._GuardedSocket(raw, time.monotonic() + 60, threading.Event())
        tid = bytes(16)
        first = TransportAddress("198.51.100.1", 1)
        second = TransportAddress("198.51.100.2", 2)
        for datagram in [
            b"garbage",
            StunMessage(BINDING, StunClass.ERROR, tid, (MappedAddress(second),)).encode(),
            StunMessage(BINDING, StunClass.SUCCESS, tid, (MappedAddress(first),)).encode(),
            StunMessage(BINDING, StunClass.SUCCESS, tid, (MappedAddress(second),)).encode(),
        ]:
            peer.sendto(datagram, raw.getsockname())
            assert guarded.recvfrom(2048)[0] == datagram
        assert guarded.first_mapped == first


# --- BindingTransaction (pure) ----------------------------------------------------------------

SERVER = TransportAddress("198.51.100.1", 3478)
CLIENT = TransportAddress("203.0.113.9", 40000)


def test_rfc5389_retransmission_schedule():
    # RFC 5389 §7.2.1: with RTO 500 ms, requests at 0, 500, 1500, ... 31500 ms; give up at 39500.
    transaction = BindingTransaction(SERVER, now=0.0, rto=0.5)
    sends = [0.0]
    last_timer = 0.0
    while (timer := transaction.get_timer()) is not None:
        assert transaction.handle_timer(timer - 0.001) is None  # not yet
        last_timer = timer
        if transaction.handle_timer(timer) is not None:
            sends.append(timer)
    assert sends == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert last_timer == 39.5
    assert transaction.done and transaction.mapped is None
    assert transaction.error == "no response"
    assert transaction.handle_timer(100.0) is None


def test_request_is_a_plain_binding_request():
    transaction = BindingTransaction(SERVER, now=0.0, transaction_id=bytes(range(12)))
    request = parse_message_untrusted(transaction.request)
    assert request == StunMessage(BINDING, StunClass.REQUEST, bytes(range(12)))
    assert BindingTransaction(SERVER, now=0).transaction_id != transaction.transaction_id


def response(transaction: BindingTransaction, cls=StunClass.SUCCESS, *attributes, tid=None):
    return StunMessage(BINDING, cls, tid or transaction.transaction_id, tuple(attributes)).encode()


def test_success_with_xor_mapped_address_wins_over_mapped_address():
    transaction = BindingTransaction(SERVER, now=0.0)
    data = response(
        transaction,
        StunClass.SUCCESS,
        MappedAddress(TransportAddress("192.0.2.1", 1)),
        XorMappedAddress(CLIENT),
    )
    assert transaction.receive_datagram_untrusted(data, SERVER)
    assert transaction.done and transaction.mapped == CLIENT
    assert transaction.get_timer() is None


def test_rfc3489_style_mapped_address_is_accepted():
    transaction = BindingTransaction(SERVER, now=0.0)
    assert transaction.receive_datagram_untrusted(
        response(transaction, StunClass.SUCCESS, MappedAddress(CLIENT)), SERVER
    )
    assert transaction.mapped == CLIENT


@pytest.mark.parametrize(
    ("make", "source"),
    [
        (lambda t: b"junk", SERVER),
        (lambda t: response(t, StunClass.SUCCESS, XorMappedAddress(CLIENT), tid=bytes(12)), SERVER),
        (lambda t: response(t, StunClass.SUCCESS, XorMappedAddress(CLIENT)), CLIENT),
        (lambda t: response(t, StunClass.REQUEST), SERVER),
        (lambda t: response(t, StunClass.INDICATION), SERVER),
        (
            lambda t: StunMessage(0x003, StunClass.SUCCESS, t.transaction_id).encode(),
            SERVER,
        ),
    ],
)
def test_datagrams_that_are_not_our_answer_are_ignored(make, source):
    transaction = BindingTransaction(SERVER, now=0.0)
    assert not transaction.receive_datagram_untrusted(make(transaction), source)
    assert not transaction.done
    assert transaction.get_timer() == 0.5


def test_error_response_ends_the_transaction():
    transaction = BindingTransaction(SERVER, now=0.0)
    data = response(transaction, StunClass.ERROR, ErrorCode(420, "Unknown Attribute"))
    assert transaction.receive_datagram_untrusted(data, SERVER)
    assert transaction.done and transaction.mapped is None
    assert transaction.error == "error 420 Unknown Attribute"


def test_success_without_an_address():
    transaction = BindingTransaction(SERVER, now=0.0)
    assert transaction.receive_datagram_untrusted(
        response(transaction, StunClass.SUCCESS, Software("x")), SERVER
    )
    assert transaction.mapped is None
    assert transaction.error is not None


def test_answers_after_the_end_are_ignored():
    transaction = BindingTransaction(SERVER, now=0.0)
    first = response(transaction, StunClass.SUCCESS, XorMappedAddress(CLIENT))
    later = response(
        transaction, StunClass.SUCCESS, XorMappedAddress(TransportAddress("192.0.2.7", 7))
    )
    assert transaction.receive_datagram_untrusted(first, SERVER)
    assert not transaction.receive_datagram_untrusted(later, SERVER)
    assert transaction.mapped == CLIENT


@settings(max_examples=300)
@given(
    seed_events=st.lists(
        st.tuples(
            st.booleans(),  # dropped
            st.booleans(),  # duplicated
            st.floats(0.0, 3.0),  # delay
        ),
        min_size=1,
        max_size=40,
    )
)
def test_terrible_network(seed_events):
    """Drops, duplicates, delays (and so reordering) between a transaction and a real server.

    Whatever the network does, the transaction ends by the RFC 5389 deadline, sends at most Rc
    requests, and a mapped address it reports is the right one; if any answer arrived in time,
    it has one.
    """
    server = StunServer(ServerAddresses(SERVER.ip, SERVER.port))
    transaction = BindingTransaction(SERVER, now=0.0, rto=0.5)
    fates = iter(seed_events * 10)
    queue: list[tuple[float, int, str, bytes]] = []
    order = 0

    def transmit(now: float, direction: str, data: bytes) -> None:
        nonlocal order
        dropped, duplicated, delay = next(fates)
        if dropped:
            return
        for copy in range(2 if duplicated else 1):
            order += 1
            heapq.heappush(queue, (now + delay + copy * 0.01, order, direction, data))

    sends = 1
    transmit(0.0, "up", transaction.request)
    answer_arrived_at: float | None = None
    while not transaction.done:
        timer = transaction.get_timer()
        assert timer is not None
        if queue and queue[0][0] <= timer:
            now, _, direction, data = heapq.heappop(queue)
            if direction == "up":
                reply = server.handle_datagram_untrusted(data, SERVER, CLIENT)
                assert reply is not None
                transmit(now, "down", reply.data)
            else:
                if answer_arrived_at is None:
                    answer_arrived_at = now
                transaction.receive_datagram_untrusted(data, SERVER)
        else:
            again = transaction.handle_timer(timer)
            if again is not None:
                sends += 1
                assert again == transaction.request  # RFC 5389 §7.2.1: the same request
                transmit(timer, "up", again)
    assert sends <= 7
    assert (transaction.mapped is not None) == (answer_arrived_at is not None)
    if transaction.mapped is not None:
        assert transaction.mapped == CLIENT
        assert answer_arrived_at is not None and answer_arrived_at <= 39.5


# --- stun_binding over loopback ---------------------------------------------------------------


def binding_answer(count_from: int = 1) -> Callable[[bytes], list[bytes]]:
    """A fake server that ignores the first `count_from - 1` requests, then answers."""
    seen = 0

    def answer(data: bytes) -> list[bytes]:
        nonlocal seen
        seen += 1
        if seen < count_from:
            return []
        request = parse_message_untrusted(data)
        mapped = XorMappedAddress(TransportAddress("203.0.113.50", 50000))
        return [StunMessage(BINDING, StunClass.SUCCESS, request.transaction_id, (mapped,)).encode()]

    return answer


async def test_stun_binding_retransmits_until_answered(nursery):
    fake = await start_fake(nursery, binding_answer(count_from=3))
    with trio.fail_after(20):
        mapped = await stun_binding(fake.address, timeout=10, rto=0.05)
    assert mapped == ("203.0.113.50", 50000)
    assert len(fake.received) == 3
    assert len(set(fake.received)) == 1  # retransmissions are identical


async def test_stun_binding_silent_server_gives_none(nursery):
    fake = await start_fake(nursery, silent)
    with trio.fail_after(20):
        mapped = await stun_binding(fake.address, timeout=0.5, rto=0.05)
    assert mapped is None
    assert 1 <= len(fake.received) <= 7


async def test_stun_binding_ignores_a_wrong_answer_first(nursery):
    def answer(data: bytes) -> list[bytes]:
        wrong = StunMessage(
            BINDING,
            StunClass.SUCCESS,
            bytes(12),
            (XorMappedAddress(TransportAddress("192.0.2.66", 66)),),
        ).encode()
        return [b"noise", wrong, *binding_answer()(data)]

    fake = await start_fake(nursery, answer)
    with trio.fail_after(20):
        mapped = await stun_binding(fake.address, timeout=10, rto=0.05)
    assert mapped == ("203.0.113.50", 50000)


async def test_stun_binding_error_response_gives_none(nursery):
    def answer(data: bytes) -> list[bytes]:
        request = parse_message_untrusted(data)
        error = ErrorCode(400, "Bad Request")
        return [StunMessage(BINDING, StunClass.ERROR, request.transaction_id, (error,)).encode()]

    fake = await start_fake(nursery, answer)
    with trio.fail_after(20):
        assert await stun_binding(fake.address, timeout=10, rto=0.05) is None
    assert len(fake.received) == 1  # an error ends it: no retransmission


async def test_stun_binding_ignores_answers_from_elsewhere(nursery):
    fake = await start_fake(nursery, binding_answer())
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        # The answer comes from the fake; we claim to ask someone else on the same host.
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as other:
            await other.bind(("127.0.0.1", 0))

            async def forward() -> None:
                data, _ = await other.recvfrom(2048)
                await other.sendto(data, fake.address)  # the fake answers the forwarder...
                reply, _ = await other.recvfrom(2048)
                await sock.sendto(reply, sock.getsockname())  # ...and we loop it to ourselves

            async with trio.open_nursery() as inner:
                inner.start_soon(forward)
                with trio.fail_after(20):
                    mapped = await stun_binding(
                        other.getsockname(), timeout=0.5, sock=sock, rto=0.05
                    )
                inner.cancel_scope.cancel()
    assert mapped is None


async def test_stun_binding_reports_network_errors_as_none():
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        with trio.fail_after(10):
            # Port 0 is not a destination: sendto fails at once.
            assert await stun_binding(("127.0.0.1", 0), timeout=2, sock=sock) is None
