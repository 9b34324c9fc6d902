"""The location table (remotehost/location.py): bindings in memory with change listeners, and
`SqliteLocationStore`, which keeps them on disk across restarts."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from remotehost.location import DB_NAME, Binding, Location, SqliteLocationStore

NOW = 1_700_000_000.0


def binding(
    ext: str = "201",
    contact: str = "sip:201@192.0.2.10:5062",
    expires_at: float = NOW + 3600,
    **fields: Any,
) -> Binding:
    values: dict[str, Any] = {
        "call_id": f"{ext}-call",
        "cseq": 1,
        "transport": "udp",
        "source_ip": "192.0.2.10",
        "source_port": 5062,
    }
    values.update(fields)
    return Binding(ext, contact, expires_at, **values)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Binding]]] = []

    def __call__(self, ext: str, bindings: list[Binding]) -> None:
        self.calls.append((ext, bindings))


@pytest.fixture
def location() -> Location:
    return Location()


@pytest.fixture
def recorder(location: Location) -> Recorder:
    recorder = Recorder()
    location.add_listener(recorder)
    return recorder


# -- Binding --------------------------------------------------------------------------------------


def test_binding_source_and_remaining():
    b = binding(transport="tcp", source_ip="192.0.2.7", source_port=40000, expires_at=NOW + 10.4)
    assert b.source == "tcp:192.0.2.7:40000"
    assert b.remaining(NOW) == 10
    assert b.remaining(NOW - 0.2) == 11  # rounded to the nearest second
    assert b.remaining(NOW + 60) == 0  # never negative


# -- Location -------------------------------------------------------------------------------------


def test_empty(location):
    assert location.get("201") == [] and location.find("201", "sip:x@y") is None
    assert location.extensions() == [] and location.all() == [] and len(location) == 0
    assert location.next_expiry() is None


def test_replace_sets_the_whole_set_and_tells_listeners(location, recorder):
    a, b = binding(contact="sip:a@x"), binding(contact="sip:b@x")
    location.replace("201", {a.contact: a, b.contact: b})
    assert recorder.calls == [("201", [a, b])]
    assert location.get("201") == [a, b]
    assert location.find("201", "sip:b@x") == b
    location.replace("201", {b.contact: b})
    assert recorder.calls[-1] == ("201", [b])
    assert location.get("201") == [b] and location.find("201", "sip:a@x") is None


def test_replace_with_nothing_removes_the_extension(location, recorder):
    location.replace("201", {"sip:a@x": binding(contact="sip:a@x")})
    location.replace("202", {"sip:c@x": binding("202", "sip:c@x")})
    location.replace("201", {})
    assert recorder.calls[-1] == ("201", [])
    assert location.extensions() == ["202"] and len(location) == 1


def test_every_listener_is_told(location):
    first, second = Recorder(), Recorder()
    location.add_listener(first)
    location.add_listener(second)
    location.replace("201", {"sip:a@x": binding(contact="sip:a@x")})
    assert first.calls == second.calls and len(first.calls) == 1


def test_load_fills_without_telling_listeners(location, recorder):
    loaded = [binding(contact="sip:a@x"), binding(contact="sip:b@x"), binding("202", "sip:c@x")]
    location.load(loaded)
    assert recorder.calls == []
    assert sorted(location.all(), key=lambda b: b.contact) == loaded
    assert location.extensions() == ["201", "202"] and len(location) == 3


def test_set_reachable_tells_listeners_only_on_a_change(location, recorder):
    a = binding(contact="sip:a@x")
    location.replace("201", {a.contact: a})
    recorder.calls.clear()
    location.set_reachable("201", "sip:a@x", True)  # already reachable
    location.set_reachable("201", "sip:nobody@x", False)  # no such contact
    location.set_reachable("299", "sip:a@x", False)  # no such extension
    assert recorder.calls == []
    assert location.extensions() == ["201"]  # nothing created for unknown ones
    location.set_reachable("201", "sip:a@x", False)
    assert recorder.calls == [("201", [replace(a, reachable=False)])]
    found = location.find("201", "sip:a@x")
    assert found is not None and found.reachable is False
    location.set_reachable("201", "sip:a@x", True)
    assert recorder.calls[-1] == ("201", [a])


def test_expire_removes_exactly_the_due_bindings(location, recorder):
    due = binding(contact="sip:due@x", expires_at=NOW)
    later = binding(contact="sip:later@x", expires_at=NOW + 0.001)
    other = binding("202", "sip:other@x", expires_at=NOW - 5)
    keep = binding("203", "sip:keep@x", expires_at=NOW + 100)
    location.replace("201", {due.contact: due, later.contact: later})
    location.replace("202", {other.contact: other})
    location.replace("203", {keep.contact: keep})
    recorder.calls.clear()
    gone = location.expire(NOW)
    assert sorted(gone, key=lambda b: b.contact) == [due, other]
    assert location.get("201") == [later] and location.get("202") == []
    assert location.extensions() == ["201", "203"]
    # One notification per extension that changed, with what it has left.
    assert sorted(recorder.calls, key=lambda c: c[0]) == [("201", [later]), ("202", [])]
    recorder.calls.clear()
    assert location.expire(NOW) == [] and recorder.calls == []
    assert location.next_expiry() == NOW + 0.001


def test_next_expiry_is_the_earliest(location):
    location.replace("201", {"sip:a@x": binding(contact="sip:a@x", expires_at=NOW + 50)})
    location.replace("202", {"sip:b@x": binding("202", "sip:b@x", expires_at=NOW + 20)})
    assert location.next_expiry() == NOW + 20


class LocationModel(RuleBasedStateMachine):
    """Random replace / set_reachable / expire against a dictionary; listeners always report
    the extension's current bindings."""

    def __init__(self) -> None:
        super().__init__()
        self.location = Location()
        self.model: dict[str, dict[str, Binding]] = {}
        self.heard: dict[str, list[Binding]] = {}
        self.location.add_listener(self.listen)

    def listen(self, ext: str, bindings: list[Binding]) -> None:
        assert bindings == self.location.get(ext)  # called after the change, never before
        self.heard[ext] = bindings

    @rule(
        ext=st.sampled_from(["201", "202", "203"]),
        contacts=st.dictionaries(
            st.sampled_from(["sip:a@x", "sip:b@x", "sip:c@x"]), st.integers(0, 100), max_size=3
        ),
    )
    def replace_bindings(self, ext, contacts):
        new = {c: binding(ext, c, NOW + t) for c, t in contacts.items()}
        self.location.replace(ext, new)
        assert self.heard[ext] == list(new.values())
        if new:
            self.model[ext] = dict(new)
        else:
            self.model.pop(ext, None)

    @rule(
        ext=st.sampled_from(["201", "202"]),
        contact=st.sampled_from(["sip:a@x", "sip:b@x"]),
        reachable=st.booleans(),
    )
    def set_reachable(self, ext, contact, reachable):
        before = dict(self.heard)
        self.location.set_reachable(ext, contact, reachable)
        current = self.model.get(ext, {}).get(contact)
        if current is not None and current.reachable != reachable:
            self.model[ext][contact] = replace(current, reachable=reachable)
            assert self.heard[ext] == list(self.model[ext].values())
        else:
            assert self.heard == before

    @rule(at=st.integers(0, 100))
    def expire(self, at):
        gone = self.location.expire(NOW + at)
        expected = [b for c in self.model.values() for b in c.values() if b.expires_at <= NOW + at]
        assert sorted(gone, key=repr) == sorted(expected, key=repr)
        for ext in list(self.model):
            self.model[ext] = {c: b for c, b in self.model[ext].items() if b.expires_at > NOW + at}
            if not self.model[ext]:
                del self.model[ext]
            assert self.heard[ext] == list(self.model.get(ext, {}).values())

    @invariant()
    def matches(self):
        assert self.location.extensions() == sorted(self.model)
        for ext in ("201", "202", "203"):
            assert self.location.get(ext) == list(self.model.get(ext, {}).values())
        assert len(self.location) == sum(len(c) for c in self.model.values())


TestLocationModel = LocationModel.TestCase
TestLocationModel.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


# -- SqliteLocationStore --------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteLocationStore(tmp_path / DB_NAME)
    yield s
    s.close()


def by_key(bindings: list[Binding]) -> list[Binding]:
    return sorted(bindings, key=lambda b: (b.ext, b.contact))


def test_empty_store_loads_nothing(store):
    assert store.load(NOW) == []


def test_save_load_round_trip_keeps_every_field(store):
    bindings = [
        binding(contact="sip:a@x", user_agent="Yealink SIP-T46U 108.86", q=0.5),
        binding(contact="sip:b@x;transport=tcp", transport="tcp", reachable=False, cseq=2**32 - 1),
        binding("202", "sip:202@[2001:db8::1]:5060", source_ip="2001:db8::1", user_agent="é ✓"),
    ]
    store.save({"201": bindings[:2], "202": bindings[2:]})
    assert by_key(store.load(NOW)) == by_key(bindings)


def test_save_replaces_an_extensions_bindings_only(store):
    store.save({"201": [binding(contact="sip:a@x")], "202": [binding("202", "sip:c@x")]})
    store.save({"201": [binding(contact="sip:b@x", cseq=7)]})
    assert by_key(store.load(NOW)) == [
        binding(contact="sip:b@x", cseq=7),
        binding("202", "sip:c@x"),
    ]
    store.save({"202": []})  # an extension that lost its last binding
    assert store.load(NOW) == [binding(contact="sip:b@x", cseq=7)]


def test_load_drops_expired_bindings_for_good(store):
    store.save(
        {
            "201": [binding(contact="sip:old@x", expires_at=NOW), binding(contact="sip:new@x")],
            "202": [binding("202", "sip:old@x", expires_at=NOW - 100)],
        }
    )
    assert store.load(NOW) == [binding(contact="sip:new@x")]
    # Deleted, not just hidden: a clock set back does not bring them back.
    assert store.load(NOW - 1000) == [binding(contact="sip:new@x")]


def test_bindings_survive_reopening(tmp_path):
    path = tmp_path / DB_NAME
    first = SqliteLocationStore(path)
    saved = [binding(contact="sip:a@x", reachable=False), binding("202", "sip:c@x")]
    first.save({"201": saved[:1], "202": saved[1:]})
    first.close()
    second = SqliteLocationStore(path)
    try:
        assert by_key(second.load(NOW)) == saved
        location = Location()
        location.load(second.load(NOW))
        assert location.find("201", "sip:a@x") == saved[0]
    finally:
        second.close()


def test_a_second_instance_sees_committed_batches(tmp_path):
    # What the SIP service's tests rely on: each batch is committed when save returns.
    writer, reader = (
        SqliteLocationStore(tmp_path / DB_NAME),
        SqliteLocationStore(tmp_path / DB_NAME),
    )
    try:
        writer.save({"201": [binding()]})
        assert reader.load(NOW) == [binding()]
    finally:
        writer.close()
        reader.close()


def test_a_failed_save_changes_nothing(store):
    store.save({"201": [binding(contact="sip:a@x")]})
    broken = binding(contact="sip:b@x", user_agent=object())  # sqlite cannot store this
    with pytest.raises(sqlite3.Error):
        store.save({"201": [binding(contact="sip:c@x"), broken], "202": [binding("202")]})
    assert store.load(NOW) == [binding(contact="sip:a@x")]
    # ... and the store is still usable afterwards (the transaction was rolled back).
    store.save({"202": [binding("202")]})
    assert len(store.load(NOW)) == 2


texts = st.text(min_size=1, max_size=30)
bindings_strategy = st.builds(
    Binding,
    ext=st.sampled_from(["201", "202", "2999"]),
    contact=texts,
    expires_at=st.floats(NOW + 1, NOW + 10**6, allow_nan=False),
    call_id=texts,
    cseq=st.integers(0, 2**32 - 1),
    transport=st.sampled_from(["udp", "tcp"]),
    source_ip=st.ip_addresses().map(str),
    source_port=st.integers(1, 65535),
    user_agent=st.text(max_size=50),
    q=st.floats(0.0, 1.0),
    reachable=st.booleans(),
)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(bindings_strategy, max_size=8, unique_by=lambda b: (b.ext, b.contact)))
def test_any_bindings_round_trip(tmp_path, bindings):
    path = tmp_path / DB_NAME
    path.unlink(missing_ok=True)
    store = SqliteLocationStore(path)
    try:
        changes: dict[str, list[Binding]] = {}
        for b in bindings:
            changes.setdefault(b.ext, []).append(b)
        store.save(changes)
        assert by_key(store.load(NOW)) == by_key(bindings)
    finally:
        store.close()
