"""The main host's sqlite store: offices, phones, the directory journal, snapshots and deltas."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mainhost.store import DB_NAME, MainStore, StoreError, ha1, parse_range
from shared.wire.messages import DirectoryDelta, DirectoryEntry

REALM = "branchpbx"
PASSWORD = "correct-horse-battery"


@pytest.fixture
def store(tmp_path: Path):
    s = MainStore(tmp_path / DB_NAME)
    yield s
    s.close()


def two_offices(store: MainStore) -> None:
    store.add_office("lyon", "2000-2099", 1000)
    store.add_office("paris", "2100-2199", 2000)


# --- ranges and offices ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2000-2099", (2000, 2099)), (" 20 - 29 ", (20, 29)), ("500-500", (500, 500))],
)
def test_parse_range(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2000",
        "2099-2000",
        "200-2099",
        "a-b",
        "2-9",
        "",
        "0100-0199",
        "\uff12\uff10\uff10\uff10-\uff12\uff10\uff19\uff19",
        "20-29-39",
    ],
)
def test_parse_range_refuses(text):
    with pytest.raises(StoreError):
        parse_range(text)


def test_add_office_returns_a_fresh_secret(store):
    secret_a = store.add_office("lyon", "2000-2099", 1000)
    secret_b = store.add_office("paris", "2100-2199", 1000)
    assert len(secret_a) == 32 and secret_a != secret_b
    assert store.office_secret("lyon") == secret_a
    assert store.office_secret("nowhere") is None


def test_offices_listed_with_their_state(store):
    two_offices(store)
    offices = store.offices()
    assert [o.name for o in offices] == ["lyon", "paris"]
    lyon = offices[0]
    assert (lyon.ext_first, lyon.ext_last, lyon.wan_kbps) == (2000, 2099, 1000)
    assert lyon.phones == 0 and lyon.dir_version == 0
    assert lyon.public_ip is None and lyon.last_seen is None and lyon.lan == []


@pytest.mark.parametrize(
    "ext_range",
    ["2000-2099", "2050-2060", "1900-2000", "2099-2150", "1000-9999", "2150-2150"],
)
def test_overlapping_ranges_refused(store, ext_range):
    two_offices(store)
    with pytest.raises(StoreError, match="overlap"):
        store.add_office("nice", ext_range, 100)
    assert [o.name for o in store.offices()] == ["lyon", "paris"]


def test_adjacent_range_accepted(store):
    two_offices(store)
    store.add_office("nice", "2200-2299", 100)
    store.add_office("lille", "1900-1999", 100)
    assert len(store.offices()) == 4


@pytest.mark.parametrize(
    ("name", "ext_range", "kbps", "message"),
    [
        ("lyon", "3000-3099", 100, "exists already"),
        ("bad name", "3000-3099", 100, "office name"),
        ("", "3000-3099", 100, "office name"),
        ("-x", "3000-3099", 100, "office name"),
        ("x" * 64, "3000-3099", 100, "office name"),
        ("nice", "3000-3099", 0, "wan-kbps"),
        ("nice", "3099-3000", 100, "low to high"),
    ],
)
def test_add_office_mistakes(store, name, ext_range, kbps, message):
    store.add_office("lyon", "2000-2099", 1000)
    with pytest.raises(StoreError, match=message):
        store.add_office(name, ext_range, kbps)
    assert len(store.offices()) == 1


# --- phones ---


def test_phone_add_finds_the_office_by_range(store):
    two_offices(store)
    assert store.add_phone("2150", PASSWORD, REALM, "Anne") == "paris"
    assert store.add_phone("2000", PASSWORD, REALM) == "lyon"
    assert store.add_phone("2099", PASSWORD, REALM) == "lyon"
    assert store.phones() == [
        {"ext": "2000", "office": "lyon", "name": ""},
        {"ext": "2099", "office": "lyon", "name": ""},
        {"ext": "2150", "office": "paris", "name": "Anne"},
    ]
    assert [p["ext"] for p in store.phones("paris")] == ["2150"]
    assert {o.name: o.phones for o in store.offices()} == {"lyon": 2, "paris": 1}


@pytest.mark.parametrize(
    ("ext", "password", "message"),
    [
        ("3000", PASSWORD, "no office"),
        ("1999", PASSWORD, "no office"),
        ("200", PASSWORD, "no office"),  # 3 digits: not in a 4-digit range
        ("02000", PASSWORD, "no office"),  # 5 digits with a leading zero
        ("2001", "short", "8 characters"),
        ("20a1", PASSWORD, "digits"),
        ("", PASSWORD, "digits"),
        ("²", PASSWORD, "digits"),
        ("\uff12\uff10\uff10\uff11", PASSWORD, "digits"),
        (" 2001", PASSWORD, "digits"),
    ],
)
def test_phone_add_refused(store, ext, password, message):
    two_offices(store)
    with pytest.raises(StoreError, match=message):
        store.add_phone(ext, password, REALM)
    assert store.phones() == []
    assert store.directory_version("lyon") == 0


def test_duplicate_phone_refused(store):
    two_offices(store)
    store.add_phone("2001", PASSWORD, REALM)
    with pytest.raises(StoreError, match="exists already"):
        store.add_phone("2001", "another-password", REALM)
    assert store.directory_version("lyon") == 1


def test_ha1_is_stored_and_the_password_is_not(tmp_path):
    store = MainStore(tmp_path / DB_NAME)
    store.add_office("lyon", "2000-2099", 1000)
    password = "Unique-Secret-Pass-7319"
    store.add_phone("2001", password, REALM, "Anne")
    snapshot = store.directory_snapshot("lyon", REALM)
    (entry,) = snapshot.entries
    assert entry.ha1_md5 == ha1("MD5", "2001", REALM, password)
    assert entry.ha1_sha256 == ha1("SHA-256", "2001", REALM, password)
    assert len(entry.ha1_md5) == 32 and len(entry.ha1_sha256) == 64
    store.close()
    # Nothing on disk holds the password: not the database, not its WAL.
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        assert password.encode() not in data, path
        assert password.encode("utf-16-le") not in data, path


def test_ha1_matches_rfc_7616_definition():
    # RFC 7616 §3.4.2: A1 = username ":" realm ":" passwd, hashed.
    import hashlib

    assert ha1("MD5", "bob", "r", "pw") == hashlib.md5(b"bob:r:pw").hexdigest()
    assert ha1("SHA-256", "bob", "r", "pw") == hashlib.sha256(b"bob:r:pw").hexdigest()


def test_remove_phone(store):
    two_offices(store)
    store.add_phone("2001", PASSWORD, REALM)
    assert store.remove_phone("2001") == "lyon"
    assert store.phones() == []
    assert store.directory_version("lyon") == 2
    with pytest.raises(StoreError, match="no phone"):
        store.remove_phone("2001")
    assert store.directory_version("lyon") == 2


# --- versions and the journal ---


def test_directory_version_counts_changes_per_office(store):
    two_offices(store)
    store.add_phone("2001", PASSWORD, REALM)
    store.add_phone("2002", PASSWORD, REALM)
    store.add_phone("2101", PASSWORD, REALM)
    store.remove_phone("2001")
    assert store.directory_version("lyon") == 3
    assert store.directory_version("paris") == 1
    assert store.directory_version("unknown") == 0
    rows = sqlite3.connect(store.path).execute(
        "SELECT office, version, op, ext FROM dir_changes ORDER BY office, version"
    )
    assert list(rows) == [
        ("lyon", 1, "put", "2001"),
        ("lyon", 2, "put", "2002"),
        ("lyon", 3, "delete", "2001"),
        ("paris", 1, "put", "2101"),
    ]


def test_snapshot_is_consistent(store):
    two_offices(store)
    store.add_phone("2002", PASSWORD, REALM, "Bea")
    store.add_phone("2001", PASSWORD, REALM, "Anne")
    store.add_phone("2101", PASSWORD, REALM)
    snapshot = store.directory_snapshot("lyon", REALM)
    assert snapshot.office == "lyon" and snapshot.realm == REALM
    assert snapshot.version == store.directory_version("lyon") == 2
    assert (snapshot.ext_first, snapshot.ext_last) == (2000, 2099)
    assert [(e.ext, e.name) for e in snapshot.entries] == [("2001", "Anne"), ("2002", "Bea")]


def test_snapshot_of_empty_office(store):
    two_offices(store)
    snapshot = store.directory_snapshot("paris", REALM)
    assert snapshot.version == 0 and snapshot.entries == []


def test_delta_from_each_base(store):
    two_offices(store)
    store.add_phone("2001", PASSWORD, REALM)  # v1
    store.add_phone("2002", PASSWORD, REALM)  # v2
    store.remove_phone("2001")  # v3
    store.add_phone("2003", PASSWORD, REALM)  # v4
    d0 = store.directory_delta("lyon", 0)
    assert d0 is not None
    assert (d0.base_version, d0.version) == (0, 4)
    assert sorted(e.ext for e in d0.put) == ["2002", "2003"]
    assert d0.delete == ["2001"]
    d2 = store.directory_delta("lyon", 2)
    assert d2 is not None
    assert [e.ext for e in d2.put] == ["2003"] and d2.delete == ["2001"]
    d3 = store.directory_delta("lyon", 3)
    assert d3 is not None
    assert [e.ext for e in d3.put] == ["2003"] and d3.delete == []
    d4 = store.directory_delta("lyon", 4)
    assert d4 == DirectoryDelta(4, 4, [], [])


def test_delta_put_then_delete_is_a_delete(store):
    two_offices(store)
    store.add_phone("2001", PASSWORD, REALM)
    store.remove_phone("2001")
    delta = store.directory_delta("lyon", 0)
    assert delta is not None
    assert delta.put == [] and delta.delete == ["2001"]


def test_delta_delete_then_put_is_a_put(store):
    two_offices(store)
    store.add_phone("2001", PASSWORD, REALM)
    store.remove_phone("2001")
    store.add_phone("2001", "a-new-password", REALM)
    delta = store.directory_delta("lyon", 1)
    assert delta is not None
    assert [e.ha1_md5 for e in delta.put] == [ha1("MD5", "2001", REALM, "a-new-password")]
    assert delta.delete == []


def test_delta_is_none_on_a_gap_or_a_future_base(store):
    two_offices(store)
    for ext in ("2001", "2002", "2003"):
        store.add_phone(ext, PASSWORD, REALM)
    assert store.directory_delta("lyon", 4) is None  # the remote is ahead: it needs a snapshot
    assert store.directory_delta("nowhere", 0) is None
    db = sqlite3.connect(store.path)
    db.execute("DELETE FROM dir_changes WHERE office='lyon' AND version=2")  # pruned journal
    db.commit()
    db.close()
    assert store.directory_delta("lyon", 0) is None
    assert store.directory_delta("lyon", 1) is None
    assert store.directory_delta("lyon", 2) is not None  # the gap is behind this base


def test_data_version_changes_when_another_connection_writes(tmp_path):
    server = MainStore(tmp_path / DB_NAME)
    cli = MainStore(tmp_path / DB_NAME)
    before = server.data_version()
    cli.add_office("lyon", "2000-2099", 1000)
    assert server.data_version() != before
    assert [o.name for o in server.offices()] == ["lyon"]
    server.close()
    cli.close()


def test_the_database_survives_reopening(tmp_path):
    store = MainStore(tmp_path / DB_NAME)
    secret = store.add_office("lyon", "2000-2099", 1000)
    store.add_phone("2001", PASSWORD, REALM, "Anne")
    store.record_login("lyon", "203.0.113.5", 40000, 1234.0)
    store.record_report(
        "lyon", "full-cone", [{"name": "eth0", "addresses": ["192.0.2.9"]}], "203.0.113.5", 9
    )
    before = store.directory_snapshot("lyon", REALM)
    store.close()
    again = MainStore(tmp_path / DB_NAME)
    assert again.office_secret("lyon") == secret
    assert again.directory_snapshot("lyon", REALM) == before
    (office,) = again.offices()
    assert office.public_ip == "203.0.113.5" and office.public_port == 40000
    assert office.nat_type == "full-cone" and office.lan[0]["addresses"] == ["192.0.2.9"]
    assert office.last_login == 1234.0
    again.close()


def test_newer_schema_refused(tmp_path):
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        MainStore(tmp_path / DB_NAME)


def test_record_login_reports_an_address_change_and_logs(store):
    two_offices(store)
    assert store.record_login("lyon", "203.0.113.5", 1, 10.0) is None
    assert store.record_login("lyon", "203.0.113.5", 2, 11.0) is None
    assert store.record_login("lyon", "198.51.100.9", 3, 12.0) == "203.0.113.5"
    log = store.office_log("lyon")
    assert [e["kind"] for e in log][:4] == ["login", "login", "login", "created"]
    assert "changed from 203.0.113.5" in log[0]["detail"]
    store.record_seen("lyon", 20.0, logout="connection lost")
    assert store.office_log("lyon", limit=1)[0]["kind"] == "offline"
    assert store.offices()[0].last_seen == 20.0
    assert {e["office"] for e in store.office_log()} == {"lyon", "paris"}


# --- property: any delta brings any base version to the current directory ---


def apply(directory: dict[str, DirectoryEntry], delta: DirectoryDelta) -> dict[str, DirectoryEntry]:
    result = dict(directory)
    for entry in delta.put:
        result[entry.ext] = entry
    for ext in delta.delete:
        result.pop(ext, None)
    return result


operations = st.lists(
    st.tuples(
        st.booleans(), st.integers(2000, 2007), st.sampled_from(["pw-aaaaaaaa", "pw-bbbbbbbb"])
    ),
    max_size=25,
)


@given(ops=operations)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_delta_from_any_base_reaches_the_snapshot(tmp_path_factory, ops):
    store = MainStore(tmp_path_factory.mktemp("db") / DB_NAME)
    try:
        store.add_office("lyon", "2000-2099", 1000)
        store.add_office("paris", "2100-2199", 1000)
        history = [store.directory_snapshot("lyon", REALM)]
        for add, ext, password in ops:
            try:
                if add:
                    store.add_phone(str(ext), password, REALM)
                else:
                    store.remove_phone(str(ext))
            except StoreError:
                continue  # refused changes do not move the version
            history.append(store.directory_snapshot("lyon", REALM))
            store.add_phone(str(2100 + len(history)), PASSWORD, REALM)  # noise in another office
        current = history[-1]
        assert [s.version for s in history] == list(range(len(history)))
        for base in history:
            delta = store.directory_delta("lyon", base.version)
            assert delta is not None
            assert (delta.base_version, delta.version) == (base.version, current.version)
            assert not {e.ext for e in delta.put} & set(delta.delete)
            reached = apply({e.ext: e for e in base.entries}, delta)
            assert reached == {e.ext: e for e in current.entries}
    finally:
        store.close()


# --- a database the operator broke: a clear StoreError, never a sqlite traceback ---


def test_not_a_database_is_a_store_error(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match=re.escape(str(tmp_path / DB_NAME))):
        MainStore(tmp_path / DB_NAME)


def test_missing_directory_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open"):
        MainStore(tmp_path / "nowhere" / DB_NAME)


def test_read_only_database_is_a_store_error(tmp_path):
    from tests.hosthelpers import read_only

    store = MainStore(tmp_path / DB_NAME)
    store.close()
    with (
        read_only(tmp_path / DB_NAME, tmp_path),
        pytest.raises(StoreError, match=r"cannot (write to|open) the database"),
    ):
        again = MainStore(tmp_path / DB_NAME)
        again.add_office("lyon", "2000-2099", 100)


# --- consistency while the CLI writes from another connection ---


def test_snapshots_and_deltas_are_consistent_during_concurrent_writes(tmp_path):
    """The CLI adds and removes a phone again and again while the server reads.

    After an odd number of changes exactly the newest phone exists, after an even number none;
    every snapshot and every delta must describe one such state, never a mix of two.
    """
    import threading

    server = MainStore(tmp_path / DB_NAME)
    server.add_office("lyon", "20000-29999", 100)
    stop = threading.Event()
    errors: list[BaseException] = []

    def cli() -> None:
        writer = MainStore(tmp_path / DB_NAME)
        try:
            n = 0
            while not stop.is_set() and n < 2000:
                writer.add_phone(str(20000 + n), PASSWORD, REALM)
                writer.remove_phone(str(20000 + n))
                n += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            writer.close()

    def newest(version: int) -> str:
        return str(20000 + (version - 1) // 2)

    thread = threading.Thread(target=cli)
    thread.start()
    try:
        for _ in range(2000):
            snapshot = server.directory_snapshot("lyon", REALM)
            if snapshot.version % 2:
                assert [e.ext for e in snapshot.entries] == [newest(snapshot.version)]
            else:
                assert snapshot.entries == []
            delta = server.directory_delta("lyon", 0)
            assert delta is not None
            if delta.version % 2:
                assert [e.ext for e in delta.put] == [newest(delta.version)], delta
                assert newest(delta.version) not in delta.delete
            else:
                assert delta.put == []
            assert len(delta.delete) == delta.version // 2
    finally:
        stop.set()
        thread.join()
        server.close()
    assert not errors
