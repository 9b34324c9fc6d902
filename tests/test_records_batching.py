"""The call records in batches (remotehost/records.py): the upload and the writes to disk.

A batch per event cost both hosts a thread trip, a trunk message and an fsync'd transaction per
event; the uploader now waits `batch_delay` after a row wakes it, so the rows of calls that
happen together travel together. The controller's rows (`CallLog.record_event`) are written in
a worker thread, every row that queued during a write in the next one, and each call waits for
its own row. Nothing here is about speed: the tests check what is sent and written, and when.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from mainhost.records import CallRecordStore
from remotehost.records import UPLOAD_BATCH, CallLog, RecordStore
from shared.wire.messages import CallRecordInfo, CallRecords, Message
from tests.callhelpers import GUARD, wait_until


def _events(log: CallLog, call_id: str) -> None:
    for event in ("started", "ringing", "answered", "ended"):
        log.call_event(call_id, event, caller="201", callee="202", direction="local")


async def test_rows_of_one_delay_travel_in_one_batch(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0, batch_delay=1.0)
    main = CallRecordStore(tmp_path / "calls.db")
    sent: list[CallRecords] = []

    async def send(msg: Message) -> None:
        assert isinstance(msg, CallRecords)
        sent.append(msg)
        for ack in main.add("east", msg.records):
            await log.on_ack(ack)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.upload, send)
            await trio.sleep(0.05)  # the uploader is idle, waiting for a row
            _events(log, "c1")
            await trio.sleep(0.1)  # within the delay: the same batch
            _events(log, "c2")
            await wait_until(lambda: store.pending_count() == 0)
            nursery.cancel_scope.cancel()
    assert len(sent) == 1
    assert [(r.call_id, r.event) for r in sent[0].records] == [
        (c, e) for c in ("c1", "c2") for e in ("started", "ringing", "answered", "ended")
    ]
    assert [r.seq for r in main.rows()] == list(range(1, 9))
    store.close()
    main.close()


async def test_without_a_delay_every_wake_sends(tmp_path: Path) -> None:
    """The batching is the delay's doing: with none, the first row goes out alone."""
    store = RecordStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0, batch_delay=0.0)
    sent: list[CallRecords] = []
    main = CallRecordStore(tmp_path / "calls.db")

    async def send(msg: Message) -> None:
        assert isinstance(msg, CallRecords)
        sent.append(msg)
        for ack in main.add("east", msg.records):
            await log.on_ack(ack)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.upload, send)
            await trio.sleep(0.05)
            log.call_event("c1", "started", caller="201", callee="202", direction="local")
            await wait_until(lambda: len(sent) == 1)
            await trio.sleep(0.05)
            log.call_event("c1", "ended", caller="201", callee="202", direction="local")
            await wait_until(lambda: store.pending_count() == 0)
            nursery.cancel_scope.cancel()
    assert [len(msg.records) for msg in sent] == [1, 1]
    store.close()
    main.close()


async def test_a_backlog_goes_in_full_batches_and_nothing_is_lost(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0, batch_delay=0.05)
    calls = UPLOAD_BATCH // 4 + 10  # more rows than one batch holds
    for n in range(calls):
        _events(log, f"c{n}")
    main = CallRecordStore(tmp_path / "calls.db")
    sent: list[CallRecords] = []

    async def send(msg: Message) -> None:
        assert isinstance(msg, CallRecords)
        sent.append(msg)
        for ack in main.add("east", msg.records):
            await log.on_ack(ack)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.upload, send)
            await wait_until(lambda: store.pending_count() == 0)
            nursery.cancel_scope.cancel()
    assert [len(msg.records) for msg in sent] == [UPLOAD_BATCH, 4 * calls - UPLOAD_BATCH]
    assert [r.seq for r in main.rows()] == list(range(1, 4 * calls + 1))
    assert len(main.calls()) == calls and not main.calls(live=True)
    store.close()
    main.close()


# --- record_event: the controller's rows, written off the trio thread, many in one transaction ---


class CountingStore(RecordStore):
    """A RecordStore that counts its transactions and can hold or fail them."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.transactions: list[list[int]] = []
        self.fail_next = 0
        self.hold: threading.Event | None = None

    def append(self, rows: list[CallRecordInfo]) -> None:
        if self.hold is not None:
            self.hold.wait(GUARD)
        if self.fail_next:
            self.fail_next -= 1
            raise sqlite3.OperationalError("disk I/O error")
        super().append(rows)
        self.transactions.append([r.seq for r in rows])


async def test_a_recorded_event_is_on_disk_when_record_event_returns(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0)
    with trio.fail_after(GUARD):
        await log.record_event("c1", "started", caller="201", callee="202", direction="local")
        assert [(r.seq, r.event) for r in store.pending()] == [(1, "started")]
        # A repeat adds nothing (the recorder drops it) and writes nothing.
        await log.record_event("c1", "started", caller="201", callee="202", direction="local")
    assert store.transactions == [[1]]
    store.close()


async def test_events_that_come_during_a_write_share_the_next_one(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0)
    hold = store.hold = threading.Event()
    done: list[str] = []

    async def call(n: int) -> None:
        await log.record_event(f"c{n}", "started", caller="201", callee="202", direction="local")
        # Whoever returns finds its own row on disk.
        assert f"c{n}" in {r.call_id for r in store.pending()}
        done.append(f"c{n}")

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, 0)
            await trio.testing.wait_all_tasks_blocked()  # c0's write is under way, held
            for n in range(1, 6):
                nursery.start_soon(call, n)
            await trio.testing.wait_all_tasks_blocked()
            assert not done  # nobody goes on before its row is on disk
            hold.set()
    # c0 alone, then everything that queued meanwhile in one transaction, in seq order.
    assert store.transactions == [[1], [2, 3, 4, 5, 6]]
    assert sorted(done) == [f"c{n}" for n in range(6)]
    store.close()


async def test_a_failed_write_is_retried_by_the_next_event(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0)
    store.fail_next = 1
    with trio.fail_after(GUARD):
        with pytest.raises(sqlite3.OperationalError):
            await log.record_event("c1", "started", caller="201", callee="202", direction="local")
        assert store.pending() == []
        await log.record_event("c1", "ended", caller="201", callee="202", direction="local")
    # The row that failed was not lost: it went first, with the next one.
    assert store.transactions == [[1, 2]]
    assert [r.event for r in store.pending()] == ["started", "ended"]
    store.close()


async def test_a_cancelled_event_is_still_written(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0)
    with trio.fail_after(GUARD):
        with trio.CancelScope() as scope:
            scope.cancel()
            await log.record_event("c1", "started", caller="201", callee="202", direction="local")
    assert [r.event for r in store.pending()] == ["started"]
    store.close()


async def test_the_uploader_sends_what_record_event_wrote(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0, batch_delay=0.0)
    main = CallRecordStore(tmp_path / "calls.db")

    async def send(msg: Message) -> None:
        assert isinstance(msg, CallRecords)
        for ack in main.add("east", msg.records):
            await log.on_ack(ack)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.upload, send)
            for event in ("started", "answered", "ended"):
                await log.record_event("c1", event, caller="201", callee="202", direction="local")
            await wait_until(lambda: store.pending_count() == 0 and len(main.rows()) == 3)
            nursery.cancel_scope.cancel()
    (call,) = main.calls()
    assert not call.active
    store.close()
    main.close()
