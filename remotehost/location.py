"""Where each extension's phones are: bindings in memory, kept on disk, changes announced.

Policy apart from storage (STYLE.md, Kamailio's registrar vs usrloc): the registrar decides, this
module stores. `Location` is the in-memory table the registrar reads and writes on every REGISTER
(dict lookups only); every change marks the extension dirty and notifies listeners (the uplink
reports registrations to the main host; the disk writer saves them). `SqliteLocationStore` saves
dirty extensions in batches, so a burst of registrations costs one transaction, and loads them
back at start, dropping what expired while we were down.

Time is an input (`now`, wall-clock seconds, since bindings outlive the process).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

DB_NAME = "location.db"


@dataclass(frozen=True, slots=True)
class Binding:
    """One contact of one extension (RFC 3261 §10.3)."""

    ext: str
    contact: str  # the Contact URI as the phone sent it
    expires_at: float
    call_id: str
    cseq: int
    transport: str  # "udp" or "tcp": how the REGISTER came in
    source_ip: str  # where it came from (after NAT): where we send requests to the phone
    source_port: int
    user_agent: str = ""
    q: float = 1.0
    reachable: bool = True

    @property
    def source(self) -> str:
        return f"{self.transport}:{self.source_ip}:{self.source_port}"

    def remaining(self, now: float) -> int:
        return max(0, int(self.expires_at - now + 0.5))


Listener = Callable[[str, list[Binding]], None]


class Location:
    """The bindings of every extension, in memory; change listeners get (ext, its bindings)."""

    def __init__(self, max_contacts: int = 10) -> None:
        self.max_contacts = max_contacts
        self._bindings: dict[str, dict[str, Binding]] = {}
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def load(self, bindings: Iterable[Binding]) -> None:
        """Fill from disk at start (no listeners called)."""
        for binding in bindings:
            self._bindings.setdefault(binding.ext, {})[binding.contact] = binding

    def get(self, ext: str) -> list[Binding]:
        return list(self._bindings.get(ext, {}).values())

    def find(self, ext: str, contact: str) -> Binding | None:
        return self._bindings.get(ext, {}).get(contact)

    def extensions(self) -> list[str]:
        return sorted(self._bindings)

    def all(self) -> list[Binding]:
        return [b for contacts in self._bindings.values() for b in contacts.values()]

    def __len__(self) -> int:
        return sum(len(c) for c in self._bindings.values())

    def replace(self, ext: str, bindings: dict[str, Binding]) -> None:
        """Set an extension's whole binding set (the registrar's one write)."""
        if bindings:
            self._bindings[ext] = bindings
        else:
            self._bindings.pop(ext, None)
        self._changed(ext)

    def set_reachable(self, ext: str, contact: str, reachable: bool) -> None:
        binding = self.find(ext, contact)
        if binding is not None and binding.reachable != reachable:
            self._bindings[ext][contact] = replace(binding, reachable=reachable)
            self._changed(ext)

    def expire(self, now: float) -> list[Binding]:
        """Remove bindings whose time is up; return them."""
        gone: list[Binding] = []
        for ext in list(self._bindings):
            contacts = self._bindings[ext]
            dead = [c for c, b in contacts.items() if b.expires_at <= now]
            if not dead:
                continue
            for contact in dead:
                gone.append(contacts.pop(contact))
            if not contacts:
                del self._bindings[ext]
            self._changed(ext)
        return gone

    def next_expiry(self) -> float | None:
        times = [b.expires_at for c in self._bindings.values() for b in c.values()]
        return min(times) if times else None

    def _changed(self, ext: str) -> None:
        bindings = self.get(ext)
        for listener in self._listeners:
            listener(ext, bindings)


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS bindings (ext TEXT NOT NULL, contact TEXT NOT NULL,"
    " expires_at REAL NOT NULL, call_id TEXT NOT NULL, cseq INTEGER NOT NULL,"
    " transport TEXT NOT NULL, source_ip TEXT NOT NULL, source_port INTEGER NOT NULL,"
    " user_agent TEXT NOT NULL, q REAL NOT NULL, reachable INTEGER NOT NULL,"
    " PRIMARY KEY (ext, contact))",
)


def registration_entry(binding: Binding, now: float) -> dict[str, object]:
    """One binding as `remotehost status --json` lists it under "registrations"."""
    return {
        "ext": binding.ext,
        "contact": binding.contact,
        "source": binding.source,
        "user_agent": binding.user_agent,
        "expires_in": binding.remaining(now),
        "reachable": binding.reachable,
    }


def read_bindings(path: Path, now: float) -> list[Binding]:
    """The unexpired bindings on disk, read-only: what `status` shows while the host is down."""
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return []
    try:
        rows = db.execute(
            "SELECT ext, contact, expires_at, call_id, cseq, transport, source_ip,"
            " source_port, user_agent, q, reachable FROM bindings WHERE expires_at > ?",
            (now,),
        ).fetchall()
    except sqlite3.Error:  # no table yet (never served), or a damaged file
        return []
    finally:
        db.close()
    return [
        Binding(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], bool(r[10]))
        for r in rows
    ]


class SqliteLocationStore:
    """Bindings on disk. Synchronous: called through `trio.to_thread` by the SIP service.

    WAL with synchronous=NORMAL: a committed batch survives a crash of the process (kill -9);
    a power cut may lose the last batch, which the phones' next refresh restores.
    """

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for statement in SCHEMA:
            self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load(self, now: float) -> list[Binding]:
        with self._lock:
            self._db.execute("DELETE FROM bindings WHERE expires_at <= ?", (now,))
            rows = self._db.execute(
                "SELECT ext, contact, expires_at, call_id, cseq, transport, source_ip,"
                " source_port, user_agent, q, reachable FROM bindings"
            ).fetchall()
        return [
            Binding(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], bool(r[10]))
            for r in rows
        ]

    def save(self, changes: dict[str, list[Binding]]) -> None:
        """Replace the stored bindings of each extension in `changes`, in one transaction."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM bindings WHERE ext=?", [(e,) for e in changes])
                db.executemany(
                    "INSERT INTO bindings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            b.ext,
                            b.contact,
                            b.expires_at,
                            b.call_id,
                            b.cseq,
                            b.transport,
                            b.source_ip,
                            b.source_port,
                            b.user_agent,
                            b.q,
                            int(b.reachable),
                        )
                        for bindings in changes.values()
                        for b in bindings
                    ],
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
