"""Call records of the office (F15): events in, durable rows out, uploaded until acknowledged.

Three pieces, from pure to I/O:

- `CallRecorder` (pure): turns the call controller's events (started, ringing, answered, ended)
  into `CallRecordInfo` rows, numbering them 1, 2, 3 ... within the remote host's boot epoch.
  It drops what would make a record wrong: a second ringing, an event after `ended`, an event of
  a call it never saw start. Time is an input.
- `RecordStore` (sqlite, WAL, `synchronous=FULL`): every row is on disk before the call goes on,
  so a record survives kill -9 and a power cut. It keeps the rows not yet acknowledged by the
  main host, and the calls started but not ended, so a restart can close the calls the crash cut
  short (their end was never seen: they get an `ended` row of their own).
- `CallLog` (the controller's `CallListener`) joins the two, and `upload` sends the oldest
  unacknowledged rows over the trunk, one batch at a time, again after a timeout or a reconnect.
  The controller's events are written by `record_event` in a worker thread, many calls' rows in
  one transaction, and each call waits for its row to be on disk before it goes on.
  The main host stores by (office, boot epoch, seq), so a batch sent twice is stored once.

It does not decide anything about calls (`calls.py`) or hold the trunk (`uplink.py`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from shared.wire.messages import CallRecordInfo, CallRecords, CallRecordsAck, Message

log = logging.getLogger("remotehost.records")
DB_NAME = "records.db"
EVENTS = ("started", "ringing", "answered", "ended")
RESTART_STATUS = 500
RESTART_REASON = "Server Internal Error (the remote host restarted during the call)"
UPLOAD_BATCH = 200  # rows in one CallRecords


@dataclass
class _Open:
    caller: str
    callee: str
    direction: str
    seen: set[str]


class CallRecorder:
    """Pure: events of calls in, numbered rows out (`next_seq` continues a boot epoch)."""

    def __init__(self, office: str, boot_id: str, *, next_seq: int = 1) -> None:
        self.office = office
        self.boot_id = boot_id
        self.next_seq = next_seq
        self.open: dict[str, _Open] = {}

    def event(
        self,
        call_id: str,
        event: str,
        now: float,
        *,
        caller: str = "",
        callee: str = "",
        direction: str = "",
        status: int = 0,
        reason: str = "",
    ) -> CallRecordInfo | None:
        """The row for one event, or None when the event adds nothing (a repeat, an event
        after the end, an event of a call that never started here)."""
        if event not in EVENTS:
            raise ValueError(f"unknown call event {event!r}")
        call = self.open.get(call_id)
        if event == "started":
            if call is not None:
                return None
            call = self.open[call_id] = _Open(caller, callee, direction, set())
        elif call is None or event in call.seen:
            return None
        call.seen.add(event)
        call.direction = direction or call.direction  # an office call may turn outbound
        if event == "ended":
            del self.open[call_id]
        else:
            status, reason = 0, ""
        row = CallRecordInfo(
            office=self.office,
            boot_id=self.boot_id,
            seq=self.next_seq,
            call_id=call_id,
            event=event,
            at=now,
            caller=caller or call.caller,
            callee=callee or call.callee,
            direction=call.direction,
            status=status,
            reason=reason,
        )
        self.next_seq += 1
        return row

    def interrupted(self, rows: list[CallRecordInfo], now: float) -> list[CallRecordInfo]:
        """`ended` rows for calls of an earlier boot that started and never ended (`rows` are
        their `started` rows): the crash ended them, and a record that stays open is a lie."""
        out = []
        for started in rows:
            self.open[started.call_id] = _Open(
                started.caller, started.callee, started.direction, {"started"}
            )
            row = self.event(
                started.call_id, "ended", now, status=RESTART_STATUS, reason=RESTART_REASON
            )
            if row is not None:
                out.append(row)
        return out


def _row(data: str) -> CallRecordInfo:
    return CallRecordInfo(**json.loads(data))


class RecordStore:
    """The office's call records on disk: rows not yet acknowledged, calls not yet ended.

    Synchronous; one connection guarded by a lock, so the uploader may use it from a worker
    thread while the call controller appends from the trio thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # WAL with synchronous=FULL: a committed row survives a power cut, not only kill -9.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS pending (
                boot_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                row TEXT NOT NULL,
                PRIMARY KEY (boot_id, seq)
            );
            CREATE TABLE IF NOT EXISTS open_calls (
                call_id TEXT PRIMARY KEY,
                row TEXT NOT NULL
            );
            """
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, rows: list[CallRecordInfo]) -> None:
        """Write rows durably (one transaction) before anyone may rely on them."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    data = json.dumps(asdict(row))
                    self._db.execute(
                        "INSERT OR IGNORE INTO pending (boot_id, seq, row) VALUES (?, ?, ?)",
                        (row.boot_id, row.seq, data),
                    )
                    if row.event == "started":
                        self._db.execute(
                            "INSERT OR REPLACE INTO open_calls (call_id, row) VALUES (?, ?)",
                            (row.call_id, data),
                        )
                    elif row.event == "ended":
                        self._db.execute("DELETE FROM open_calls WHERE call_id = ?", (row.call_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def pending(self, limit: int = UPLOAD_BATCH) -> list[CallRecordInfo]:
        """The oldest rows not acknowledged, all of one boot epoch (one ack answers them)."""
        with self._lock:
            first = self._db.execute(
                "SELECT boot_id FROM pending ORDER BY rowid LIMIT 1"
            ).fetchone()
            if first is None:
                return []
            found = self._db.execute(
                "SELECT row FROM pending WHERE boot_id = ? ORDER BY seq LIMIT ?",
                (first[0], limit),
            ).fetchall()
        return [_row(data) for (data,) in found]

    def pending_count(self) -> int:
        with self._lock:
            count: int = self._db.execute("SELECT count(*) FROM pending").fetchone()[0]
        return count

    def acknowledge(self, boot_id: str, up_to_seq: int) -> int:
        """Forget rows the main host has stored; how many were forgotten."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM pending WHERE boot_id = ? AND seq <= ?", (boot_id, up_to_seq)
            )
        return cursor.rowcount

    def open_calls(self) -> list[CallRecordInfo]:
        """The `started` rows of calls whose end is not on disk."""
        with self._lock:
            found = self._db.execute("SELECT row FROM open_calls ORDER BY rowid").fetchall()
        return [_row(data) for (data,) in found]


Send = Callable[[Message], Awaitable[None]]


class CallLog:
    """The office's call records: the controller's listener, the store, and the uploader.

    `wall_clock` gives the Unix time of each event (records are read by people).
    """

    def __init__(
        self,
        store: RecordStore,
        *,
        office: str,
        boot_id: str,
        wall_clock: Callable[[], float],
        retry: float = 3.0,
        batch_delay: float = 0.2,
    ) -> None:
        self.store = store
        self.recorder = CallRecorder(office, boot_id)
        self.wall_clock = wall_clock
        self.retry = retry
        self.batch_delay = batch_delay
        self.uploaded = 0
        self.acknowledged = 0
        self._wake = trio.Event()
        self._acked = trio.Event()
        # `record_event`: rows waiting for the disk, in seq order, and the last seq written.
        self._queued: list[CallRecordInfo] = []
        self._written_seq = 0
        self._write_lock = trio.Lock()  # FIFO: batches reach the disk in seq order
        # Calls of an earlier boot that the crash cut short end now, in this boot's sequence.
        closing = self.recorder.interrupted(store.open_calls(), wall_clock())
        if closing:
            log.warning("%d call(s) were cut short by a restart: recorded as ended", len(closing))
            store.append(closing)

    def call_event(
        self,
        call_id: str,
        event: str,
        *,
        caller: str,
        callee: str,
        direction: str,
        status: int = 0,
        reason: str = "",
    ) -> None:
        row = self.recorder.event(
            call_id,
            event,
            self.wall_clock(),
            caller=caller,
            callee=callee,
            direction=direction,
            status=status,
            reason=reason,
        )
        if row is None:
            return
        self.store.append([row])  # on disk before the call moves on (F15: never lost)
        self._wake.set()

    async def record_event(
        self,
        call_id: str,
        event: str,
        *,
        caller: str,
        callee: str,
        direction: str,
        status: int = 0,
        reason: str = "",
    ) -> None:
        """`call_event` for the call controller: the row is on disk when this returns, but
        the trio thread does not wait for the disk meanwhile (an fsync takes from a quarter of
        a millisecond to tens of them when the disk is busy, and every call of the office would
        wait). The row is written in a worker thread, in one transaction with the rows of every
        other call that came while the previous write was under way (a group commit)."""
        row = self.recorder.event(
            call_id,
            event,
            self.wall_clock(),
            caller=caller,
            callee=callee,
            direction=direction,
            status=status,
            reason=reason,
        )
        if row is None:
            return
        self._queued.append(row)
        # Shielded: a row taken from the queue is written, or put back, whatever is cancelled.
        with trio.CancelScope(shield=True):
            async with self._write_lock:
                if self._written_seq >= row.seq:
                    return  # an earlier holder of the lock wrote it with its own
                rows, self._queued = self._queued, []
                try:
                    await trio.to_thread.run_sync(self.store.append, rows)
                except BaseException:
                    self._queued[:0] = rows  # not written: the next writer takes them again
                    raise
                self._written_seq = rows[-1].seq
        self._wake.set()

    async def on_ack(self, ack: CallRecordsAck) -> None:
        if ack.office != self.recorder.office:
            log.error("main host acknowledged records of office %r, not ours", ack.office)
            return
        forgotten = await trio.to_thread.run_sync(
            self.store.acknowledge, ack.boot_id, ack.up_to_seq
        )
        self.acknowledged += forgotten
        self._acked.set()  # in the trio thread: trio's Event is not thread-safe

    async def upload(self, send: Send) -> None:
        """Send unacknowledged rows, one batch in flight, until cancelled (the trunk went down:
        the next login starts this again, and what was not acknowledged goes again).

        At most one batch per `batch_delay` unless a batch was full: the rows are on disk
        already, and a batch per event (four per call) would cost both hosts a thread trip,
        a trunk message and an fsync'd transaction each, which at a hundred calls a second
        was a third of the main host's CPU per call.
        """
        while True:
            wake = self._wake = trio.Event()  # before reading, so no append is missed
            batch = await trio.to_thread.run_sync(self.store.pending, UPLOAD_BATCH)
            if not batch:
                await wake.wait()
                await trio.sleep(self.batch_delay)  # the rows of the calls around this one
                continue
            self._acked = trio.Event()
            await send(CallRecords(batch))
            self.uploaded += len(batch)
            with trio.move_on_after(self.retry):
                await self._acked.wait()
            if len(batch) < UPLOAD_BATCH:
                await trio.sleep(self.batch_delay)

    def status(self) -> dict[str, object]:
        return {
            "boot_id": self.recorder.boot_id,
            "next_seq": self.recorder.next_seq,
            "open": len(self.recorder.open),
            "pending": self.store.pending_count(),
            "uploaded": self.uploaded,
            "acknowledged": self.acknowledged,
        }
