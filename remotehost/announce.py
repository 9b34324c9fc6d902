"""Announcements at the remote host (F8): a copy to every phone of the office, and who got it.

The main host sends an `Announcement` (wire type 105); this module delivers it to each
extension it concerns as a SIP MESSAGE (RFC 3428), once per phone: to the phones registered
now, and to the others when they register, until it expires. A refresh REGISTER sends nothing;
a new registration (after an unregistration or expiry) tries again whatever that extension has
not got yet, a failed delivery included. After every change it reports to the main host where
the announcement got to (`AnnouncementReport`, cumulative: delivered, failed with why, pending).

`AnnouncementBook` is the policy, pure with the time as an input; `AnnouncementStore` keeps the
announcements and the outcomes in a small sqlite file next to the location database, so a
restart does not lose a pending delivery or resend a delivered one; `Announcer` is the trio task
between them, the location table (whose listener says when a phone registers), the SIP service
(which sends a MESSAGE and tells the outcome) and the uplink (which carries the reports). It
does not build SIP messages (sipservice.py does) nor talk to the trunk itself.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from remotehost.location import Binding, Location
from shared.wire.messages import Announcement, AnnouncementReport

log = logging.getLogger("remotehost.announce")
DB_NAME = "announcements.db"
MAX_ANNOUNCEMENTS = 1000  # kept at once; the main host sends few, each with an expiry
MAX_REASON = 200
MAX_PARALLEL = 20  # MESSAGEs on their way at once: a big office must not flood the LAN
REPORT_INTERVAL = 0.2  # seconds between two rounds of reports: outcomes are batched


@dataclass
class AnnouncementBook:
    """Per announcement and extension: delivered, failed (why), on its way, or not yet.

    An extension is concerned by an announcement without `extensions` if it is in the office's
    directory, by one with `extensions` if it is listed there.
    """

    announcements: dict[str, Announcement] = field(default_factory=dict)
    delivered: dict[str, set[str]] = field(default_factory=dict)
    failed: dict[str, dict[str, str]] = field(default_factory=dict)
    in_flight: set[tuple[str, str]] = field(default_factory=set)

    def add(self, announcement: Announcement, now: float) -> bool:
        """Take an announcement; False if it is known already, expired, or one too many."""
        if announcement.id in self.announcements or now >= announcement.expires_at:
            return False
        if len(self.announcements) >= MAX_ANNOUNCEMENTS:
            log.warning("%d announcements held: %r refused", MAX_ANNOUNCEMENTS, announcement.id)
            return False
        self.announcements[announcement.id] = announcement
        self.delivered.setdefault(announcement.id, set())
        self.failed.setdefault(announcement.id, {})
        return True

    def expire(self, now: float) -> list[str]:
        """Forget the announcements whose time is up (deliveries on their way still finish)."""
        gone = [i for i, a in self.announcements.items() if now >= a.expires_at]
        for announcement_id in gone:
            del self.announcements[announcement_id]
            self.delivered.pop(announcement_id, None)
            self.failed.pop(announcement_id, None)
        return gone

    @staticmethod
    def concerns(announcement: Announcement, ext: str) -> bool:
        return not announcement.extensions or ext in announcement.extensions

    def start(self, ext: str, now: float) -> list[Announcement]:
        """What to send to `ext` now that it is registered: every unexpired announcement for
        it that it has not got and that is not on its way already (marked on its way)."""
        out = []
        for a in self.announcements.values():
            key = (a.id, ext)
            if (
                now < a.expires_at
                and self.concerns(a, ext)
                and ext not in self.delivered[a.id]
                and key not in self.in_flight
            ):
                self.in_flight.add(key)
                out.append(a)
        return out

    def finish(self, announcement_id: str, ext: str, error: str | None) -> bool:
        """A delivery's outcome (None: a 2xx); False if the announcement is gone meanwhile."""
        self.in_flight.discard((announcement_id, ext))
        if announcement_id not in self.announcements:
            return False
        if error is None:
            self.delivered[announcement_id].add(ext)
            self.failed[announcement_id].pop(ext, None)
        elif ext not in self.delivered[announcement_id]:
            self.failed[announcement_id][ext] = error[:MAX_REASON]
        return True

    def abandon(self, announcement_id: str, ext: str) -> None:
        """Not sent after all (the phone unregistered first): pending again."""
        self.in_flight.discard((announcement_id, ext))

    def report(self, announcement_id: str, directory: Iterable[str]) -> AnnouncementReport | None:
        """Where the announcement got to: everyone concerned that is neither delivered nor
        failed is pending (not registered yet, or on its way)."""
        a = self.announcements.get(announcement_id)
        if a is None:
            return None
        delivered = self.delivered[a.id]
        failed = self.failed[a.id]
        wanted = set(a.extensions) if a.extensions else set(directory)
        wanted |= delivered | set(failed)
        return AnnouncementReport(
            id=a.id,
            delivered=sorted(delivered),
            failed=dict(sorted(failed.items())),
            pending=sorted(wanted - delivered - set(failed)),
        )


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS announcements (id TEXT PRIMARY KEY, text TEXT NOT NULL,"
    " expires_at REAL NOT NULL, extensions TEXT NOT NULL, sender TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS outcomes (id TEXT NOT NULL, ext TEXT NOT NULL,"
    " error TEXT, PRIMARY KEY (id, ext))",
)


class AnnouncementStore:
    """The book on disk. Synchronous: called through `trio.to_thread`. WAL, synchronous=FULL:
    an outcome, once reported, must not be redone after a crash (a phone would get it twice)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in SCHEMA:
            self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load(self, now: float) -> AnnouncementBook:
        """The unexpired announcements and their outcomes (the expired are deleted)."""
        book = AnnouncementBook()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                expired = [(r[0],) for r in self._db.execute(
                    "SELECT id FROM announcements WHERE expires_at <= ?", (now,)
                )]  # fmt: skip
                self._db.executemany("DELETE FROM outcomes WHERE id=?", expired)
                self._db.executemany("DELETE FROM announcements WHERE id=?", expired)
                rows = self._db.execute("SELECT * FROM announcements").fetchall()
                outcomes = self._db.execute("SELECT id, ext, error FROM outcomes").fetchall()
            finally:
                self._db.execute("COMMIT")
        for id_, text, expires_at, extensions, sender in rows:
            book.add(Announcement(id_, text, expires_at, json.loads(extensions), sender), now)
        for id_, ext, error in outcomes:
            book.finish(id_, ext, error)
        return book

    def add(self, announcement: Announcement) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO announcements VALUES (?, ?, ?, ?, ?)",
                (
                    announcement.id,
                    announcement.text,
                    announcement.expires_at,
                    json.dumps(list(announcement.extensions)),
                    announcement.sender,
                ),
            )

    def record(self, announcement_id: str, ext: str, error: str | None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO outcomes VALUES (?, ?, ?) ON CONFLICT(id, ext) DO UPDATE SET"
                " error=excluded.error WHERE outcomes.error IS NOT NULL",  # delivered is final
                (announcement_id, ext, error),
            )

    def forget(self, ids: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM outcomes WHERE id=?", [(i,) for i in ids])
            self._db.executemany("DELETE FROM announcements WHERE id=?", [(i,) for i in ids])


Deliver = Callable[[Binding, Announcement, float], Awaitable[str | None]]
"""Send one MESSAGE to one binding at wall time `now`; None for a 2xx, else why not."""
Report = Callable[[AnnouncementReport], Awaitable[bool]]


class Announcer:
    """Runs the book: deliveries when announcements arrive and when phones register, the
    outcomes to disk, and a report to the main host after every change."""

    def __init__(
        self,
        store: AnnouncementStore,
        location: Location,
        *,
        deliver: Deliver,
        directory: Callable[[], Iterable[str]],
        wall_clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.location = location
        self.book = store.load(wall_clock())
        self.report_to: Report | None = None
        self._deliver = deliver
        self._directory = directory
        self._wall = wall_clock
        self._registered = set(location.extensions())
        # At start, the phones registered before the restart get what they have not got.
        self._due: set[str] = set(self._registered)
        self._reports: set[str] = set()
        self._reports_ready = trio.Event()
        self._wake = trio.Event()
        self._slots = trio.Semaphore(MAX_PARALLEL)
        location.add_listener(self._on_location)

    def _on_location(self, ext: str, bindings: list[Binding]) -> None:
        if not bindings:
            self._registered.discard(ext)
        elif ext not in self._registered:
            # A new registration, not a refresh: this phone may have missed something.
            self._registered.add(ext)
            self._due.add(ext)
            self._wake.set()

    async def on_announcement(self, announcement: Announcement) -> None:
        """From the main host (again after each login: then only the report goes back)."""
        if self.book.add(announcement, self._wall()):
            # Due at once, before any checkpoint: the run loop must not see it half taken
            # (it would send it to a phone that then gets it again from here).
            self._due |= {e for e in self._registered if self.book.concerns(announcement, e)}
            log.info("announcement %s: %r", announcement.id, announcement.text)
            await trio.to_thread.run_sync(self.store.add, announcement)
        self._report(announcement.id)
        self._wake.set()

    def directory_changed(self) -> None:
        """Pending counts follow the directory: report again."""
        for announcement_id in self.book.announcements:
            self._report(announcement_id)

    def _report(self, announcement_id: str) -> None:
        self._reports.add(announcement_id)
        self._reports_ready.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_loop)
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                now = self._wall()
                gone = self.book.expire(now)
                if gone:
                    await trio.to_thread.run_sync(self.store.forget, gone)
                due, self._due = self._due, set()
                for ext in sorted(due):
                    for announcement in self.book.start(ext, now):
                        nursery.start_soon(self._deliver_one, ext, announcement)

    async def _deliver_one(self, ext: str, announcement: Announcement) -> None:
        async with self._slots:
            bindings = self.location.get(ext)
            if not bindings:
                self.book.abandon(announcement.id, ext)
                return
            errors = []
            for binding in bindings:  # a phone with several contacts: one 2xx is enough
                error = await self._deliver(binding, announcement, self._wall())
                if error is None:
                    break
                errors.append(error)
            else:
                error = errors[0]
        if self.book.finish(announcement.id, ext, error):
            await trio.to_thread.run_sync(self.store.record, announcement.id, ext, error)
            if error is None:
                log.info("announcement %s delivered to %s", announcement.id, ext)
            else:
                log.info("announcement %s not delivered to %s: %s", announcement.id, ext, error)
            self._report(announcement.id)

    async def _report_loop(self) -> None:
        """Reports in rounds: a thousand phones answering make a few reports, not a thousand
        (each report lists every extension)."""
        while True:
            await self._reports_ready.wait()
            self._reports_ready = trio.Event()
            await self._send_reports()
            await trio.sleep(REPORT_INTERVAL)

    async def _send_reports(self) -> None:
        ids, self._reports = self._reports, set()
        directory = list(self._directory())
        for announcement_id in sorted(ids):
            report = self.book.report(announcement_id, directory)
            if report is not None and self.report_to is not None:
                # Not sent (trunk down): the main host sends the announcement again after the
                # next login, and its answer is the report.
                await self.report_to(report)
