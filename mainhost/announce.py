"""Announcements from the main host to the offices' phones (F8): the policy and the sender.

This module owns what an announcement is and where it goes: checking an operator's request
(text, office, extensions, lifetime) against the directory, turning it into the wire
`Announcement` for each office it concerns, deciding which online office still needs which
announcement (once per trunk session: a remote host that logs in again is sent every unexpired
one, and answers with its report), taking the offices' cumulative reports, and the summary that
`mainhost announcements`, `status` and the API show.

It does not store (`MainStore`'s `announcements` and `announcement_reports` tables do) and it
does not deliver to phones (the remote host does, remotehost/announce.py). Everything but
`Announcer`, the trio task that sends, is pure with the time as an input.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from mainhost.store import MainStore, StoreError
from shared.wire.messages import Announcement as WireAnnouncement
from shared.wire.messages import AnnouncementReport, Message

log = logging.getLogger("mainhost.announce")
DEFAULT_EXPIRES = 86400.0
MAX_TEXT_BYTES = 1300  # RFC 3428 §7: a MESSAGE must fit a UDP datagram without fragmenting
MAX_REPORTED = 10000  # extensions per report we keep: an office has at most its range
MAX_REASON = 200
SENDER = "main host"


class AnnounceError(StoreError):
    """The operator's announcement cannot be sent as asked (says which part is wrong)."""


@dataclass(frozen=True)
class Announcement:
    """One announcement as stored: `targets` maps each office it concerns to the extensions
    it is for there (empty: every phone of the office)."""

    id: str
    text: str
    created: float
    expires_at: float
    targets: dict[str, tuple[str, ...]]
    office: str | None = None
    extensions: tuple[str, ...] = ()
    sender: str = SENDER

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "created": self.created,
            "expires_at": self.expires_at,
            "office": self.office,
            "extensions": json.dumps(
                {"requested": list(self.extensions), "targets": _lists(self.targets)}
            ),
            "sender": self.sender,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Announcement:
        extensions = json.loads(row["extensions"])
        return cls(
            id=row["id"],
            text=row["text"],
            created=row["created"],
            expires_at=row["expires_at"],
            targets={o: tuple(e) for o, e in extensions["targets"].items()},
            office=row["office"],
            extensions=tuple(extensions["requested"]),
            sender=row["sender"],
        )

    def active(self, now: float) -> bool:
        return now < self.expires_at

    def to_wire(self, office: str) -> WireAnnouncement:
        return WireAnnouncement(
            id=self.id,
            text=self.text,
            expires_at=self.expires_at,
            extensions=list(self.targets[office]),
            sender=self.sender,
        )


def _lists(targets: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    return {office: list(exts) for office, exts in sorted(targets.items())}


def create(
    text: str,
    *,
    now: float,
    offices: Iterable[str],
    phones: Mapping[str, str],
    office: str | None = None,
    extensions: Iterable[str] = (),
    expires: float = DEFAULT_EXPIRES,
    sender: str = SENDER,
    announcement_id: str | None = None,
) -> Announcement:
    """Check a request against the directory (`phones`: extension -> office) and make the
    announcement; AnnounceError names what is wrong, and nothing should be stored then."""
    if not text.strip():
        raise AnnounceError("the announcement text is empty")
    if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise AnnounceError(
            f"the announcement text is {len(text.encode('utf-8'))} bytes; at most"
            f" {MAX_TEXT_BYTES} fit a SIP MESSAGE"
        )
    if not math.isfinite(expires) or expires <= 0:
        raise AnnounceError(f"--expires must be a positive number of seconds, not {expires:g}")
    names = sorted(set(offices))
    if office is not None and office not in names:
        raise AnnounceError(f"no office named {office!r} (see `mainhost status`)")
    wanted = tuple(dict.fromkeys(extensions))  # in the operator's order, once each
    targets: dict[str, list[str]] = {}
    for ext in wanted:
        home = phones.get(ext)
        if home is None:
            raise AnnounceError(f"no phone with extension {ext!r} (see `mainhost phone list`)")
        if office is not None and home != office:
            raise AnnounceError(f"extension {ext} belongs to office {home}, not {office}")
        targets.setdefault(home, []).append(ext)
    if not wanted:
        targets = {name: [] for name in ([office] if office is not None else names)}
    if not targets:
        raise AnnounceError("there is no office to send it to (`mainhost office add` first)")
    return Announcement(
        id=announcement_id or secrets.token_hex(6),
        text=text,
        created=now,
        expires_at=now + expires,
        targets={o: tuple(e) for o, e in targets.items()},
        office=office,
        extensions=wanted,
        sender=sender,
    )


@dataclass
class Dispatch:
    """Which announcement still goes to which office: each active one once per trunk session
    of each office it concerns (a new login is a new session, so it is sent again)."""

    sent: set[tuple[str, str, str]] = field(default_factory=set)  # (id, office, session)

    def due(
        self, announcements: Iterable[Announcement], sessions: Mapping[str, str], now: float
    ) -> list[tuple[str, Announcement]]:
        out: list[tuple[str, Announcement]] = []
        keep: set[tuple[str, str, str]] = set()
        for a in announcements:
            if not a.active(now):
                continue
            for office in a.targets:
                session = sessions.get(office)
                if session is None:
                    continue
                key = (a.id, office, session)
                keep.add(key)
                if key not in self.sent:
                    out.append((office, a))
        # Forget sessions that ended and announcements that expired: bounded by what is live.
        self.sent &= keep
        return out

    def mark_sent(self, announcement_id: str, office: str, session: str) -> None:
        self.sent.add((announcement_id, office, session))


def report_row(
    announcement: Announcement, office: str, report: AnnouncementReport, now: float
) -> dict[str, Any] | None:
    """The row to store for an office's report, or None if the announcement does not concern
    that office. Sizes are bounded: the report comes from the network."""
    if office not in announcement.targets:
        return None
    return {
        "id": announcement.id,
        "office": office,
        "delivered": json.dumps(sorted(set(report.delivered))[:MAX_REPORTED]),
        "failed": json.dumps(
            {ext: why[:MAX_REASON] for ext, why in sorted(report.failed.items())[:MAX_REPORTED]}
        ),
        "pending": json.dumps(sorted(set(report.pending))[:MAX_REPORTED]),
        "at": now,
    }


def summary(
    announcement: Announcement,
    reports: Mapping[str, Mapping[str, Any]],
    phones_by_office: Mapping[str, list[str]],
    now: float,
) -> dict[str, Any]:
    """One announcement as `mainhost announcements --json` shows it: per office the counts
    and extensions from its last report; an office that has not reported yet has every
    phone it concerns pending."""
    offices = []
    for office, exts in sorted(announcement.targets.items()):
        report = reports.get(office)
        if report is None:
            delivered: list[str] = []
            failed: dict[str, str] = {}
            pending = sorted(exts or phones_by_office.get(office, []))
        else:
            delivered = json.loads(report["delivered"])
            failed = json.loads(report["failed"])
            pending = json.loads(report["pending"])
        offices.append(
            {
                "office": office,
                "reported": report is not None,
                "delivered": len(delivered),
                "failed": len(failed),
                "pending": len(pending),
                "delivered_extensions": delivered,
                "failed_extensions": failed,
                "pending_extensions": pending,
            }
        )
    return {
        "id": announcement.id,
        "text": announcement.text,
        "sender": announcement.sender,
        "created": announcement.created,
        "expires": announcement.expires_at,
        "expired": not announcement.active(now),
        "office": announcement.office,
        "extensions": list(announcement.extensions),
        "delivered": sum(o["delivered"] for o in offices),
        "failed": sum(o["failed"] for o in offices),
        "pending": sum(o["pending"] for o in offices),
        "offices": offices,
    }


# --- with the store (synchronous: the CLI calls these directly, the server via to_thread) ---


def announce(store: MainStore, text: str, *, now: float, **request: Any) -> Announcement:
    """Check and store an announcement; the running main host sends it within a moment."""
    phones = {p["ext"]: p["office"] for p in store.phones()}
    offices = [o.name for o in store.offices()]
    announcement = create(text, now=now, offices=offices, phones=phones, **request)
    store.add_announcement(announcement.row())
    return announcement


def summaries(store: MainStore, now: float) -> list[dict[str, Any]]:
    reports: dict[str, dict[str, dict[str, Any]]] = {}
    for row in store.announcement_reports():
        reports.setdefault(row["id"], {})[row["office"]] = row
    phones_by_office: dict[str, list[str]] = {}
    for phone in store.phones():
        phones_by_office.setdefault(phone["office"], []).append(phone["ext"])
    return [
        summary(Announcement.from_row(row), reports.get(row["id"], {}), phones_by_office, now)
        for row in store.announcement_rows()
    ]


class Announcer:
    """The trunk's sender: every `interval`, each active announcement to each online office
    that has not had it on its current session; the offices' reports into the store."""

    def __init__(
        self,
        store: MainStore,
        *,
        send: Callable[[str, Message, int], Awaitable[bool]],
        sessions: Callable[[], dict[str, str]],
        wall_clock: Callable[[], float],
    ) -> None:
        self.store = store
        self._send = send
        self._sessions = sessions
        self._wall = wall_clock
        self.dispatch = Dispatch()
        self._wake = trio.Event()

    def poke(self) -> None:
        """Look now (a new announcement was stored in this process)."""
        self._wake.set()

    async def watch(self, interval: float = 0.2) -> None:
        while True:
            await self.send_due()
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()

    async def send_due(self) -> None:
        now = self._wall()
        rows = await trio.to_thread.run_sync(self.store.announcement_rows, now)
        sessions = self._sessions()
        for office, a in self.dispatch.due(map(Announcement.from_row, rows), sessions, now):
            if await self._send(office, a.to_wire(office), 0):
                self.dispatch.mark_sent(a.id, office, sessions[office])
                log.info("announcement %s sent to office %s", a.id, office)

    async def on_report(self, office: str, report: AnnouncementReport) -> None:
        rows = await trio.to_thread.run_sync(self.store.announcement_rows)
        match = [Announcement.from_row(r) for r in rows if r["id"] == report.id]
        row = report_row(match[0], office, report, self._wall()) if match else None
        if row is None:
            log.warning("office %s reported on announcement %r, not one of its", office, report.id)
            return
        await trio.to_thread.run_sync(self.store.record_announcement_report, row)
        log.info(
            "announcement %s in office %s: %d delivered, %d failed, %d pending",
            report.id,
            office,
            len(report.delivered),
            len(report.failed),
            len(report.pending),
        )
