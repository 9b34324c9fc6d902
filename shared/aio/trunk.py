"""Drive a sans-I/O `TrunkSession` over a trio stream (TLS over TCP in production).

This module owns the only I/O of a trunk connection: reading bytes into the session, writing out
what it queues, calling its timer, and one lock-protected send path that turns every transport
failure into `ConnectionLost` (trio-websocket's `_send`). It does not decide anything: logins,
directories and offices belong to the hosts.
"""

from __future__ import annotations

import ssl

import trio

from shared.wire.frame import ErrorCode
from shared.wire.messages import Message
from shared.wire.session import Closed, Event, State, TrunkSession

RECEIVE_SIZE = 65536
# next_event() hands out events that are already decoded without a trip through the scheduler;
# after this many in a row it yields once, so a flood on the trunk cannot starve other tasks.
EVENTS_PER_SCHEDULE_POINT = 64
TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)


class ConnectionLost(Exception):
    """The trunk's transport failed; the message says how."""


class TrunkConnection:
    """A session and its stream. One task calls `next_event()`; any task may `send()`."""

    def __init__(self, stream: trio.abc.Stream, session: TrunkSession) -> None:
        self.stream = stream
        self.session = session
        self._send_lock = trio.Lock()
        self._closed_event_seen = False
        self._cheap_events = 0  # events next_event() may return without a schedule point

    async def send(self, msg: Message, *, channel: int = 0) -> None:
        """Queue `msg` and write it (with whatever else is queued) before returning."""
        self.send_nowait(msg, channel=channel)
        await self.flush()

    def send_nowait(self, msg: Message, *, channel: int = 0) -> None:
        """Queue `msg` for the next write (`flush()`, `send()`, or `next_event()`).

        For many messages at once: a write per message costs a system call and trips through
        the scheduler on both ends, several times what encoding the message does, so queue
        them all with this and `flush()` once.
        """
        if self.session.state is not State.ESTABLISHED:
            raise ConnectionLost("trunk session is not established")
        self.session.send(msg, channel=channel)

    async def flush(self) -> None:
        """Write every frame queued since the last write, in one `send_all`.

        Frames queued by other tasks while a write is under way go out in the next one: a
        task that finds the lock taken waits, then sends whatever has piled up (or nothing).
        A free lock is taken without the schedule point `Lock.acquire()` makes: the write that
        follows is one (and with nothing to write there is only the cancellation check).
        """
        lock = self._send_lock
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()  # another task is writing: after it, in turn
        try:
            data = self.session.data_to_send()
            if not data:
                return
            # A peer that stops reading must not block us forever: the dead-peer time bounds it.
            with trio.move_on_after(max(self.session.dead_after, 1.0)) as scope:
                try:
                    await self.stream.send_all(data)
                except TRANSPORT_ERRORS as exc:
                    raise ConnectionLost(f"send failed: {_describe(exc)}") from None
            if scope.cancelled_caught:
                raise ConnectionLost("send timed out: the peer is not reading")
        finally:
            lock.release()

    async def next_event(self) -> Event:
        """The next session event; a `Closed` event is the last one.

        One read decodes every complete frame it brought (a pipelining peer sends hundreds per
        read), so most calls find an event already waiting. The first event after a read (and
        any event when there is something to write) comes after a schedule point, as every call
        did before; the next EVENTS_PER_SCHEDULE_POINT ones return at once, after only a
        cancellation check. The check comes before the event is taken, so a cancelled caller
        loses no event.
        """
        session = self.session
        while True:
            if session.pending_events:
                if session.pending_output:
                    await self._flush_quietly()
                    self._cheap_events = EVENTS_PER_SCHEDULE_POINT
                elif self._cheap_events:
                    await trio.lowlevel.checkpoint_if_cancelled()
                    self._cheap_events -= 1
                else:
                    await trio.lowlevel.checkpoint()
                    self._cheap_events = EVENTS_PER_SCHEDULE_POINT
                event = session.next_event()
                if event is not None:
                    if isinstance(event, Closed):
                        self._closed_event_seen = True
                    return event
                continue  # taken meanwhile (only one task should call next_event)
            await self._flush_quietly()
            if session.state is State.CLOSED:
                return Closed(ErrorCode.NORMAL, "session closed", by_peer=False)
            timer = session.get_timer()
            deadline = _to_trio_deadline(timer)
            self._cheap_events = 0  # the first event of a read comes after a schedule point
            with trio.move_on_at(deadline):
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except TRANSPORT_ERRORS as exc:
                    return self._lost(f"receive failed: {_describe(exc)}")
                session.receive_data(bytes(data), trio.current_time())
                continue
            session.handle_timer(trio.current_time())

    def _lost(self, reason: str) -> Closed:
        self.session.state = State.CLOSED
        self._closed_event_seen = True
        return Closed(ErrorCode.NORMAL, reason, by_peer=True)

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except ConnectionLost:
            if self.session.state is not State.CLOSED:
                self.session.receive_data(b"", trio.current_time())

    async def aclose(self, code: int = ErrorCode.SHUTDOWN, reason: str = "shutting down") -> None:
        """Say goodbye if we still can, then close the stream. Never raises."""
        self.session.close(code, reason)
        with trio.move_on_after(1.0):
            try:
                await self.flush()
            except ConnectionLost:
                pass
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                await self.stream.aclose()
            except TRANSPORT_ERRORS:
                pass


def _to_trio_deadline(timer: float | None) -> float:
    return float("inf") if timer is None else timer


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause):
        text = f"{text} ({cause})"
    return text
