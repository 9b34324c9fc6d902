"""The call records' upload gathers rows into batches (remotehost/records.py `CallLog.upload`).

A batch per event cost both hosts a thread trip, a trunk message and an fsync'd transaction per
event; the uploader now waits `batch_delay` after a row wakes it, so the rows of calls that
happen together travel together. Nothing here is about speed: the tests check what is sent.
"""

from __future__ import annotations

from pathlib import Path

import trio

from mainhost.records import CallRecordStore
from remotehost.records import UPLOAD_BATCH, CallLog, RecordStore
from shared.wire.messages import CallRecords, Message
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
