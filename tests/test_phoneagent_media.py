"""The trio media stream: pacing against the clock (virtual time), symmetric RTP, recording."""

from __future__ import annotations

import itertools
from pathlib import Path

import trio
import trio.testing

from phoneagent.audio import ToneSource, WavRecorder
from phoneagent.media import MediaStream, open_media_stream
from phoneagent.negotiation import MediaPlan
from phoneagent.tone import dominant_frequency
from shared.media.rtp import parse_rtp_untrusted

GUARD = 60.0


async def udp_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock


async def collect(sock: trio.socket.SocketType, into: list[tuple[float, bytes, object]]) -> None:
    while True:
        data, source = await sock.recvfrom(2048)
        into.append((trio.current_time(), data, source))


async def test_twenty_ms_packets_without_drift(autojump_clock: trio.testing.MockClock) -> None:
    """500 ticks in 10 s of (virtual) time, each timestamp 160 after the last, from the
    socket we receive on."""
    stream = await open_media_stream("127.0.0.1")
    peer = await udp_socket()
    received: list[tuple[float, bytes, object]] = []
    stream.source = ToneSource(440)
    stream.configure(MediaPlan(peer.getsockname(), 0, 101, "sendrecv"))
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, peer, received)
            nursery.start_soon(stream.run)
            await trio.sleep(10.0 + 0.01)
            nursery.cancel_scope.cancel()
    stream.close()
    peer.close()
    assert len(received) == 500
    packets = [parse_rtp_untrusted(data) for _, data, _ in received]
    steps = {(b.timestamp - a.timestamp) % 2**32 for a, b in itertools.pairwise(packets)}
    assert steps == {160}
    seqs = {(b.sequence - a.sequence) % 65536 for a, b in itertools.pairwise(packets)}
    assert seqs == {1}
    # The n-th packet leaves at start + n*20 ms: the last one exactly 9.98 s after the first.
    assert abs((received[-1][0] - received[0][0]) - 9.98) < 1e-6
    assert {source for _, _, source in received} == {stream.address}  # symmetric RTP


async def test_a_stalled_process_skips_ticks_instead_of_bursting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = await open_media_stream("127.0.0.1")
    peer = await udp_socket()
    received: list[tuple[float, bytes, object]] = []
    stream.configure(MediaPlan(peer.getsockname(), 0, None, "sendrecv"))
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, peer, received)
            nursery.start_soon(stream.run)
            await trio.sleep(1.0)
            before = len(received)
            autojump_clock.jump(5.0)  # as if the process had been stopped for five seconds
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    stream.close()
    peer.close()
    times = [when for when, _, _ in received[before:]]
    # Catching up sends at most a few packets at once, not 250 of them.
    burst = max(sum(1 for t in times if abs(t - u) < 1e-9) for u in times)
    assert burst <= 12


async def test_nothing_is_sent_without_a_remote_or_while_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = await open_media_stream("127.0.0.1")
    peer = await udp_socket()
    received: list[tuple[float, bytes, object]] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, peer, received)
            nursery.start_soon(stream.run)
            await trio.sleep(0.5)  # no plan yet: nothing to do
            stream.configure(MediaPlan(None, 0, 101, "sendrecv"))
            await trio.sleep(0.5)  # no address (port 0 / hold address)
            stream.configure(MediaPlan(peer.getsockname(), 0, 101, "recvonly"))
            await trio.sleep(0.5)  # the peer holds us
            stream.local_hold = True
            stream.configure(MediaPlan(peer.getsockname(), 0, 101, "sendonly"))
            await trio.sleep(0.5)  # we hold the peer (no music on hold)
            assert received == []
            stream.local_hold = False
            stream.configure(MediaPlan(peer.getsockname(), 0, 101, "sendrecv"))
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    stream.close()
    peer.close()
    assert len(received) >= 20
    assert stream.statistics() is not None


async def test_codec_change_keeps_the_sent_count_and_switches_law(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = await open_media_stream("127.0.0.1")
    peer = await udp_socket()
    received: list[tuple[float, bytes, object]] = []
    stream.configure(MediaPlan(peer.getsockname(), 0, 101, "sendrecv"))
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, peer, received)
            nursery.start_soon(stream.run)
            await trio.sleep(0.2 + 0.001)
            stream.configure(MediaPlan(peer.getsockname(), 8, 101, "sendrecv"))
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    stream.close()
    peer.close()
    types = [parse_rtp_untrusted(data).payload_type for _, data, _ in received]
    assert types[0] == 0 and types[-1] == 8
    stats = stream.statistics()
    assert stats is not None and stats.packets_sent == len(received) and stats.codec == "PCMA"


async def test_recording_holds_what_arrived(tmp_path: Path) -> None:
    a = await open_media_stream("127.0.0.1")
    b = await open_media_stream("127.0.0.1")
    a.source = ToneSource(1800)
    b.recorder = WavRecorder(tmp_path / "b.wav")
    a.configure(MediaPlan(b.address, 8, 101, "sendonly"))
    b.configure(MediaPlan(a.address, 8, 101, "recvonly"))
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    a.close()
    b.close()
    assert dominant_frequency(tmp_path / "b.wav") == 1800
    stats_a, stats_b = a.statistics(), b.statistics()
    assert stats_a is not None and stats_b is not None
    assert stats_b.packets_sent == 0 and stats_a.packets_received == 0
    assert stats_b.packets_received > 0


async def test_send_digits_without_media_is_refused() -> None:
    stream = await open_media_stream("127.0.0.1")
    try:
        await stream.send_digits("1")
    except ValueError as exc:
        assert "not answered" in str(exc)
    else:
        raise AssertionError("digits were accepted without a session")
    finally:
        stream.close()


async def test_close_is_safe_before_run(tmp_path: Path) -> None:
    stream: MediaStream = await open_media_stream("127.0.0.1")
    stream.recorder = WavRecorder(tmp_path / "empty.wav")
    stream.close()
    assert (tmp_path / "empty.wav").exists()
    assert dominant_frequency(tmp_path / "empty.wav") is None
