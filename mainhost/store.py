"""The main host's durable state in sqlite: offices, phones, the directory journal, office state.

This module owns the schema and every query. It is synchronous on purpose: the CLI calls it
directly, and the server calls it through `trio.to_thread` (see `service.py`). One connection per
store, guarded by a lock, WAL journal and `synchronous=FULL` so a committed change survives a
power cut. The CLI and a running server may write at the same time; sqlite serializes them and
the server notices changes through `data_version()`.

It does not decide policy (who may log in, what to push): the trunk and the CLI do.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.wire.messages import DirectoryDelta, DirectoryEntry, DirectorySnapshot

DB_NAME = "mainhost.db"
SCHEMA_VERSION = 1
OFFICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS offices (
    name TEXT PRIMARY KEY,
    ext_first INTEGER NOT NULL,
    ext_last INTEGER NOT NULL,
    wan_kbps INTEGER NOT NULL,
    secret BLOB NOT NULL,
    dir_version INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    public_ip TEXT,
    public_port INTEGER,
    nat_type TEXT,
    lan TEXT,
    stun_ip TEXT,
    stun_port INTEGER,
    last_seen REAL,
    last_login REAL
);
CREATE TABLE IF NOT EXISTS phones (
    ext TEXT PRIMARY KEY,
    office TEXT NOT NULL REFERENCES offices(name),
    name TEXT NOT NULL DEFAULT '',
    ha1_md5 TEXT NOT NULL,
    ha1_sha256 TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dir_changes (
    office TEXT NOT NULL,
    version INTEGER NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('put', 'delete')),
    ext TEXT NOT NULL,
    PRIMARY KEY (office, version)
);
CREATE TABLE IF NOT EXISTS office_log (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    office TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS announcements (
    id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    created REAL NOT NULL,
    expires_at REAL NOT NULL,
    office TEXT,
    extensions TEXT NOT NULL,
    sender TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS announcement_reports (
    id TEXT NOT NULL REFERENCES announcements(id),
    office TEXT NOT NULL,
    delivered TEXT NOT NULL,
    failed TEXT NOT NULL,
    pending TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (id, office)
);
"""


# sqlite primary result codes that mean the file or the disk, not our SQL: BUSY, LOCKED,
# READONLY, IOERR, FULL, CANTOPEN (https://sqlite.org/rescode.html).
_NOT_OUR_BUG = {5, 6, 8, 10, 13, 14}


class StoreError(Exception):
    """An operator asked for something the data does not allow (names the office or ext)."""


@dataclass(frozen=True)
class Office:
    name: str
    ext_first: int
    ext_last: int
    wan_kbps: int
    dir_version: int
    public_ip: str | None
    public_port: int | None
    nat_type: str | None
    lan: list[dict[str, Any]]
    stun_ip: str | None
    stun_port: int | None
    last_seen: float | None
    last_login: float | None
    phones: int


def ha1(algorithm: str, user: str, realm: str, password: str) -> str:
    """RFC 7616 §3.4.2: H(username ":" realm ":" password)."""
    data = f"{user}:{realm}:{password}".encode()
    if algorithm == "MD5":
        return hashlib.md5(data, usedforsecurity=False).hexdigest()
    return hashlib.sha256(data).hexdigest()


def parse_range(text: str) -> tuple[int, int]:
    # [0-9], not \d: \d also matches other scripts' digits (fullwidth ones), which no phone dials.
    match = re.fullmatch(r"\s*([0-9]{2,15})\s*-\s*([0-9]{2,15})\s*", text)
    if not match:
        raise StoreError(f"extension range {text!r} must look like 2000-2099")
    if match.group(1).startswith("0"):
        # Ranges are stored as numbers: a leading zero would be lost and no extension would fit.
        raise StoreError(f"extension range {text!r} cannot start with 0")
    first, last = int(match.group(1)), int(match.group(2))
    if len(match.group(1)) != len(match.group(2)) or first > last:
        raise StoreError(
            f"extension range {text!r}: both ends need the same number of digits, low to high"
        )
    return first, last


class MainStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:  # unwritable directory, not a database, ...
            raise StoreError(f"cannot open the database {path}: {exc}") from None
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path} was written by a newer branchpbx (schema {version}); upgrade first"
                )
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:  # COMMIT itself failed
                    self._db.execute("ROLLBACK")
                if exc.sqlite_errorcode & 0xFF not in _NOT_OUR_BUG:
                    raise
                raise StoreError(f"cannot write to the database {self.path}: {exc}") from None

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def data_version(self) -> int:
        """Changes when another connection (the CLI) commits: cheap to poll."""
        with self._lock:
            value: int = self._db.execute("PRAGMA data_version").fetchone()[0]
            return value

    # --- offices ---

    def add_office(self, name: str, ext_range: str, wan_kbps: int) -> bytes:
        if not OFFICE_NAME.match(name):
            raise StoreError(
                f"office name {name!r}: use letters, digits, '.', '_' or '-' (at most 63)"
            )
        if wan_kbps <= 0:
            raise StoreError(f"--wan-kbps must be a positive number of kbit/s, not {wan_kbps}")
        first, last = parse_range(ext_range)
        secret = secrets.token_bytes(32)
        with self._write() as db:
            if db.execute("SELECT 1 FROM offices WHERE name=?", (name,)).fetchone():
                raise StoreError(f"office {name!r} exists already")
            clash = db.execute(
                "SELECT name, ext_first, ext_last FROM offices"
                " WHERE NOT (ext_last < ? OR ext_first > ?)",
                (first, last),
            ).fetchone()
            if clash:
                raise StoreError(
                    f"extensions {first}-{last} overlap office {clash['name']!r}"
                    f" ({clash['ext_first']}-{clash['ext_last']}): extensions are company-wide"
                )
            db.execute(
                "INSERT INTO offices(name, ext_first, ext_last, wan_kbps, secret, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (name, first, last, wan_kbps, secret, time.time()),
            )
            self._log(db, name, "created", f"extensions {first}-{last}, {wan_kbps} kbit/s")
        return secret

    def set_wan_kbps(self, name: str, wan_kbps: int) -> None:
        if wan_kbps <= 0:
            raise StoreError(f"--wan-kbps must be a positive number of kbit/s, not {wan_kbps}")
        with self._write() as db:
            cursor = db.execute("UPDATE offices SET wan_kbps=? WHERE name=?", (wan_kbps, name))
            if cursor.rowcount == 0:
                raise StoreError(f"no office named {name!r}")
            self._log(db, name, "budget", f"WAN voice budget set to {wan_kbps} kbit/s")

    def office_secret(self, name: str) -> bytes | None:
        rows = self._read("SELECT secret FROM offices WHERE name=?", (name,))
        return bytes(rows[0]["secret"]) if rows else None

    def offices(self) -> list[Office]:
        rows = self._read(
            "SELECT o.*, (SELECT COUNT(*) FROM phones p WHERE p.office=o.name) AS phones"
            " FROM offices o ORDER BY name"
        )
        return [
            Office(
                name=r["name"],
                ext_first=r["ext_first"],
                ext_last=r["ext_last"],
                wan_kbps=r["wan_kbps"],
                dir_version=r["dir_version"],
                public_ip=r["public_ip"],
                public_port=r["public_port"],
                nat_type=r["nat_type"],
                lan=json.loads(r["lan"]) if r["lan"] else [],
                stun_ip=r["stun_ip"],
                stun_port=r["stun_port"],
                last_seen=r["last_seen"],
                last_login=r["last_login"],
                phones=r["phones"],
            )
            for r in rows
        ]

    def record_login(self, name: str, public_ip: str, public_port: int, at: float) -> str | None:
        """Note a login; return the previous public IP if it changed."""
        with self._write() as db:
            row = db.execute("SELECT public_ip FROM offices WHERE name=?", (name,)).fetchone()
            previous = row["public_ip"] if row else None
            db.execute(
                "UPDATE offices SET public_ip=?, public_port=?, last_login=?, last_seen=?"
                " WHERE name=?",
                (public_ip, public_port, at, at, name),
            )
            changed = previous is not None and previous != public_ip
            detail = f"from {public_ip}:{public_port}"
            if changed:
                detail += f" (public address changed from {previous})"
            self._log(db, name, "login", detail)
        return previous if changed else None

    def record_report(
        self,
        name: str,
        nat_type: str,
        lan: list[dict[str, Any]],
        stun_ip: str | None,
        stun_port: int | None,
    ) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE offices SET nat_type=?, lan=?, stun_ip=?, stun_port=? WHERE name=?",
                (nat_type, json.dumps(lan), stun_ip, stun_port, name),
            )

    def record_seen(self, name: str, at: float, *, logout: str | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE offices SET last_seen=? WHERE name=?", (at, name))
            if logout is not None:
                self._log(db, name, "offline", logout)

    def log_event(self, name: str, kind: str, detail: str) -> None:
        with self._write() as db:
            self._log(db, name, kind, detail)

    def office_log(self, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        if name is None:
            rows = self._read("SELECT * FROM office_log ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._read(
                "SELECT * FROM office_log WHERE office=? ORDER BY id DESC LIMIT ?", (name, limit)
            )
        return [dict(r) for r in rows]

    @staticmethod
    def _log(db: sqlite3.Connection, office: str, kind: str, detail: str) -> None:
        db.execute(
            "INSERT INTO office_log(at, office, kind, detail) VALUES (?, ?, ?, ?)",
            (time.time(), office, kind, detail),
        )

    # --- phones and the directory ---

    def add_phone(self, ext: str, password: str, realm: str, name: str = "") -> str:
        """Add a phone to the office whose range holds `ext`; return the office's name."""
        # [0-9], not str.isdigit(): that also takes "²", which int() then refuses.
        if not re.fullmatch(r"[0-9]{1,15}", ext):
            raise StoreError(f"extension {ext!r} must be digits only")
        if len(password) < 8:
            raise StoreError("a phone password needs at least 8 characters")
        with self._write() as db:
            office = db.execute(
                "SELECT name, ext_first, ext_last FROM offices WHERE ? BETWEEN ext_first AND"
                " ext_last AND length(CAST(ext_first AS TEXT)) = ?",
                (int(ext), len(ext)),
            ).fetchone()
            if office is None:
                raise StoreError(f"no office's extension range holds {ext} (see `mainhost status`)")
            if db.execute("SELECT 1 FROM phones WHERE ext=?", (ext,)).fetchone():
                raise StoreError(f"extension {ext} exists already")
            db.execute(
                "INSERT INTO phones(ext, office, name, ha1_md5, ha1_sha256, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    ext,
                    office["name"],
                    name,
                    ha1("MD5", ext, realm, password),
                    ha1("SHA-256", ext, realm, password),
                    time.time(),
                ),
            )
            self._journal(db, office["name"], "put", ext)
        return str(office["name"])

    def remove_phone(self, ext: str) -> str:
        with self._write() as db:
            row = db.execute("SELECT office FROM phones WHERE ext=?", (ext,)).fetchone()
            if row is None:
                raise StoreError(f"no phone with extension {ext}")
            db.execute("DELETE FROM phones WHERE ext=?", (ext,))
            self._journal(db, row["office"], "delete", ext)
        return str(row["office"])

    def phones(self, office: str | None = None) -> list[dict[str, Any]]:
        if office is None:
            rows = self._read("SELECT ext, office, name FROM phones ORDER BY ext")
        else:
            rows = self._read(
                "SELECT ext, office, name FROM phones WHERE office=? ORDER BY ext", (office,)
            )
        return [dict(r) for r in rows]

    @staticmethod
    def _journal(db: sqlite3.Connection, office: str, op: str, ext: str) -> None:
        db.execute("UPDATE offices SET dir_version = dir_version + 1 WHERE name=?", (office,))
        version = db.execute("SELECT dir_version FROM offices WHERE name=?", (office,)).fetchone()[
            0
        ]
        db.execute(
            "INSERT INTO dir_changes(office, version, op, ext) VALUES (?, ?, ?, ?)",
            (office, version, op, ext),
        )

    def directory_version(self, office: str) -> int:
        rows = self._read("SELECT dir_version FROM offices WHERE name=?", (office,))
        return int(rows[0]["dir_version"]) if rows else 0

    def directory_snapshot(self, office: str, realm: str) -> DirectorySnapshot:
        with self._lock:
            # One read transaction, so the version and the entries agree.
            self._db.execute("BEGIN")
            try:
                row = self._db.execute(
                    "SELECT dir_version, ext_first, ext_last FROM offices WHERE name=?", (office,)
                ).fetchone()
                rows = self._db.execute(
                    "SELECT ext, name, ha1_md5, ha1_sha256 FROM phones WHERE office=? ORDER BY ext",
                    (office,),
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        entries = [DirectoryEntry(r["ext"], r["ha1_md5"], r["ha1_sha256"], r["name"]) for r in rows]
        return DirectorySnapshot(
            office, realm, row["dir_version"], row["ext_first"], row["ext_last"], entries
        )

    def directory_delta(self, office: str, base_version: int) -> DirectoryDelta | None:
        """The changes after `base_version`, or None if the journal cannot say (send a snapshot)."""
        with self._lock:
            # One read transaction, so the version, the journal and the entries agree (the CLI
            # may commit a change between two statements otherwise).
            self._db.execute("BEGIN")
            try:
                current = self._db.execute(
                    "SELECT dir_version FROM offices WHERE name=?", (office,)
                ).fetchone()
                changes = self._db.execute(
                    "SELECT version, op, ext FROM dir_changes WHERE office=? AND version > ?"
                    " ORDER BY version",
                    (office, base_version),
                ).fetchall()
                last_op: dict[str, str] = {}
                for change in changes:
                    last_op[change["ext"]] = change["op"]
                puts = [ext for ext, op in last_op.items() if op == "put"]
                rows = self._db.execute(
                    "SELECT ext, name, ha1_md5, ha1_sha256 FROM phones WHERE office=?"
                    f" AND ext IN ({','.join('?' * len(puts))}) ORDER BY ext",
                    (office, *puts),
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        if current is None or base_version > current[0]:
            return None
        version = current[0]
        if len(changes) != version - base_version:
            return None  # journal gap (pruned or foreign edit): a snapshot is the safe answer
        entries = [DirectoryEntry(r["ext"], r["ha1_md5"], r["ha1_sha256"], r["name"]) for r in rows]
        deletes = sorted(ext for ext, op in last_op.items() if op == "delete")
        return DirectoryDelta(base_version, version, entries, deletes)

    # --- announcements (F8; policy and validation in announce.py) ---

    def add_announcement(self, row: dict[str, Any]) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO announcements(id, text, created, expires_at, office, extensions,"
                " sender) VALUES (:id, :text, :created, :expires_at, :office, :extensions,"
                " :sender)",
                row,
            )

    def announcement_rows(self, active_at: float | None = None) -> list[dict[str, Any]]:
        """Every announcement (or those not expired at `active_at`), oldest first."""
        if active_at is None:
            rows = self._read("SELECT * FROM announcements ORDER BY created, id")
        else:
            rows = self._read(
                "SELECT * FROM announcements WHERE expires_at > ? ORDER BY created, id",
                (active_at,),
            )
        return [dict(r) for r in rows]

    def announcement_reports(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._read("SELECT * FROM announcement_reports")]

    def record_announcement_report(self, row: dict[str, Any]) -> bool:
        """Store an office's latest (cumulative) report; False if the announcement is unknown."""
        with self._write() as db:
            if not db.execute("SELECT 1 FROM announcements WHERE id=?", (row["id"],)).fetchone():
                return False
            db.execute(
                "INSERT OR REPLACE INTO announcement_reports(id, office, delivered, failed,"
                " pending, at) VALUES (:id, :office, :delivered, :failed, :pending, :at)",
                row,
            )
        return True
