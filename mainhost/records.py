"""Call records at the main host (F15): store the offices' uploads, merge them into calls.

Each remote host uploads the events of its calls (`CallRecords`), each row keyed by (office,
boot epoch, seq). This module owns:

- `CallRecordStore` (sqlite `calls.db`, WAL, `synchronous=FULL`): rows stored once by their key
  (a UNIQUE constraint: a batch sent again after a lost ack changes nothing), the ack to send
  back, and the gaps: the numbers of a boot epoch below its highest that never arrived.
- `merge` (pure): the rows of every office about one call id become ONE `CallRecord`. A call
  between offices has the same id in both offices (the `call_id` of CallSetup), so the caller's
  office (`outbound`) and the called office (`inbound`) merge into one call, route "relayed";
  a call inside an office is route "local".
- `to_csv`: the export.

It does not route calls (`calls.py`) or speak the trunk (`trunk.py`); the CLI reads the store
directly, like `store.py`, so `mainhost calls` works while the main host is stopped.
"""

from __future__ import annotations

import csv
import io
import logging
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.wire.messages import CallRecordInfo, CallRecordsAck

log = logging.getLogger("mainhost.records")
DB_NAME = "calls.db"
CSV_FIELDS = (
    "id",
    "state",
    "caller",
    "callee",
    "route",
    "offices",
    "started_at",
    "ringing_at",
    "answered_at",
    "ended_at",
    "duration",
    "status",
    "reason",
)


@dataclass
class CallRecord:
    """One call, merged from every office's view of it. Times are Unix seconds."""

    id: str
    caller: str = ""
    callee: str = ""
    route: str = "local"  # local: inside one office; relayed: between offices
    offices: list[str] = field(default_factory=list)
    """The calling office first."""
    started_at: float | None = None
    ringing_at: float | None = None
    answered_at: float | None = None
    ended_at: float | None = None
    status: int | None = None
    """How it ended: 0 a normal hangup, else the SIP status of the failure; None while live."""
    reason: str = ""
    views: dict[str, str] = field(default_factory=dict)
    """Office -> its direction (local, outbound, inbound)."""

    @property
    def active(self) -> bool:
        return self.ended_at is None

    def duration(self, now: float) -> float:
        """Seconds of conversation (answered to ended, or to `now` while it goes on)."""
        if self.answered_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else now
        return max(0.0, end - self.answered_at)

    def as_dict(self, now: float) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = "active" if self.active else "ended"
        out["duration"] = round(self.duration(now), 3)
        return out


def _first(values: Iterable[float]) -> float | None:
    found = list(values)
    return min(found) if found else None


def merge(rows: Iterable[CallRecordInfo]) -> list[CallRecord]:
    """Rows of any offices, any order (repeats allowed) -> one record per call id, oldest
    first. A call is over once any office saw it end: the end of one side ends the call."""
    by_call: dict[str, list[CallRecordInfo]] = {}
    seen: set[tuple[str, str, int]] = set()
    for row in rows:
        key = (row.office, row.boot_id, row.seq)
        if key not in seen:
            seen.add(key)
            by_call.setdefault(row.call_id, []).append(row)
    records = [_merge_one(call_id, found) for call_id, found in by_call.items()]
    records.sort(key=lambda r: (r.started_at if r.started_at is not None else 0.0, r.id))
    return records


# The caller's side knows best who called and how it ended: its view wins, then the other's.
_SIDE_RANK = {"local": 0, "outbound": 0, "inbound": 1}


def _merge_one(call_id: str, rows: list[CallRecordInfo]) -> CallRecord:
    rows = sorted(rows, key=lambda r: (_SIDE_RANK.get(r.direction, 2), r.at, r.seq))
    record = CallRecord(call_id)
    for row in rows:
        # The last direction an office gave: a call may turn from local to outbound.
        record.views[row.office] = row.direction
    record.offices = sorted(
        record.views, key=lambda office: (_SIDE_RANK.get(record.views[office], 2), office)
    )
    relayed = any(d in ("outbound", "inbound") for d in record.views.values())
    record.route = "relayed" if relayed or len(record.views) > 1 else "local"
    best = rows[0]
    record.caller = best.caller
    record.callee = best.callee
    record.started_at = _first(r.at for r in rows if r.event == "started")
    record.ringing_at = _first(r.at for r in rows if r.event == "ringing")
    record.answered_at = _first(r.at for r in rows if r.event == "answered")
    ends = [r for r in rows if r.event == "ended"]
    if ends:
        record.ended_at = min(r.at for r in ends)
        record.status, record.reason = ends[0].status, ends[0].reason
    if record.started_at is None:  # its start lies in a gap: the earliest event stands in
        record.started_at = min(r.at for r in rows)
    return record


def gaps(keys: Iterable[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """Per (office, boot epoch): the highest seq stored and the missing ranges below it."""
    seqs: dict[tuple[str, str], set[int]] = {}
    for office, boot_id, seq in keys:
        seqs.setdefault((office, boot_id), set()).add(seq)
    out = []
    for (office, boot_id), found in sorted(seqs.items()):
        missing: list[list[int]] = []
        for seq in range(1, max(found) + 1):
            if seq in found:
                continue
            if missing and missing[-1][1] == seq - 1:
                missing[-1][1] = seq
            else:
                missing.append([seq, seq])
        out.append(
            {
                "office": office,
                "boot_id": boot_id,
                "highest": max(found),
                "stored": len(found),
                "missing": missing,
            }
        )
    return out


def to_csv(records: Iterable[CallRecord], now: float) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        row = record.as_dict(now)
        row["offices"] = " ".join(record.offices)
        row["status"] = "" if record.status is None else record.status
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})
    return out.getvalue()


class CallRecordStore:
    """The offices' call records in sqlite. Synchronous: the server calls it through
    `trio.to_thread`, the CLI directly; one connection guarded by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS call_events (
                office TEXT NOT NULL,
                boot_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                call_id TEXT NOT NULL,
                event TEXT NOT NULL,
                at REAL NOT NULL,
                caller TEXT NOT NULL,
                callee TEXT NOT NULL,
                direction TEXT NOT NULL,
                status INTEGER NOT NULL,
                reason TEXT NOT NULL,
                UNIQUE (office, boot_id, seq)
            );
            CREATE INDEX IF NOT EXISTS call_events_call ON call_events (call_id);
            """
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, office: str, rows: list[CallRecordInfo]) -> list[CallRecordsAck]:
        """Store an upload from `office` (the logged-in one: rows naming another office are
        refused); the acks to send, one per boot epoch in it. Storing twice is harmless."""
        upto: dict[str, int] = {}
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    if row.office != office:
                        log.warning("office %s uploaded a record of office %r", office, row.office)
                        continue
                    self._db.execute(
                        "INSERT OR IGNORE INTO call_events (office, boot_id, seq, call_id,"
                        " event, at, caller, callee, direction, status, reason)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            row.office,
                            row.boot_id,
                            row.seq,
                            row.call_id,
                            row.event,
                            row.at,
                            row.caller,
                            row.callee,
                            row.direction,
                            row.status,
                            row.reason,
                        ),
                    )
                    upto[row.boot_id] = max(upto.get(row.boot_id, 0), row.seq)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [CallRecordsAck(office, boot_id, seq) for boot_id, seq in upto.items()]

    def rows(self, call_ids: Iterable[str] | None = None) -> list[CallRecordInfo]:
        sql = "SELECT office, boot_id, seq, call_id, event, at, caller, callee, direction,"
        sql += " status, reason FROM call_events"
        with self._lock:
            if call_ids is None:
                found = self._db.execute(sql + " ORDER BY at, seq").fetchall()
            else:
                ids = list(call_ids)
                found = []
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    found += self._db.execute(f"{sql} WHERE call_id IN ({marks})", chunk).fetchall()
        return [CallRecordInfo(*row) for row in found]

    def calls(self, *, live: bool = False, limit: int | None = None) -> list[CallRecord]:
        """Every call (oldest first), or only those going on; `limit`: the newest ones."""
        records = merge(self.rows())
        if live:
            records = [r for r in records if r.active]
        if limit is not None:
            records = records[-limit:] if limit > 0 else []
        return records

    def gaps(self) -> list[dict[str, Any]]:
        with self._lock:
            keys = self._db.execute("SELECT office, boot_id, seq FROM call_events").fetchall()
        return gaps((str(o), str(b), int(s)) for o, b, s in keys)
