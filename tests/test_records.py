"""Call records (F15), pure and in process: the recorder's rows and sequence per boot epoch, the
remote host's durable store and its recovery after a crash, the upload with its acks and retries,
the main host's store (a repeated upload stored once, gaps shown), the merge of two offices'
views of one call, the CSV export and `mainhost calls`, and the call controller's events."""

from __future__ import annotations

import csv
import io
import json
import random
import sqlite3
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from mainhost.cli import main as mainhost_main
from mainhost.config import CONFIG_NAME
from mainhost.records import CallRecordStore, gaps, merge, to_csv
from remotehost.calls import CallPolicy, Connect, Disconnect, Fail, Offer, Ring
from remotehost.records import (
    RESTART_REASON,
    RESTART_STATUS,
    CallLog,
    CallRecorder,
    RecordStore,
)
from shared.wire.frame import Frame
from shared.wire.messages import (
    CallRecordInfo,
    CallRecords,
    CallRecordsAck,
    GrantReply,
    Message,
    decode_message_untrusted,
    encode_body,
)
from tests.callhelpers import GUARD, wait_until
from tests.test_b2bua_controller import OFFER, FakeLeg, world

# --- the pure recorder -------------------------------------------------------------------------


def _call(
    rec: CallRecorder, call_id: str, t: float, *, answer: bool = True
) -> list[CallRecordInfo]:
    rows = [
        rec.event(call_id, "started", t, caller="201", callee="202", direction="local"),
        rec.event(call_id, "ringing", t + 1),
    ]
    if answer:
        rows.append(rec.event(call_id, "answered", t + 2))
    rows.append(rec.event(call_id, "ended", t + 10, status=0, reason="caller hung up"))
    return [r for r in rows if r is not None]


def test_recorder_turns_events_into_numbered_rows() -> None:
    rec = CallRecorder("east", "boot1")
    rows = _call(rec, "c1", 100.0)
    assert [r.event for r in rows] == ["started", "ringing", "answered", "ended"]
    assert [r.seq for r in rows] == [1, 2, 3, 4]
    assert {(r.office, r.boot_id, r.call_id) for r in rows} == {("east", "boot1", "c1")}
    # Every row names the parties, even those whose event did not say them.
    assert all(r.caller == "201" and r.callee == "202" for r in rows)
    assert rows[-1].reason == "caller hung up" and rows[-1].at == 110.0
    assert rec.open == {}


def test_recorder_drops_repeats_late_events_and_unknown_calls() -> None:
    rec = CallRecorder("east", "boot1")
    assert rec.event("x", "ringing", 1.0) is None  # never started here
    assert rec.event("c1", "started", 1.0, caller="201", callee="202") is not None
    assert rec.event("c1", "started", 1.5) is None
    assert rec.event("c1", "ringing", 2.0) is not None
    assert rec.event("c1", "ringing", 2.5) is None
    assert rec.event("c1", "ended", 3.0, status=486, reason="Busy Here") is not None
    assert rec.event("c1", "ended", 4.0) is None
    assert rec.event("c1", "answered", 4.0) is None
    assert rec.next_seq == 4  # no number was used for a dropped event
    with pytest.raises(ValueError):
        rec.event("c1", "exploded", 5.0)


def test_only_the_end_carries_a_status() -> None:
    rec = CallRecorder("east", "boot1")
    started = rec.event("c1", "started", 1.0, status=404, reason="nonsense")
    assert started is not None and (started.status, started.reason) == (0, "")


def test_an_office_call_that_turns_outbound_keeps_its_last_direction() -> None:
    rec = CallRecorder("east", "b")
    rec.event("c1", "started", 1.0, caller="201", callee="301", direction="local")
    ended = rec.event("c1", "ended", 2.0, direction="outbound", status=480, reason="offline")
    assert ended is not None and ended.direction == "outbound"


EVENT_NAMES = ["started", "ringing", "answered", "ended"]


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(EVENT_NAMES))))
def test_recorder_sequence_is_gapless_and_each_call_is_well_formed(
    events: list[tuple[str, str]],
) -> None:
    rec = CallRecorder("east", "boot1")
    rows = []
    for now, (call_id, event) in enumerate(events):
        row = rec.event(call_id, event, float(now))
        if row is not None:
            rows.append(row)
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    per_call: dict[str, list[str]] = {}
    for row in rows:
        per_call.setdefault(row.call_id, []).append(row.event)
    for seen in per_call.values():
        life = seen[: seen.index("ended") + 1] if "ended" in seen else seen
        # started first; ended (if any) last in one life; no event twice in one life
        assert life[0] == "started"
        assert len(set(life)) == len(life)
    assert set(rec.open) == {c for c, s in per_call.items() if s[-1] != "ended"}


def test_interrupted_calls_end_in_the_new_boot_epoch() -> None:
    old = CallRecorder("east", "boot1")
    started = old.event("c1", "started", 1.0, caller="201", callee="202", direction="local")
    assert started is not None
    new = CallRecorder("east", "boot2")
    (ended,) = new.interrupted([started], 50.0)
    assert (ended.boot_id, ended.seq, ended.call_id, ended.event) == ("boot2", 1, "c1", "ended")
    assert (ended.status, ended.reason) == (RESTART_STATUS, RESTART_REASON)
    assert (ended.caller, ended.callee, ended.direction) == ("201", "202", "local")
    assert new.open == {}


# --- the remote host's store -------------------------------------------------------------------


def test_store_keeps_rows_until_acknowledged_and_survives_reopening(tmp_path: Path) -> None:
    rec = CallRecorder("east", "boot1")
    store = RecordStore(tmp_path / "records.db")
    store.append(_call(rec, "c1", 1.0))
    store.append(_call(rec, "c2", 2.0, answer=False))
    assert [r.seq for r in store.pending()] == list(range(1, 8))
    assert store.acknowledge("boot1", 4) == 4
    assert store.acknowledge("boot1", 4) == 0  # a repeated ack is harmless
    store.close()
    again = RecordStore(tmp_path / "records.db")
    assert [r.seq for r in again.pending()] == [5, 6, 7]
    first = again.pending()[0]
    assert (first.call_id, first.event, first.caller, first.callee) == (
        "c2",
        "started",
        "201",
        "202",
    )
    assert all(isinstance(r, CallRecordInfo) for r in again.pending())
    assert again.pending_count() == 3
    again.close()


def test_store_is_durable_sqlite(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    store.close()
    db = sqlite3.connect(tmp_path / "records.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_pending_gives_one_boot_epoch_at_a_time_oldest_first(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    store.append(_call(CallRecorder("east", "old"), "c1", 1.0))
    store.append(_call(CallRecorder("east", "new"), "c2", 2.0))
    assert {r.boot_id for r in store.pending()} == {"old"}
    assert [r.seq for r in store.pending(limit=2)] == [1, 2]
    store.acknowledge("old", 4)
    assert {r.boot_id for r in store.pending()} == {"new"}
    store.close()


def test_open_calls_are_those_started_and_not_ended(tmp_path: Path) -> None:
    rec = CallRecorder("east", "boot1")
    store = RecordStore(tmp_path / "records.db")
    store.append(_call(rec, "done", 1.0))
    started = rec.event("live", "started", 2.0, caller="201", callee="203", direction="local")
    assert started is not None
    store.append([started])
    assert [r.call_id for r in store.open_calls()] == ["live"]
    store.close()


def test_a_restart_records_the_end_of_calls_the_crash_cut_short(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    first = CallLog(store, office="east", boot_id="boot1", wall_clock=lambda: 10.0)
    first.call_event("c1", "started", caller="201", callee="202", direction="local")
    first.call_event("c1", "answered", caller="201", callee="202", direction="local")
    store.close()  # kill -9: nothing more is written for boot1
    store = RecordStore(tmp_path / "records.db")
    second = CallLog(store, office="east", boot_id="boot2", wall_clock=lambda: 20.0)
    assert store.open_calls() == []
    assert second.recorder.next_seq == 2
    store.acknowledge("boot1", 2)
    (ended,) = store.pending()
    assert (ended.boot_id, ended.seq, ended.event, ended.status) == ("boot2", 1, "ended", 500)
    # A third start finds nothing left to close.
    store.close()
    store = RecordStore(tmp_path / "records.db")
    third = CallLog(store, office="east", boot_id="boot3", wall_clock=lambda: 30.0)
    assert third.recorder.next_seq == 1
    store.close()


def test_call_log_writes_before_returning(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0)
    log.call_event("c1", "started", caller="201", callee="202", direction="local")
    log.call_event("c1", "ringing", caller="201", callee="202", direction="local")
    log.call_event("c1", "ringing", caller="201", callee="202", direction="local")
    # Another connection sees them at once: they are committed.
    db = sqlite3.connect(tmp_path / "records.db")
    assert db.execute("SELECT count(*) FROM pending").fetchone()[0] == 2
    db.close()
    assert log.status()["pending"] == 2 and log.status()["open"] == 1
    store.close()


# --- upload and acknowledgement ----------------------------------------------------------------


async def test_upload_sends_until_acknowledged_and_resends_what_is_not(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0, retry=2.0)
    sent: list[CallRecords] = []
    main = CallRecordStore(tmp_path / "calls.db")
    answer = trio.Event()

    async def send(msg: Message) -> None:
        assert isinstance(msg, CallRecords)
        sent.append(msg)
        if answer.is_set():
            for ack in main.add("east", msg.records):
                await log.on_ack(ack)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.upload, send)
            log.call_event("c1", "started", caller="201", callee="202", direction="local")
            await wait_until(lambda: len(sent) >= 2)  # no ack: sent again after `retry`
            assert sent[0] == sent[1]
            answer.set()
            log.call_event("c1", "ended", caller="201", callee="202", direction="local")
            await wait_until(lambda: store.pending_count() == 0)
            nursery.cancel_scope.cancel()
    # The repeats were stored once each.
    assert [r.seq for r in main.rows()] == [1, 2]
    assert log.acknowledged == 2
    (call,) = main.calls()
    assert call.status == 0 and not call.active
    store.close()
    main.close()


async def test_upload_survives_a_lost_connection_and_goes_on_at_the_next(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0, retry=0.5)
    for n in range(5):
        log.call_event(f"c{n}", "started", caller="201", callee="202", direction="local")

    async def broken(msg: Message) -> None:
        raise trio.BrokenResourceError

    with trio.fail_after(GUARD), pytest.raises(trio.BrokenResourceError):
        await log.upload(broken)
    assert store.pending_count() == 5
    main = CallRecordStore(tmp_path / "calls.db")

    async def good(msg: Message) -> None:
        assert isinstance(msg, CallRecords)
        for ack in main.add("east", msg.records):
            await log.on_ack(ack)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.upload, good)
            await wait_until(lambda: store.pending_count() == 0)
            nursery.cancel_scope.cancel()
    assert len(main.calls(live=True)) == 5
    store.close()
    main.close()


async def test_an_ack_for_another_office_is_ignored(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: 5.0)
    log.call_event("c1", "started", caller="201", callee="202", direction="local")
    await log.on_ack(CallRecordsAck("west", "b", 10))
    assert store.pending_count() == 1
    await log.on_ack(CallRecordsAck("east", "b", 1))
    assert store.pending_count() == 0
    store.close()


def test_record_messages_round_trip_on_the_wire() -> None:
    rows = _call(CallRecorder("east", "b"), "c1", 1.0)
    for msg in (CallRecords(rows), CallRecordsAck("east", "b", 4)):
        frame = Frame(msg.TYPE, 0, encode_body(msg))
        assert decode_message_untrusted(frame) == msg


# --- the main host's store, the merge, gaps --------------------------------------------------


def _relayed(call_id: str = "x1") -> tuple[list[CallRecordInfo], list[CallRecordInfo]]:
    """One call between offices as each office saw it (the same call id on both hops)."""
    east, west = CallRecorder("east", "e1"), CallRecorder("west", "w1")
    caller = [
        east.event(call_id, "started", 100.0, caller="201", callee="301", direction="local"),
        east.event(call_id, "ringing", 101.2, direction="outbound"),
        east.event(call_id, "answered", 103.2, direction="outbound"),
        east.event(call_id, "ended", 133.2, direction="outbound", reason="caller hung up"),
    ]
    callee = [
        west.event(call_id, "started", 100.1, caller="201", callee="301", direction="inbound"),
        west.event(call_id, "ringing", 101.0, direction="inbound"),
        west.event(call_id, "answered", 103.0, direction="inbound"),
        west.event(call_id, "ended", 133.3, direction="inbound", reason="Request Terminated"),
    ]
    return [r for r in caller if r], [r for r in callee if r]


def test_two_offices_views_of_one_call_merge_into_one_record() -> None:
    east, west = _relayed()
    (call,) = merge([*west, *east])
    assert call.id == "x1"
    assert call.route == "relayed"
    assert call.offices == ["east", "west"]  # the calling office first
    assert call.views == {"east": "outbound", "west": "inbound"}
    assert (call.caller, call.callee) == ("201", "301")
    assert call.started_at == 100.0 and call.ringing_at == 101.0 and call.answered_at == 103.0
    assert call.ended_at == 133.2
    assert (call.status, call.reason) == (0, "caller hung up")  # the caller's side tells
    assert call.duration(now=999.0) == pytest.approx(30.2)


def test_one_office_view_alone_is_already_a_record() -> None:
    east, _ = _relayed()
    (call,) = merge(east)
    assert call.route == "relayed" and call.offices == ["east"]


def test_a_local_call_and_a_refusal_are_records_with_their_cause() -> None:
    rec = CallRecorder("east", "e1")
    rows = _call(rec, "l1", 10.0)
    rows += [
        r
        for r in (
            rec.event("r1", "started", 20.0, caller="201", callee="299", direction="local"),
            rec.event("r1", "ended", 20.1, status=404, reason="Not Found (299 is no extension)"),
        )
        if r
    ]
    local, refused = merge(rows)
    assert (local.route, local.offices, local.status) == ("local", ["east"], 0)
    assert local.duration(now=0.0) == 8.0
    assert (refused.status, refused.answered_at, refused.duration(now=1e9)) == (404, None, 0.0)
    assert "299" in refused.reason


@settings(max_examples=50)
@given(st.randoms(use_true_random=False), st.integers(0, 3))
def test_merge_does_not_care_about_order_or_repeats(rng: random.Random, repeats: int) -> None:
    east, west = _relayed()
    rows = [*east, *west, *_call(CallRecorder("west", "w2"), "l1", 50.0)]
    shuffled = rows + [rng.choice(rows) for _ in range(repeats)]
    rng.shuffle(shuffled)
    assert merge(shuffled) == merge(rows)


def test_a_call_is_live_until_it_ends(tmp_path: Path) -> None:
    main = CallRecordStore(tmp_path / "calls.db")
    east, west = _relayed()
    main.add("east", east[:3])
    main.add("west", west[:3])
    (live,) = main.calls(live=True)
    assert live.active and live.status is None and live.duration(now=113.0) == 10.0
    main.add("west", west[3:])
    assert main.calls(live=True) == []  # one side's end ends the call
    (done,) = main.calls()
    assert not done.active
    main.add("east", east[3:])
    assert len(main.calls()) == 1
    main.close()


def test_an_upload_twice_is_stored_once_and_acknowledged_each_time(tmp_path: Path) -> None:
    main = CallRecordStore(tmp_path / "calls.db")
    rows = _call(CallRecorder("east", "e1"), "c1", 1.0)
    assert main.add("east", rows) == [CallRecordsAck("east", "e1", 4)]
    assert main.add("east", rows[:2]) == [CallRecordsAck("east", "e1", 2)]
    assert len(main.rows()) == 4
    main.close()
    db = sqlite3.connect(tmp_path / "calls.db")
    with pytest.raises(sqlite3.IntegrityError):  # the key is a constraint, not only our habit
        db.execute(
            "INSERT INTO call_events VALUES ('east', 'e1', 1, 'c9', 'started', 0, '', '', '',"
            " 0, '')"
        )
    db.close()


def test_acks_come_per_boot_epoch(tmp_path: Path) -> None:
    main = CallRecordStore(tmp_path / "calls.db")
    rows = _call(CallRecorder("east", "e1"), "c1", 1.0) + _call(CallRecorder("east", "e2"), "c2", 2)
    acks = main.add("east", rows)
    assert sorted(acks, key=lambda a: a.boot_id) == [
        CallRecordsAck("east", "e1", 4),
        CallRecordsAck("east", "e2", 4),
    ]
    main.close()


def test_an_office_cannot_upload_another_offices_records(tmp_path: Path) -> None:
    main = CallRecordStore(tmp_path / "calls.db")
    assert main.add("east", _call(CallRecorder("west", "w1"), "c1", 1.0)) == []
    assert main.rows() == []
    main.close()


def test_gaps_show_what_never_arrived_per_office_and_boot_epoch(tmp_path: Path) -> None:
    main = CallRecordStore(tmp_path / "calls.db")
    rec = CallRecorder("east", "e1")
    rows = _call(rec, "c1", 1.0) + _call(rec, "c2", 2.0) + _call(rec, "c3", 3.0)
    main.add("east", [r for r in rows if r.seq not in (2, 5, 6, 7)])
    main.add("west", _call(CallRecorder("west", "w1"), "c9", 1.0))
    found = main.gaps()
    assert found == [
        {
            "office": "east",
            "boot_id": "e1",
            "highest": 12,
            "stored": 8,
            "missing": [[2, 2], [5, 7]],
        },
        {"office": "west", "boot_id": "w1", "highest": 4, "stored": 4, "missing": []},
    ]
    main.close()


@given(st.sets(st.integers(1, 60), min_size=1))
def test_gaps_are_exactly_the_missing_numbers(present: set[int]) -> None:
    (found,) = gaps(("east", "b", s) for s in present)
    missing = {n for a, b in found["missing"] for n in range(a, b + 1)}
    assert missing == set(range(1, max(present) + 1)) - present
    assert found["highest"] == max(present) and found["stored"] == len(present)


# --- CSV and the CLI -----------------------------------------------------------------------------


def test_csv_export_has_one_row_per_call() -> None:
    east, west = _relayed()
    rows = [*east, *west, *_call(CallRecorder("east", "e2"), "l1", 500.0, answer=False)]
    text = to_csv(merge(rows), now=1000.0)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [r["id"] for r in parsed] == ["x1", "l1"]
    assert parsed[0]["route"] == "relayed" and parsed[0]["offices"] == "east west"
    assert parsed[0]["status"] == "0" and float(parsed[0]["duration"]) == pytest.approx(30.2)
    assert parsed[1]["answered_at"] == "" and parsed[1]["duration"] == "0.0"
    assert parsed[1]["state"] == "ended"


def _data(tmp_path: Path) -> Path:
    (tmp_path / CONFIG_NAME).write_text("")  # `calls` reads calls.db only
    main = CallRecordStore(tmp_path / "calls.db")
    east, west = _relayed()
    main.add("east", east)
    main.add("west", west[:2])
    live = CallRecorder("east", "e2")
    main.add("east", [r for r in [live.event("l1", "started", 900.0, direction="local")] if r])
    main.close()
    return tmp_path


def test_mainhost_calls_json_live_and_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    data = _data(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        mainhost_main(["calls", "--data", str(data), "--json"])
    assert exit_.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in out["calls"]] == ["x1", "l1"]
    assert [c["state"] for c in out["calls"]] == ["ended", "active"]
    assert out["calls"][0]["offices"] == ["east", "west"]
    assert {(g["office"], tuple(map(tuple, g["missing"]))) for g in out["gaps"]} == {
        ("east", ()),
        ("west", ()),
    }
    with pytest.raises(SystemExit):
        mainhost_main(["calls", "--data", str(data), "--live", "--json"])
    assert [c["id"] for c in json.loads(capsys.readouterr().out)["calls"]] == ["l1"]
    with pytest.raises(SystemExit):
        mainhost_main(["calls", "--data", str(data), "--csv", str(tmp_path / "calls.csv")])
    assert "2 call(s)" in capsys.readouterr().out
    assert len(list(csv.DictReader(io.StringIO((tmp_path / "calls.csv").read_text())))) == 2
    with pytest.raises(SystemExit):
        mainhost_main(["calls", "--data", str(data), "--format", "csv"])
    assert capsys.readouterr().out.startswith("id,state,caller")
    with pytest.raises(SystemExit):
        mainhost_main(["calls", "--data", str(data)])
    table = capsys.readouterr().out
    assert "x1" in table and "relayed" in table and "active" in table


def test_mainhost_calls_without_a_main_host_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        mainhost_main(["calls", "--data", str(tmp_path / "nothing")])
    assert exit_.value.code != 0
    assert "mainhost init" in capsys.readouterr().err


# --- the call controller tells the recorder ----------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, str, str, int]] = []

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
        self.seen.append((call_id, event, caller, callee, direction, status))

    def events(self) -> list[tuple[str, int]]:
        return [(e[1], e[5]) for e in self.seen]


async def test_controller_reports_an_answered_call_from_start_to_end() -> None:
    events = Events()
    async with world() as w:
        w.controller.listener = events
        with trio.fail_after(GUARD):
            w.register("202")
            a = FakeLeg("caller")
            await w.controller.new_call(a, Offer("201", "202", OFFER))
            await wait_until(lambda: len(w.legs.sip) == 1)
            (b,) = w.legs.sip
            await w.controller.on_event(b, Ring())
            await w.controller.on_event(b, Ring())
            await w.controller.on_event(b, Connect(b"answer"))
            await w.controller.on_event(b, Disconnect("bye"))
            await w.ended()
    assert events.events() == [("started", 0), ("ringing", 0), ("answered", 0), ("ended", 0)]
    assert len({e[0] for e in events.seen}) == 1  # one call id
    assert events.seen[0][2:5] == ("201", "202", "local")


@pytest.mark.parametrize(
    ("callee", "registered", "status"),
    [("299", False, 404), ("203", False, 480), ("", False, 404)],
)
async def test_controller_reports_refusals_with_their_cause(
    callee: str, registered: bool, status: int
) -> None:
    events = Events()
    async with world() as w:
        w.controller.listener = events
        with trio.fail_after(GUARD):
            await w.controller.new_call(FakeLeg("caller"), Offer("201", callee, OFFER))
            await w.ended()
    assert events.events() == [("started", 0), ("ended", status)]


async def test_controller_reports_a_refused_grant_as_403() -> None:
    events = Events()
    async with world() as w:
        w.controller.listener = events
        w.trunk.grant = GrantReply("x", False, "not allowed")
        with trio.fail_after(GUARD):
            w.register("202")
            await w.controller.new_call(FakeLeg("caller"), Offer("201", "202", OFFER))
            await w.ended()
    assert events.events() == [("started", 0), ("ended", 403)]


async def test_controller_reports_the_busy_refusal_503() -> None:
    events = Events()
    async with world(CallPolicy(max_calls=1)) as w:
        w.controller.listener = events
        with trio.fail_after(GUARD):
            w.register("202")
            await w.controller.new_call(FakeLeg("first"), Offer("201", "202", OFFER))
            second = FakeLeg("second")
            await w.controller.new_call(second, Offer("203", "202", OFFER))
            assert [e for e in second.got if isinstance(e, Fail) and e.status == 503]
    refused = [e for e in events.seen if e[2] == "203"]
    assert [(e[1], e[5]) for e in refused] == [("started", 0), ("ended", 503)]
    assert refused[0][0] == refused[1][0]  # one call id for both rows


async def test_controller_reports_a_caller_who_gives_up_as_487() -> None:
    events = Events()
    async with world() as w:
        w.controller.listener = events
        with trio.fail_after(GUARD):
            w.register("202")
            a = FakeLeg("caller")
            await w.controller.new_call(a, Offer("201", "202", OFFER))
            await wait_until(lambda: len(w.legs.sip) == 1)
            await w.controller.on_event(w.legs.sip[0], Ring())
            await w.controller.on_event(a, Disconnect("cancel"))
            await w.ended()
    assert events.events() == [("started", 0), ("ringing", 0), ("ended", 487)]


async def test_a_failing_listener_never_fails_a_call() -> None:
    class Broken:
        async def record_event(self, call_id: str, event: str, **kwargs: object) -> None:
            raise RuntimeError("disk full")

    async with world() as w:
        w.controller.listener = Broken()
        with trio.fail_after(GUARD):
            w.register("202")
            a = FakeLeg("caller")
            await w.controller.new_call(a, Offer("201", "202", OFFER))
            await wait_until(lambda: len(w.legs.sip) == 1)
            await w.controller.on_event(w.legs.sip[0], Connect(b"answer"))
            assert a.told(Connect)
            await w.controller.on_event(a, Disconnect("bye"))
            await w.ended()


async def test_controller_and_call_log_write_the_same_call_to_disk(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.db")
    clock = iter(float(n) for n in range(100, 200))
    log = CallLog(store, office="east", boot_id="b", wall_clock=lambda: next(clock))
    async with world() as w:
        w.controller.listener = log
        with trio.fail_after(GUARD):
            w.register("202")
            a = FakeLeg("caller")
            await w.controller.new_call(a, Offer("201", "202", OFFER))
            await wait_until(lambda: len(w.legs.sip) == 1)
            await w.controller.on_event(w.legs.sip[0], Ring())
            await w.controller.on_event(w.legs.sip[0], Fail(486, "Busy Here"))
            await w.ended()
    rows = store.pending()
    assert [(r.seq, r.event) for r in rows] == [(1, "started"), (2, "ringing"), (3, "ended")]
    (call,) = merge(rows)
    assert (call.status, call.reason, call.route) == (486, "Busy Here", "local")
    store.close()


# --- crashes at any moment lose nothing ----------------------------------------------------------

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("event"), st.integers(0, 4), st.sampled_from(EVENT_NAMES)),
        st.tuples(st.just("crash"), st.just(0), st.just("")),
        st.tuples(st.just("upload"), st.integers(0, 3), st.sampled_from(["acked", "lost"])),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(STEPS)
def test_every_call_reaches_the_main_host_once_whatever_crashes_and_lost_acks(
    steps: list[tuple[str, int, str]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, boots = Path(tmp) / "records.db", iter(f"boot{n}" for n in range(100))
        clock = iter(float(n) for n in range(10_000))
        store = RecordStore(path)
        log = CallLog(store, office="east", boot_id=next(boots), wall_clock=lambda: next(clock))
        main = CallRecordStore(Path(tmp) / "calls.db")
        started: set[str] = set()
        life = 0
        for kind, n, what in steps:
            if kind == "event":
                call_id = f"c{n}-{life}"
                if what == "started":
                    started.add(call_id)
                log.call_event(call_id, what, caller="201", callee="202", direction="local")
                if what == "ended":
                    life += 1  # the next call on this number is a new call
            elif kind == "crash":
                store.close()  # kill -9: whatever is committed stays
                store = RecordStore(path)
                log = CallLog(
                    store, office="east", boot_id=next(boots), wall_clock=lambda: next(clock)
                )
            else:
                batch = store.pending(limit=n + 1)
                acks = main.add("east", batch)
                if what == "acked":
                    for ack in acks:
                        store.acknowledge(ack.boot_id, ack.up_to_seq)
        store.close()  # the last crash, then the WAN comes back: everything goes up
        store = RecordStore(path)
        CallLog(store, office="east", boot_id=next(boots), wall_clock=lambda: next(clock))
        while batch := store.pending():
            for ack in main.add("east", batch):
                store.acknowledge(ack.boot_id, ack.up_to_seq)
        calls = main.calls()
        assert {c.id for c in calls} == started
        assert len(calls) == len(started)
        assert all(not c.active for c in calls)  # the crashes ended what they cut short
        assert all(g["missing"] == [] for g in main.gaps())
        store.close()
        main.close()
