"""The trio side of a call's media: one UDP socket, the 20 ms clock, playout and recording.

This module owns the I/O around `rtpsession.RtpSession`: a UDP socket bound on our address
(symmetric RTP, RFC 4961: we send from the socket we receive on, so a NAT or a relay sees one
flow), a receive loop that never blocks on anything but the socket, and a tick loop paced by
the trio clock against absolute deadlines (start + n * 20 ms, so sleeping late never makes the
stream drift; far behind, it skips ticks rather than burst). Each tick takes a frame from the
audio source to send and plays one frame out of the jitter buffer into the recorder. It does
not negotiate (see `negotiation.py`) or know SIP.
"""

from __future__ import annotations

import logging
import socket

import trio

from phoneagent.audio import SILENCE_FRAME, AudioSource, SilenceSource, WavRecorder
from phoneagent.negotiation import MediaPlan
from phoneagent.rtpsession import PTIME, RtpSession, RtpStatistics

log = logging.getLogger("phoneagent.media")
_RECEIVE_SIZE = 2048
_MAX_BEHIND = 10  # ticks: further behind than this (a stalled process) we skip, not burst


class MediaStream:
    """One call's RTP endpoint. `open_media_stream` binds it; `run` until cancelled."""

    def __init__(self, sock: trio.socket.SocketType, address: tuple[str, int]) -> None:
        self._sock = sock
        self.address = address
        self.session: RtpSession | None = None
        self.remote: tuple[str, int] | None = None
        self.source: AudioSource = SilenceSource()
        self.recorder: WavRecorder | None = None
        self.local_hold = False
        self.send_errors = 0
        self.started_at: float | None = None
        self._digits_done = trio.Event()

    def configure(self, plan: MediaPlan) -> None:
        """Apply a negotiated plan: codec, remote address, whether we send."""
        session = self.session
        if (
            session is None
            or session.payload_type != plan.payload_type
            or session.dtmf_payload_type != plan.dtmf_payload_type
        ):
            fresh = RtpSession(
                payload_type=plan.payload_type, dtmf_payload_type=plan.dtmf_payload_type
            )
            if session is not None:
                fresh.packets_sent = session.packets_sent  # one call, one count
            self.session = session = fresh
        self.remote = plan.remote
        session.sending = plan.sends and not self.local_hold

    def statistics(self) -> RtpStatistics | None:
        return self.session.statistics() if self.session is not None else None

    async def send_digits(self, digits: str) -> None:
        """Queue DTMF digits and wait until their last packet is sent."""
        session = self.session
        if session is None:
            raise ValueError("no media yet: the call is not answered")
        session.send_digits(digits)
        while session.dtmf_pending:
            self._digits_done = trio.Event()
            await self._digits_done.wait()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive)
            await self._tick()

    async def _receive(self) -> None:
        while True:
            try:
                data, _ = await self._sock.recvfrom(_RECEIVE_SIZE)
            except OSError as exc:  # e.g. ICMP port unreachable reported on Linux
                log.debug("RTP receive error: %s", exc)
                continue
            if self.session is not None:
                self.session.receive_untrusted(data, trio.current_time())

    async def _tick(self) -> None:
        start = trio.current_time()
        self.started_at = start
        n = 0
        while True:
            n += 1
            deadline = start + n * PTIME
            now = trio.current_time()
            if now - deadline > _MAX_BEHIND * PTIME:
                skipped = int((now - deadline) / PTIME)
                n += skipped
                deadline = start + n * PTIME
            await trio.sleep_until(deadline)
            session = self.session
            if session is None:
                continue
            pcm = self.source.frame() if session.sending else SILENCE_FRAME
            packet = session.tick(pcm)
            if packet is not None and self.remote is not None:
                try:
                    await self._sock.sendto(packet, self.remote)
                except OSError as exc:
                    self.send_errors += 1
                    log.debug("RTP send to %s failed: %s", self.remote, exc)
            if not session.dtmf_pending:
                self._digits_done.set()
            heard = session.play(trio.current_time())
            if self.recorder is not None:
                if heard is not None:
                    self.recorder.write(heard)
                elif session.playing:
                    self.recorder.write(SILENCE_FRAME)

    def close(self) -> None:
        """Close the socket and write the recording (with what was still buffered)."""
        self._sock.close()
        self._digits_done.set()
        if self.recorder is not None:
            if self.session is not None:
                for pcm in self.session.drain():
                    self.recorder.write(pcm)
            recorder, self.recorder = self.recorder, None
            recorder.close()


async def open_media_stream(local_ip: str, port: int = 0) -> MediaStream:
    """Bind a UDP socket for RTP on `local_ip` (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await sock.bind((local_ip, port))
    except BaseException:
        sock.close()
        raise
    host, bound = sock.getsockname()[:2]
    return MediaStream(sock, (str(host), int(bound)))
