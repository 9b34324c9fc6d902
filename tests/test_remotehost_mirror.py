"""The remote host's directory mirror: snapshots replace, deltas apply only on their base, disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remotehost.mirror import DB_NAME, DirectoryMirror
from shared.wire.messages import DirectoryDelta, DirectoryEntry, DirectorySnapshot


def entry(ext: str, tag: str = "a") -> DirectoryEntry:
    return DirectoryEntry(ext, f"md5-{ext}-{tag}", f"sha-{ext}-{tag}", f"Name {ext}")


def snapshot(version: int, *exts: str, office: str = "lyon") -> DirectorySnapshot:
    return DirectorySnapshot(office, "branchpbx", version, 2000, 2099, [entry(x) for x in exts])


@pytest.fixture
def mirror(tmp_path: Path):
    m = DirectoryMirror(tmp_path / DB_NAME)
    yield m
    m.close()


def test_empty_mirror(mirror):
    info = mirror.info()
    assert (info.version, info.entries, info.realm, info.office) == (0, 0, "", "")
    assert mirror.entries() == [] and mirror.lookup("2001") is None
    assert mirror.lookup_ha1("2001", "MD5") is None


def test_snapshot_replaces_everything(mirror):
    mirror.apply_snapshot(snapshot(3, "2001", "2002"))
    mirror.apply_snapshot(snapshot(5, "2003"))
    info = mirror.info()
    assert (info.version, info.entries, info.office, info.realm) == (5, 1, "lyon", "branchpbx")
    assert (info.ext_first, info.ext_last) == (2000, 2099)
    assert [e.ext for e in mirror.entries()] == ["2003"]
    assert mirror.lookup("2001") is None
    assert mirror.lookup("2003") == entry("2003")


def test_lookup_ha1_by_algorithm(mirror):
    mirror.apply_snapshot(snapshot(1, "2001"))
    assert mirror.lookup_ha1("2001", "MD5") == "md5-2001-a"
    assert mirror.lookup_ha1("2001", "SHA-256") == "sha-2001-a"


def test_delta_applies_on_its_base(mirror):
    mirror.apply_snapshot(snapshot(3, "2001", "2002"))
    assert mirror.apply_delta(DirectoryDelta(3, 5, [entry("2003"), entry("2001", "new")], ["2002"]))
    assert mirror.info().version == 5
    assert mirror.entries() == [entry("2001", "new"), entry("2003")]
    assert mirror.lookup_ha1("2001", "MD5") == "md5-2001-new"


@pytest.mark.parametrize("base", [0, 2, 4, 99])
def test_delta_on_another_base_changes_nothing(mirror, base):
    mirror.apply_snapshot(snapshot(3, "2001", "2002"))
    assert not mirror.apply_delta(DirectoryDelta(base, base + 1, [entry("2009")], ["2001"]))
    assert mirror.info().version == 3
    assert [e.ext for e in mirror.entries()] == ["2001", "2002"]


def test_delta_on_a_fresh_mirror_keeps_its_version(mirror):
    assert mirror.apply_delta(DirectoryDelta(0, 2, [entry("2001")], []))
    assert mirror.info().version == 2


def test_delete_of_an_unknown_ext_is_harmless(mirror):
    mirror.apply_snapshot(snapshot(1, "2001"))
    assert mirror.apply_delta(DirectoryDelta(1, 2, [], ["2999"]))
    assert [e.ext for e in mirror.entries()] == ["2001"]


def test_meta_values(mirror):
    assert mirror.get_meta("public_ip") == ""
    assert mirror.get_meta("public_ip", "none") == "none"
    mirror.set_meta("public_ip", "203.0.113.1")
    mirror.set_meta("public_ip", "203.0.113.2")
    assert mirror.get_meta("public_ip") == "203.0.113.2"


def test_survives_reopening(tmp_path):
    first = DirectoryMirror(tmp_path / DB_NAME)
    first.apply_snapshot(snapshot(4, "2001", "2002"))
    first.apply_delta(DirectoryDelta(4, 5, [entry("2003")], ["2001"]))
    first.set_meta("public_ip", "203.0.113.7")
    first.close()
    again = DirectoryMirror(tmp_path / DB_NAME)
    assert again.info().version == 5
    assert [e.ext for e in again.entries()] == ["2002", "2003"]
    assert again.lookup_ha1("2003", "SHA-256") == "sha-2003-a"  # the cache is loaded from disk
    assert again.get_meta("public_ip") == "203.0.113.7"
    again.close()


def test_failed_snapshot_leaves_the_old_directory(mirror):
    mirror.apply_snapshot(snapshot(2, "2001"))
    broken = DirectorySnapshot("lyon", "r", 3, 2000, 2099, [entry("2002"), entry("2002")])
    with pytest.raises(Exception, match="UNIQUE"):
        mirror.apply_snapshot(broken)  # duplicate ext: sqlite refuses, the transaction rolls back
    assert mirror.info().version == 2
    assert [e.ext for e in mirror.entries()] == ["2001"]


# --- property: the mirror, on disk and in memory, follows a model ---

exts = st.sampled_from([str(n) for n in range(2000, 2008)])
tags = st.sampled_from(["a", "b", "c"])


@st.composite
def changes(draw: st.DrawFn) -> list[tuple[str, tuple[list[tuple[str, str]], list[str]]]]:
    out: list[tuple[str, tuple[list[tuple[str, str]], list[str]]]] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["snapshot", "delta", "stale-delta"]))
        put = draw(st.lists(st.tuples(exts, tags), max_size=4))
        delete = draw(st.lists(exts, max_size=3))
        out.append((kind, (put, delete)))
    return out


@given(steps=changes())
@settings(max_examples=60, deadline=None)
def test_mirror_follows_a_model(tmp_path_factory, steps):
    path = tmp_path_factory.mktemp("mirror") / DB_NAME
    mirror = DirectoryMirror(path)
    model: dict[str, DirectoryEntry] = {}
    version = 0
    try:
        for kind, (put, delete) in steps:
            entries = [entry(x, t) for x, t in put]
            if kind == "snapshot":
                version += 1
                unique = {e.ext: e for e in entries}
                mirror.apply_snapshot(
                    DirectorySnapshot("o", "r", version, 2000, 2099, list(unique.values()))
                )
                model = unique
            elif kind == "delta":
                delete = [x for x in delete if x not in {e.ext for e in entries}]
                assert mirror.apply_delta(DirectoryDelta(version, version + 1, entries, delete))
                version += 1
                model.update((e.ext, e) for e in entries)
                for x in delete:
                    model.pop(x, None)
            else:
                assert not mirror.apply_delta(DirectoryDelta(version + 1, version + 2, entries, []))
            assert mirror.info().version == version
            assert mirror.entries() == sorted(model.values(), key=lambda e: e.ext)
            for x in {e.ext for e in entries} | set(model):
                assert mirror.lookup(x) == model.get(x)
    finally:
        mirror.close()
    reopened = DirectoryMirror(path)
    try:
        assert reopened.info().version == version
        assert reopened.entries() == sorted(model.values(), key=lambda e: e.ext)
    finally:
        reopened.close()


def test_a_damaged_mirror_file_is_a_clear_error(tmp_path):
    from shared.cli import CliError

    (tmp_path / DB_NAME).write_bytes(b"garbage " * 100)
    with pytest.raises(CliError, match="directory mirror") as info:
        DirectoryMirror(tmp_path / DB_NAME)
    assert str(tmp_path / DB_NAME) in str(info.value)
