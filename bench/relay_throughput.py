"""How many sealed media packets per second the relay carries on loopback (not a test).

The relay (mainhost.relay.MediaRelay) runs alone in a child process, so that its CPU time is
its own. This process plays 2 x N offices: for each of N calls one sender socket (the calling
office) sends 172-byte RTP packets (12-byte header + 160 bytes of G.711, 20 ms of audio),
sealed in advance, and one receiver socket (the called office) counts what the relay delivers.

    .venv/bin/python bench/relay_throughput.py --flows 200 --seconds 5
    .venv/bin/python bench/relay_throughput.py --flows 50 --seconds 5 --flat-out

Paced (default): every flow sends one packet per 20 ms, as a phone does (50 packets/s per flow).
Flat out: every flow sends as fast as this process can for the time given, to find the
relay's ceiling (the loss then is the relay's overload, and the delivered packets/s its
capacity). Reports packets/s offered
and delivered, loss, and the relay's CPU time per packet.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import os
import selectors
import socket
import time
from typing import Any

import trio

from mainhost.relay import MediaRelay
from shared.media.rtp import RtpPacket
from shared.media.wan import DIRECTION_TO_RELAY, seal, seal_keepalive

LOOPBACK = "127.0.0.1"
PACKET_INTERVAL = 0.020


def office_key(name: str) -> bytes:
    return name.encode().ljust(32, b"k")[:32]


def relay_process(conn: multiprocessing.connection.Connection, flows: int) -> None:
    async def main() -> None:
        relay = MediaRelay(lambda office: office_key(office))
        legs = []
        for flow in range(flows):
            legs.append((relay.offer(f"c{flow}", f"a{flow}"), relay.answer(f"c{flow}", f"b{flow}")))
        async with trio.open_nursery() as nursery:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((LOOPBACK, 0))
            address = await nursery.start(relay.serve, sock)
            conn.send((address, legs))
            await trio.to_thread.run_sync(conn.recv)  # "start"
            cpu = time.process_time()
            before = relay.statistics()
            conn.send("started")
            await trio.to_thread.run_sync(conn.recv)  # "stop"
            cpu = time.process_time() - cpu
            after = relay.statistics()
            conn.send(
                {
                    "cpu": cpu,
                    "received": after.received - before.received,
                    "forwarded": after.forwarded - before.forwarded,
                    "dropped": {
                        "bad_tag": after.dropped_bad_tag,
                        "replay": after.dropped_replay,
                        "unknown_leg": after.dropped_unknown_leg,
                        "send_failures": after.send_failures,
                    },
                }
            )
            nursery.cancel_scope.cancel()
            sock.close()

    trio.run(main)


def run(flows: int, seconds: float, flat_out: bool) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=relay_process, args=(parent, flows), daemon=True)
    process.start()
    relay_address, legs = child.recv()

    senders: list[socket.socket] = []
    receivers: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    for flow, (leg_a, leg_b) in enumerate(legs):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind((LOOPBACK, 0))
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        receiver.bind((LOOPBACK, 0))
        receiver.setblocking(False)
        # Latch both legs, the way the anchor's first keepalive does.
        sender.sendto(seal_keepalive(office_key(f"a{flow}"), 0, leg_a, 0), relay_address)
        receiver.sendto(seal_keepalive(office_key(f"b{flow}"), 0, leg_b, 0), relay_address)
        selector.register(receiver, selectors.EVENT_READ)
        senders.append(sender)
        receivers.append(receiver)
    time.sleep(0.5)

    # Seal everything in advance: this process's CPU must go to sending, not to AES.
    if flat_out:
        per_flow = max(1, int(min(seconds * 60_000, 600_000) / flows))
    else:
        per_flow = max(1, int(seconds / PACKET_INTERVAL))
    packets = []
    for flow, (leg_a, _) in enumerate(legs):
        key = office_key(f"a{flow}")
        payload = RtpPacket(0, 0, 0, flow, b"\xd5" * 160).encode()
        assert len(payload) == 172
        packets.append(
            [seal(key, DIRECTION_TO_RELAY, leg_a, 1 + n, payload) for n in range(per_flow)]
        )

    def drain() -> int:
        count = 0
        for key, _ in selector.select(timeout=0):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            while True:
                try:
                    sock.recv(2048)
                except BlockingIOError:
                    break
                count += 1
        return count

    drain()
    child.send("start")
    assert child.recv() == "started"
    sent = 0
    received = 0
    start = time.monotonic()
    end = start + seconds
    # Phones are not synchronised: in paced mode the flows' packets are spread over each 20 ms.
    slot = PACKET_INTERVAL / flows
    for n in range(per_flow):
        if flat_out and time.monotonic() > end:
            break
        for flow in range(flows):
            if not flat_out:
                deadline = start + n * PACKET_INTERVAL + flow * slot
                while time.monotonic() < deadline:
                    received += drain()
            try:
                senders[flow].sendto(packets[flow][n], relay_address)
                sent += 1
            except BlockingIOError:
                pass
        received += drain()
    elapsed = time.monotonic() - start
    quiet_until = time.monotonic() + 1.0
    while time.monotonic() < quiet_until:
        received += drain()
        time.sleep(0.001)
    child.send("stop")
    relay = child.recv()
    process.join(5)
    for sock in senders + receivers:
        sock.close()
    forwarded = relay["forwarded"]
    return {
        "flows": flows,
        "mode": "flat out" if flat_out else "paced 50 pkt/s per flow",
        "seconds": round(elapsed, 2),
        "sent": sent,
        "relay_received": relay["received"],
        "relay_forwarded": forwarded,
        "delivered": received,
        "offered_pps": round(sent / elapsed),
        "delivered_pps": round(received / elapsed),
        "loss_percent": round(100 * (sent - received) / sent, 3) if sent else 0.0,
        "relay_cpu_seconds": round(relay["cpu"], 3),
        "relay_cpu_us_per_packet": round(1e6 * relay["cpu"] / max(relay["received"], 1), 2),
        "relay_drops": relay["dropped"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--flat-out", action="store_true")
    args = parser.parse_args()
    result = run(args.flows, args.seconds, args.flat_out)
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(f"cpus: {os.cpu_count()}")


if __name__ == "__main__":
    main()
