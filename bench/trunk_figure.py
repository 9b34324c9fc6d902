"""Trunk messages/s over one connection, pipelined (issue 6, figure 4, target >= 100,000/s).

The same measurement as `bench_trunk` in bench/run.py, plus where the CPU goes. A client and a
server `TrunkSession`, each driven by its `TrunkConnection`, in one process over loopback TCP
(no TLS): once logged in, the client queues `CallProgress` messages 200 at a time
(`send_nowait`) and flushes each batch with one write; the server takes them one
`next_event()` at a time. The rate is messages over the wall time from the first message
received to the last; the CPU per message is this process's user + system time over the same
span (both ends, one trio thread, one core).

Each repeat also measures the sans-I/O part alone, without trio or sockets: the client
session's `send()` (encoding and queueing) and the server session's `receive_data()` plus
`next_event()` (framing, decoding, delivery), so the note can say what share of the CPU per
message the codec and session take and what is left for trio, the socket calls and the loop.

    .venv/bin/python bench/trunk_figure.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project (shared.*, tests.*)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/run.py

from run import FULL, QUICK, Figure, Mode, log, median

from tests.peerhelpers import LOOPBACK

TARGET = 100_000
BATCH = 200  # messages the client queues before each write
CA_CERT = b"bench CA"
SECRET = b"s" * 32


def bench_trunk(mode: Mode) -> Figure:
    figure = Figure(
        "trunk",
        "Trunk messages/s over one connection, pipelined (CallProgress)",
        "messages/s",
        ">= 100,000/s",
        cpu_unit="us CPU per message (both ends)",
    )
    for n in range(mode.repeats):
        log(f"trunk, repeat {n + 1}")
        rate, cpu = trunk_once(mode.trunk_messages)
        send, receive = trunk_sans_io(mode.trunk_messages)
        log(f"  {rate:,.0f} messages/s, {1e6 * cpu / mode.trunk_messages:.2f} us CPU per message")
        figure.runs.append(
            {
                "messages": mode.trunk_messages,
                "rate": rate,
                "cpu": cpu,
                "sans_io_send_us": 1e6 * send,
                "sans_io_receive_us": 1e6 * receive,
            }
        )
    figure.ours = median([r["rate"] for r in figure.runs])
    figure.ours_cpu = median([1e6 * r["cpu"] / r["messages"] for r in figure.runs])
    figure.target_met = figure.ours >= TARGET
    send_us = median([r["sans_io_send_us"] for r in figure.runs])
    receive_us = median([r["sans_io_receive_us"] for r in figure.runs])
    rest_us = max(figure.ours_cpu - send_us - receive_us, 0.0)
    figure.note = (
        "No anchor. Client and server TrunkSession with TrunkConnection in one process (one"
        " core), over loopback TCP without TLS: the session, framing and msgpack cost, and"
        f" trio's. Of the {figure.ours_cpu:.2f} us CPU per message, the sessions alone"
        f" (measured apart, without trio or sockets) take {send_us:.2f} us to encode and queue"
        f" and {receive_us:.2f} us to frame, decode and deliver; the other {rest_us:.2f} us"
        " are trio, the socket calls and the two loops. One core allows at most"
        f" {1e6 / figure.ours_cpu:,.0f} messages/s."
    )
    return figure


def trunk_once(messages: int) -> tuple[float, float]:
    """(messages/s, CPU seconds) for `messages` CallProgress over one loopback connection."""
    import trio

    from shared.aio.trunk import TrunkConnection
    from shared.wire.messages import CallProgress
    from shared.wire.session import Closed, LoginAttempt, Received, State, TrunkSession

    result: dict[str, float] = {}

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        port = listeners[0].socket.getsockname()[1]
        done = trio.Event()

        async def serve(stream: trio.SocketStream) -> None:
            session = TrunkSession.server(
                trio.current_time(), nonce=b"n" * 32, software="bench", ca_cert=CA_CERT,
                heartbeat_interval=5.0, dead_after=30.0,
            )  # fmt: skip
            conn = TrunkConnection(stream, session)
            received = 0
            started = 0.0
            while True:
                event = await conn.next_event()
                if isinstance(event, Received):
                    if received == 0:
                        started = time.perf_counter()
                        result["cpu"] = time.process_time()
                    received += 1
                    if received == messages:
                        result["seconds"] = time.perf_counter() - started
                        result["cpu"] = time.process_time() - result["cpu"]
                        done.set()
                        return
                elif isinstance(event, LoginAttempt):
                    session.complete_login(
                        SECRET, now=trio.current_time(), public_ip=LOOPBACK, public_port=1,
                        session="bench",
                    )  # fmt: skip
                elif isinstance(event, Closed):
                    done.set()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve, listeners)
            stream = await trio.open_tcp_stream(LOOPBACK, port)
            session = TrunkSession.client(
                trio.current_time(), office="bench", secret=SECRET, client_nonce=b"c" * 32,
                software="bench", ca_sha256=hashlib.sha256(CA_CERT).digest(),
            )  # fmt: skip
            client = TrunkConnection(stream, session)
            established = trio.Event()

            async def client_events() -> None:
                while session.state is not State.CLOSED:
                    await client.next_event()
                    if session.state is State.ESTABLISHED:
                        established.set()

            nursery.start_soon(client_events)
            await established.wait()
            message = CallProgress("bench-call-0123456789@127.0.0.1", 180, "Ringing")
            for i in range(0, messages, BATCH):
                for _ in range(min(BATCH, messages - i)):
                    client.send_nowait(message)
                await client.flush()
            await done.wait()
            nursery.cancel_scope.cancel()

    trio.run(main)
    if "seconds" not in result:
        raise RuntimeError("the trunk closed before every message arrived")
    return messages / result["seconds"], result["cpu"]


def trunk_sans_io(messages: int) -> tuple[float, float]:
    """CPU seconds per message of the client's send() and the server's receive side, alone."""
    from shared.wire.messages import CallProgress
    from shared.wire.session import LoginAttempt, State, TrunkSession

    now = 0.0
    client = TrunkSession.client(
        now, office="bench", secret=SECRET, client_nonce=b"c" * 32, software="bench",
        ca_sha256=hashlib.sha256(CA_CERT).digest(),
    )  # fmt: skip
    server = TrunkSession.server(
        now, nonce=b"n" * 32, software="bench", ca_cert=CA_CERT, heartbeat_interval=5.0,
        dead_after=30.0,
    )  # fmt: skip
    for _ in range(3):  # the handshake: bytes shuttled until both sides are logged in
        if data := client.data_to_send():  # (b"" would mean the peer hung up)
            server.receive_data(data, now)
        while (event := server.next_event()) is not None:
            if isinstance(event, LoginAttempt):
                server.complete_login(
                    SECRET, now=now, public_ip=LOOPBACK, public_port=1, session="bench"
                )
        if data := server.data_to_send():
            client.receive_data(data, now)
        while client.next_event() is not None:
            pass
    if client.state is not State.ESTABLISHED or server.state is not State.ESTABLISHED:
        raise RuntimeError("the sans-I/O sessions did not log in")
    message = CallProgress("bench-call-0123456789@127.0.0.1", 180, "Ringing")
    send = receive = 0.0
    for i in range(0, messages, BATCH):
        count = min(BATCH, messages - i)
        t0 = time.process_time()
        for _ in range(count):
            client.send(message)
        data = client.data_to_send()
        t1 = time.process_time()
        server.receive_data(data, now)
        delivered = 0
        while server.next_event() is not None:
            delivered += 1
        t2 = time.process_time()
        if delivered != count:
            raise RuntimeError(f"{delivered} of {count} messages delivered")
        send += t1 - t0
        receive += t2 - t1
    return send / messages, receive / messages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats of 50,000 messages")
    args = parser.parse_args()
    figure = bench_trunk(QUICK if args.quick else FULL)
    print(
        f"{figure.name}: {figure.ours:,.0f} {figure.unit},"
        f" {figure.ours_cpu:.2f} {figure.cpu_unit}, target met: {figure.target_met}"
    )
    print(figure.note)
    for run in figure.runs:
        print(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
