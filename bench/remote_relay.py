"""Media packets/s through a remote host: phone side <-> WAN side (issue 6, target >= 60,000/s).

The remote host's media anchor (remotehost.anchor.MediaAnchor) runs alone in a child process,
under trio as the remote host runs it, but without the SIP side, so that its CPU time is its
own: the figure is the anchor's packet path, not call setup. It carries 100 calls; each has a
"phone" socket (plain RTP to and from the call's phone-side port) and a "relay" socket (sealed
WAN packets to and from the anchor's one WAN socket, as the main host's relay would send them).
Of the 200 flows, half go phone -> WAN (172-byte RTP in, sealed 204-byte packet out) and half WAN
-> phone (sealed in, opened, RTP out), so both halves of the anchor's work are in the figure.

The method is figure 2's (`bench_relay` in bench/run.py), with its helpers: the same Python
sender (paced, packets spread round-robin over the flows, flow 0 the delay probe every 10th
packet), the same counting process and probe process, the highest paced rate with < 0.1 % loss
(flat out first, then down by 25 % steps), CPU per packet from /proc (user + system of the
anchor's process over the run, divided by the packets delivered), the median of the repeats.
The anchor beside it is the C relay (bench/c_relay.c) measured by figure 2's own `relay_run`
in the same run: the least "receive, look up, send" costs on this machine, without crypto.

    .venv/bin/python bench/remote_relay.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project (shared.*, tests.*)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/run.py

from run import (
    FLOWS,
    FULL,
    PROBE_EVERY,
    QUICK,
    RUN_COUNTER,
    CRelay,
    Figure,
    Mode,
    RelayRun,
    ensure_c_relay,
    find_capacity,
    log,
    median,
    office_key,
    profile_process,
    relay_capacity,
    send_and_measure,
)

from tests.peerhelpers import LOOPBACK

TARGET = 60_000
CALLS = FLOWS // 2
KEY = office_key("remote-bench")
"""The office's media key, as the login would give it; every call's leg derives its own."""


def anchor_process(conn: multiprocessing.connection.Connection) -> None:
    """Runs MediaAnchor alone in this process; opens fresh calls (new legs) for every run."""
    import trio

    from remotehost.anchor import CallMedia, MediaAnchor

    async def main() -> None:
        anchor = MediaAnchor(LOOPBACK, wan_ip=LOOPBACK)
        calls: list[CallMedia] = []
        async with trio.open_nursery() as nursery:
            wan_port = await nursery.start(anchor.serve)
            conn.send(wan_port)
            while True:
                command = await trio.to_thread.run_sync(conn.recv)
                if command[0] == "calls":
                    run, targets = command[1], command[2]
                    for media in calls:
                        media.close()
                    calls = []
                    for n, (phone, relay) in enumerate(targets):
                        media = await anchor.open_call(f"r{run}c{n}")
                        media.set_phone_target(*phone)
                        media.set_wan(leg_of(run, n), relay, KEY)
                        calls.append(media)
                    conn.send([media.local_port for media in calls])
                elif command[0] == "statistics":
                    conn.send([dataclasses.asdict(media.statistics()) for media in calls])
                else:
                    break
            nursery.cancel_scope.cancel()

    trio.run(main)


def leg_of(run: int, call: int) -> int:
    return (run * 1000 + call) & 0xFFFFFFFF


class Anchor:
    name = "ours (MediaAnchor)"

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=anchor_process, args=(child,), daemon=True)
        self.process.start()
        self.wan = (LOOPBACK, self.conn.recv())
        assert self.process.pid is not None
        self.pid = self.process.pid

    def open_calls(
        self, run: int, targets: list[tuple[tuple[str, int], tuple[str, int]]]
    ) -> list[int]:
        self.conn.send(("calls", run, targets))
        ports: list[int] = self.conn.recv()
        return ports

    def statistics(self) -> list[dict[str, object]]:
        self.conn.send(("statistics",))
        stats: list[dict[str, object]] = self.conn.recv()
        return stats

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("stop",))
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


def uplink_packet(call: int, n: int, index: int) -> bytes:
    """What a phone sends: 172 bytes of RTP, the run's packet index in the first 8 of audio."""
    from shared.media.rtp import RtpPacket

    body = index.to_bytes(8, "big").ljust(160, b"\xd5")
    return RtpPacket(0, n & 0xFFFF, 160 * n & 0xFFFFFFFF, call, body).encode()


def index_of(flow: int, data: bytes) -> int | None:
    """The packet index of what a receiver got: sealed on the WAN side (even flows, phone ->
    WAN), plain RTP on the phone side (odd flows, WAN -> phone)."""
    from shared.media.wan import DIRECTION_TO_RELAY, WanPacketError, open_untrusted

    if flow % 2 == 0:
        try:
            data = open_untrusted(KEY, data, DIRECTION_TO_RELAY).payload
        except WanPacketError:
            return None
    return int.from_bytes(data[12:20], "big") if len(data) >= 20 else None


def remote_run(
    anchor: Anchor, calls: int, seconds: float, rate: float | None, count: bool = True
) -> RelayRun:
    """`relay_run` of bench/run.py for the anchor: the same sender loop, counter and probe,
    but each packet goes to its own flow's address (a call's phone port or the WAN port)."""
    from shared.media.wan import DIRECTION_FROM_RELAY, seal

    run = next(RUN_COUNTER)
    phones: list[socket.socket] = []
    relays: list[socket.socket] = []
    for _ in range(calls):
        for group in (phones, relays):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((LOOPBACK, 0))
            group.append(sock)
    ports = anchor.open_calls(
        run, [(p.getsockname(), r.getsockname()) for p, r in zip(phones, relays, strict=True)]
    )
    # Latch every phone (RFC 4961: the anchor answers where the phone sends from).
    for call, phone in enumerate(phones):
        phone.sendto(uplink_packet(call, 0, 0), (LOOPBACK, ports[call]))
    time.sleep(0.3)
    for sock in phones + relays:  # the keepalives and latching packets are not the run's
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.recv(2048)
        sock.setblocking(True)
    # Flow 2c: call c's phone -> the anchor's phone port -> WAN (received by relay c).
    # Flow 2c+1: relay c -> the anchor's WAN port -> call c's phone.
    senders, receivers, targets = [], [], []
    for call in range(calls):
        senders += [phones[call], relays[call]]
        receivers += [relays[call], phones[call]]
        targets += [(LOOPBACK, ports[call]), anchor.wan]
    flows = 2 * calls
    total = int((rate if rate is not None else 150_000) * seconds)
    order: list[tuple[socket.socket, bytes, tuple[str, int]]] = []
    counters = [1] * flows  # packet 0 of each phone flow latched it
    for i in range(max(flows, total)):
        flow = 0 if i % PROBE_EVERY == 0 else 1 + (i - i // PROBE_EVERY - 1) % (flows - 1)
        call, n = flow // 2, counters[flow]
        packet = uplink_packet(call, n, i)
        if flow % 2:
            packet = seal(KEY, DIRECTION_FROM_RELAY, leg_of(run, call), n, packet)
        order.append((senders[flow], packet, targets[flow]))
        counters[flow] += 1
    try:
        return send_and_measure(
            order, rate, seconds, receivers if count else receivers[:1], index_of, anchor.pid
        )
    finally:
        for sock in phones + relays:
            sock.close()


def remote_capacity(
    anchor: Anchor, mode: Mode, previous: RelayRun | None
) -> tuple[RelayRun | None, RelayRun]:
    """`find_capacity` of bench/run.py with `remote_run`."""
    return find_capacity(
        anchor.name, lambda rate: remote_run(anchor, CALLS, mode.relay_seconds, rate), previous
    )


def bench_relay_remote(
    mode: Mode, c_relay_figure: Figure | None = None, work: Path | None = None
) -> Figure:
    """The figure; `c_relay_figure` is figure 2 when it was measured in the same run, whose
    C relay numbers (same sender, same method) are then taken instead of measured again; with
    `work` (a directory) also a py-spy profile of the anchor at 90 % of its capacity."""
    figure = Figure(
        "relay_remote",
        f"Media packets/s through a remote host's media anchor (phone side <-> WAN side,"
        f" {CALLS} calls, both directions, < 0.1 % loss)",
        "packets/s",
        ">= 60,000/s",
        anchor_name="C relay, recvmmsg/sendmmsg",
        cpu_unit="us CPU per packet",
    )
    ours: list[tuple[RelayRun | None, RelayRun]] = []
    c_runs: list[tuple[RelayRun | None, RelayRun]] = []
    anchor = Anchor()
    measure_c = c_relay_figure is None or c_relay_figure.anchor is None
    c_relay = CRelay(ensure_c_relay())
    try:
        for n in range(mode.repeats):
            log(f"relay_remote, {anchor.name}, repeat {n + 1}")
            ours.append(remote_capacity(anchor, mode, ours[-1][1] if ours else None))
            if not measure_c:
                continue
            log(f"relay_remote, {c_relay.name}, repeat {n + 1}")
            c_runs.append(relay_capacity(c_relay, mode, c_runs[-1][1] if c_runs else None))
            for side, (flat, best) in (("ours", ours[-1]), ("c", c_runs[-1])):
                for what, run in (("flat out", flat), ("highest < 0.1 % loss", best)):
                    if run is not None:
                        figure.runs.append(
                            {"side": side, "run": what, **dataclasses.asdict(run),
                             "offered_pps": run.offered_pps,
                             "delivered_pps": run.delivered_pps, "loss": run.loss}
                        )  # fmt: skip
        totals = anchor.statistics()
        if work is not None:
            rate = 0.9 * median([b.delivered_pps for _, b in ours])
            work.mkdir(parents=True, exist_ok=True)
            figure.note += profile_process(
                "relay_remote",
                "the remote host's media anchor at 90 % of its capacity",
                anchor.pid,
                work,
                lambda seconds: remote_run(anchor, CALLS, min(seconds, 3.0), rate),
                f"{rate:,.0f} packets/s offered",
            )
    finally:
        anchor.close()
        c_relay.close()

    def cpu_us(runs: list[tuple[RelayRun | None, RelayRun]]) -> float:
        return median([1e6 * b.cpu / b.delivered for _, b in runs if b.delivered] or [0.0])

    figure.ours = median([b.delivered_pps for _, b in ours])
    figure.ours_cpu = cpu_us(ours)
    if measure_c:
        figure.anchor = median([b.delivered_pps for _, b in c_runs])
        figure.anchor_cpu = cpu_us(c_runs)
    else:
        assert c_relay_figure is not None
        figure.anchor = c_relay_figure.anchor
        figure.anchor_cpu = c_relay_figure.anchor_cpu
    figure.target_met = figure.ours >= TARGET
    failures = sum(int(str(s["send_failures"])) for s in totals)
    figure.note = figure.note + (
        "MediaAnchor alone in its own process (trio, as in the remote host, without the SIP"
        f" side), {CALLS} calls, each with a phone socket and a relay socket of the bench's:"
        " half the packets phone -> WAN (RTP in, sealed out), half WAN -> phone (sealed in,"
        " opened, RTP out); sender, counter, probe and the < 0.1 % loss rule as in the relay"
        f" figure. The last run's calls had {failures} send failures. The C relay beside it is"
        " figure 2's (one socket, no crypto), fed by the same sender"
        + (" (measured again here)." if measure_c else " (figure 2's runs of this suite).")
    )
    flats = [f for f, _ in c_runs if f is not None]
    if flats and median([f.delivered_pps for f in flats]) >= 0.95 * median(
        [f.offered_pps for f in flats]
    ):
        figure.note += (
            " The C relay kept up with all the Python sender offered: its figure is the"
            " sender's limit, a lower bound."
        )
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    figure = bench_relay_remote(QUICK if args.quick else FULL)
    print(f"{figure.name}: {figure.ours:,.0f} {figure.unit}, {figure.ours_cpu:.2f} us CPU/packet")
    print(f"{figure.anchor_name}: {figure.anchor:,.0f}, {figure.anchor_cpu:.2f} us CPU/packet")
    print(figure.note)


if __name__ == "__main__":
    main()
