"""The office's mirror of the main host's directory, on disk (sqlite, WAL, synchronous=FULL).

The remote host starts from this mirror even when the main host is unreachable, so phones can
register and call inside the office during a WAN outage. A snapshot replaces the mirror in one
transaction; a delta applies only on top of the version it was made for (anything else asks for a
snapshot). Synchronous: the service calls it through `trio.to_thread`.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from shared.cli import CliError
from shared.wire.messages import DirectoryDelta, DirectoryEntry, DirectorySnapshot

DB_NAME = "remotehost.db"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS directory (ext TEXT PRIMARY KEY, name TEXT NOT NULL,"
    " ha1_md5 TEXT NOT NULL, ha1_sha256 TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


@dataclass(frozen=True)
class MirrorInfo:
    version: int
    realm: str
    office: str
    ext_first: int
    ext_last: int
    entries: int


class DirectoryMirror:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            for statement in SCHEMA:
                self._db.execute(statement)
        except sqlite3.Error as exc:  # not a database, unwritable directory, ...
            raise CliError(
                f"cannot open the directory mirror {path}: {exc} (move it away; the main host"
                " sends a fresh copy at the next login)"
            ) from None
        # The registrar looks credentials up on every REGISTER: from memory, not from sqlite.
        # Replaced whole (never mutated) after each applied change, so readers need no lock.
        self._cache: dict[str, DirectoryEntry] = {e.ext: e for e in self._load_entries()}
        self.realm = self._meta("realm")

    def _load_entries(self) -> list[DirectoryEntry]:
        rows = self._db.execute(
            "SELECT ext, ha1_md5, ha1_sha256, name FROM directory ORDER BY ext"
        ).fetchall()
        return [DirectoryEntry(*row) for row in rows]

    def lookup_ha1(self, ext: str, algorithm: str) -> str | None:
        """The stored HA1 of `ext` for "MD5" or "SHA-256", or None (for the digest verifier)."""
        entry = self._cache.get(ext)
        if entry is None:
            return None
        return entry.ha1_md5 if algorithm == "MD5" else entry.ha1_sha256

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str, default: str = "") -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else default

    def get_meta(self, key: str, default: str = "") -> str:
        with self._lock:
            return self._meta(key, default)

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

    def info(self) -> MirrorInfo:
        with self._lock:
            count = self._db.execute("SELECT COUNT(*) FROM directory").fetchone()[0]
            return MirrorInfo(
                version=int(self._meta("version", "0")),
                realm=self._meta("realm"),
                office=self._meta("office"),
                ext_first=int(self._meta("ext_first", "0")),
                ext_last=int(self._meta("ext_last", "0")),
                entries=count,
            )

    def lookup(self, ext: str) -> DirectoryEntry | None:
        return self._cache.get(ext)

    def entries(self) -> list[DirectoryEntry]:
        return sorted(self._cache.values(), key=lambda e: e.ext)

    def apply_snapshot(self, snapshot: DirectorySnapshot) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM directory")
                db.executemany(
                    "INSERT INTO directory(ext, name, ha1_md5, ha1_sha256) VALUES (?, ?, ?, ?)",
                    [(e.ext, e.name, e.ha1_md5, e.ha1_sha256) for e in snapshot.entries],
                )
                for key, value in (
                    ("version", snapshot.version),
                    ("realm", snapshot.realm),
                    ("office", snapshot.office),
                    ("ext_first", snapshot.ext_first),
                    ("ext_last", snapshot.ext_last),
                ):
                    db.execute(
                        "INSERT INTO meta(key, value) VALUES (?, ?)"
                        " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, str(value)),
                    )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            self._cache = {e.ext: e for e in snapshot.entries}
            self.realm = snapshot.realm

    def apply_delta(self, delta: DirectoryDelta) -> bool:
        """Apply a delta; False (and nothing changed) if it was not made for our version."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if int(self._meta("version", "0")) != delta.base_version:
                    db.execute("ROLLBACK")
                    return False
                db.executemany(
                    "INSERT INTO directory(ext, name, ha1_md5, ha1_sha256) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT(ext) DO UPDATE SET name=excluded.name,"
                    " ha1_md5=excluded.ha1_md5, ha1_sha256=excluded.ha1_sha256",
                    [(e.ext, e.name, e.ha1_md5, e.ha1_sha256) for e in delta.put],
                )
                db.executemany("DELETE FROM directory WHERE ext=?", [(x,) for x in delta.delete])
                db.execute(
                    "INSERT INTO meta(key, value) VALUES ('version', ?)"
                    " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (str(delta.version),),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            cache = dict(self._cache)
            cache.update((e.ext, e) for e in delta.put)
            for ext in delta.delete:
                cache.pop(ext, None)
            self._cache = cache
            return True
