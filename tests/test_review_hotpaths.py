"""Review of the hot-path changes of the SIP stack: what the speed-ups must not cost.

Two things are checked here that the per-module tests do not:

- The memos that remember parses by their text (URIs, IP addresses, Via `received`) are fed
  by untrusted peers before any authentication. Bounding them by entry count alone lets a
  peer pin (entries x longest text) of memory: about 67 MB for URIs of 8 KB, 33 MB each for
  Via hosts and `received` values, against the remote host's 80 MB budget. Whatever the
  mechanism, distinct long texts from the network must not pile up.
- The UDP send path on a full send buffer (EAGAIN): senders wait for room one at a time and
  all of them get through (trio allows one task waiting to write per socket, so a second
  waiter must not hit `BusyResourceError`).
"""

from __future__ import annotations

import gc
import socket
import tracemalloc
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from shared.aio import sip_transport
from shared.aio.sip_transport import (
    Destination,
    SipTransport,
    read_message_untrusted,
    serve_sip_transports,
)
from shared.sip.message import SipRequest, generate_tag, make_response
from shared.sip.uri import parse_uri_untrusted

LOOPBACK = "127.0.0.1"
GUARD = 10  # seconds; a hang guard, never a timing assertion
PEER = ("192.0.2.7", 40000)
COUNT = 2500  # whatever a 4,096-entry memo does, at some point it holds 1,250 of them
LONG = 1500  # characters of each distinct text: well within one header line's limit
RETAINED_LIMIT = 1_000_000  # bytes; one message is far below, a memo of long texts far above


def request_bytes(
    i: int, *, via: str | None = None, from_uri: str = "sip:201@example.com"
) -> bytes:
    return (
        "OPTIONS sip:registrar.example.com SIP/2.0\r\n"
        f"Via: {via or f'SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-{i};rport'}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <{from_uri}>;tag=abc\r\n"
        "To: <sip:201@example.com>\r\n"
        f"Call-ID: review-{i}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def long_text(i: int, unit: str = "a") -> str:
    """A distinct text of LONG characters (`unit` repeated after the number)."""
    head = f"{i:05d}"
    return head + unit * ((LONG - len(head)) // len(unit))


def retained_by_shared(make: Callable[[int], bytes]) -> int:
    """The most memory held at once while COUNT messages from the network are read and
    dropped one by one: one message's worth, plus whatever the memos keep. The peak, not the
    end: a memo that clears itself when full may happen to be nearly empty at the end."""
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(COUNT):
            inbound = read_message_untrusted(make(i), PEER)
            del inbound
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_the_cases_below_are_read_as_the_network_sends_them() -> None:
    # The long texts are legal: they reach the memos on the normal path, not an error path.
    uri = f"sip:{long_text(1)}@example.com"
    inbound = read_message_untrusted(request_bytes(1, from_uri=uri), PEER)
    assert isinstance(inbound.message, SipRequest)
    assert inbound.message.from_.uri == parse_uri_untrusted(uri)
    host = ".".join([long_text(2, "h")[i : i + 60] for i in range(0, LONG, 60)])
    via = f"SIP/2.0/UDP {host}:5062;branch=z9hG4bK-2"
    inbound = read_message_untrusted(request_bytes(2, via=via), PEER)
    assert isinstance(inbound.message, SipRequest)
    assert inbound.message.top_via.host == host
    assert inbound.message.top_via.received == PEER[0]


def test_distinct_long_uris_from_the_network_do_not_pile_up_in_memory() -> None:
    def make(i: int) -> bytes:
        return request_bytes(i, from_uri=f"sip:{long_text(i)}@example.com")

    assert retained_by_shared(make) < RETAINED_LIMIT


def test_distinct_long_via_hosts_from_the_network_do_not_pile_up_in_memory() -> None:
    def make(i: int) -> bytes:
        text = long_text(i, "h")
        host = ".".join(text[j : j + 60] for j in range(0, len(text), 60))
        return request_bytes(i, via=f"SIP/2.0/UDP {host}:5062;branch=z9hG4bK-{i}")

    assert retained_by_shared(make) < RETAINED_LIMIT


def test_distinct_long_via_received_values_do_not_pile_up_in_memory() -> None:
    def make(i: int) -> bytes:
        via = f"SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-{i};received={long_text(i, 'x')}"
        return request_bytes(i, via=via)

    assert retained_by_shared(make) < RETAINED_LIMIT


def test_short_texts_are_still_remembered() -> None:
    # The memo keeps its point: the same short URI text gives the same parsed object.
    text = "sip:201@example.com;transport=udp"
    assert parse_uri_untrusted(text) is parse_uri_untrusted(text)
    assert sip_transport._ip("192.0.2.7") is sip_transport._ip("192.0.2.7")


# --- the UDP send path on EAGAIN ---------------------------------------------------------------


class StallingSocket(socket.socket):
    """A UDP socket whose sends find no room (EAGAIN) while `full` is set, as a non-blocking
    socket's do when the send buffer is full. Its writability is that of `gate`, a stream
    socket whose buffer the test fills and drains, so that waiting for room really waits."""

    full = False
    refused = 0
    gate: socket.socket | None = None

    def fileno(self) -> int:
        # What trio.lowlevel.wait_writable watches; sendto itself uses the real descriptor.
        return self.gate.fileno() if self.gate is not None else super().fileno()

    def sendto(self, data: Any, *args: Any) -> int:
        if self.full:
            self.refused += 1
            raise BlockingIOError
        return super().sendto(data, *args)


@pytest.fixture
def stalling(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[StallingSocket]]:
    made: list[StallingSocket] = []

    def udp_socket(family: socket.AddressFamily) -> socket.socket:
        sock = StallingSocket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        made.append(sock)
        return sock

    monkeypatch.setattr(sip_transport, "_udp_socket", udp_socket)
    yield made


def fill(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"x" * 65536)
    except BlockingIOError:
        pass


def drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while sock.recv(1 << 20):
            pass
    except BlockingIOError:
        pass


async def test_udp_senders_wait_out_a_full_send_buffer_and_all_get_through(
    nursery: trio.Nursery, stalling: list[StallingSocket]
) -> None:
    async def ignore(message: Any, source: Any) -> None:
        pass

    serve = partial(serve_sip_transports, LOOPBACK, 0, ignore)
    _, transport = await nursery.start(serve)
    assert isinstance(transport, SipTransport)
    [udp] = stalling
    writer, reader = socket.socketpair()
    with writer, reader, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind((LOOPBACK, 0))
        client.setblocking(False)
        fill(writer)
        udp.gate = writer
        udp.full = True
        done: list[int] = []

        async def send(i: int) -> None:
            await transport.send(request_bytes(i), Destination("udp", client.getsockname()))
            done.append(i)

        async with trio.open_nursery() as senders:
            for i in range(3):
                senders.start_soon(send, i)
            await trio.testing.wait_all_tasks_blocked()
            # Every sender found the buffer full and waits (one on the socket, the others
            # for their turn); none failed, none sent.
            assert udp.refused == 3 and done == []
            udp.full = False
            drain(reader)
            with trio.fail_after(GUARD):
                while len(done) < 3:  # noqa: ASYNC110
                    await trio.sleep(0.01)
        assert sorted(done) == [0, 1, 2]
        assert transport.statistics().sent == 3 and transport.statistics().send_errors == 0
        received: set[bytes] = set()
        with trio.fail_after(GUARD):
            while len(received) < 3:
                await trio.lowlevel.wait_readable(client)
                data = client.recv(65536)
                received.add(data)
        assert received == {request_bytes(i) for i in range(3)}


async def test_a_cancelled_udp_sender_leaves_the_next_one_free_to_wait(
    nursery: trio.Nursery, stalling: list[StallingSocket]
) -> None:
    async def ignore(message: Any, source: Any) -> None:
        pass

    _, transport = await nursery.start(partial(serve_sip_transports, LOOPBACK, 0, ignore))
    [udp] = stalling
    writer, reader = socket.socketpair()
    with writer, reader, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind((LOOPBACK, 0))
        fill(writer)
        udp.gate = writer
        udp.full = True
        target = Destination("udp", client.getsockname())
        with trio.move_on_after(0.05) as scope:
            await transport.send(request_bytes(1), target)
        assert scope.cancelled_caught
        # The lock and trio's one-writer slot were given back: a new sender waits, then sends.
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as senders:
                senders.start_soon(transport.send, request_bytes(2), target)
                await trio.testing.wait_all_tasks_blocked()
                udp.full = False
                drain(reader)
        client.setblocking(False)
        with trio.fail_after(GUARD):
            await trio.lowlevel.wait_readable(client)
        assert client.recv(65536) == request_bytes(2)


def test_a_response_made_from_a_stamped_request_routes_by_the_stamped_via() -> None:
    # make_response seeds the response's parsed top Via from the request's: it must be the
    # stamped one (received/rport), exactly what parsing the response's own text gives.
    inbound = read_message_untrusted(request_bytes(7), PEER)
    request = inbound.message
    assert isinstance(request, SipRequest)
    response = make_response(request, 200, to_tag=generate_tag())
    seeded = response.top_via
    fresh = make_response(request.copy(), 200, to_tag="t").top_via  # nothing seeded
    assert seeded == fresh
    assert seeded.received == PEER[0] and seeded.params.get("rport") == str(PEER[1])
    assert str(seeded) == response.headers.get("Via")


async def test_a_udp_sender_waiting_for_room_is_told_when_the_transport_stops(
    stalling: list[StallingSocket],
) -> None:
    # The socket is a plain one now: closing it does not wake a task trio has waiting on it
    # (trio.lowlevel.notify_closing), so a sender waiting for room would hang for ever; it
    # must get SipTransportError like any send on a stopped transport.
    async def ignore(message: Any, source: Any) -> None:
        pass

    writer, reader = socket.socketpair()
    outcome: list[BaseException | None] = []
    with writer, reader:
        fill(writer)
        async with trio.open_nursery() as outer:
            serving = trio.CancelScope()

            async def serve(task_status: trio.TaskStatus[Any]) -> None:
                with serving:
                    await serve_sip_transports(LOOPBACK, 0, ignore, task_status=task_status)

            _, transport = await outer.start(serve)
            [udp] = stalling
            udp.gate = writer
            udp.full = True

            async def send() -> None:
                try:
                    await transport.send(request_bytes(1), Destination("udp", (LOOPBACK, 9)))
                except Exception as exc:  # what it raises is the point
                    outcome.append(exc)
                else:
                    outcome.append(None)

            outer.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert udp.refused == 1 and outcome == []
            serving.cancel()
            with trio.fail_after(GUARD):
                while not outcome:  # noqa: ASYNC110
                    await trio.sleep(0.01)
    [error] = outcome
    assert isinstance(error, sip_transport.SipTransportError)
