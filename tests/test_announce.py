"""F8 announcements: the main host's policy and storage, the remote host's book and store, the
SIP MESSAGE to a phone, and the whole path in one process (main host, remote host, phones).

The NAT lab version with real processes and baresip is tests/test_announce_nat.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mainhost import announce as main_announce
from mainhost.announce import AnnounceError, Dispatch, create, report_row, summaries, summary
from mainhost.service import MainHost
from mainhost.store import DB_NAME as MAIN_DB
from mainhost.store import MainStore
from phoneagent.phone import Phone, open_phone
from remotehost.announce import AnnouncementBook, AnnouncementStore, Announcer
from remotehost.cli import check_join
from remotehost.location import Binding, Location
from remotehost.service import RemoteHost
from shared.sip.framing import SipStreamFramer
from shared.sip.message import (
    Headers,
    SipMessage,
    SipRequest,
    SipResponse,
    make_response,
    parse_message_untrusted,
)
from shared.wire.messages import Announcement as Wire
from shared.wire.messages import AnnouncementReport
from tests.callhelpers import REALM as CALL_REALM
from tests.callhelpers import SipPhone, open_office
from tests.hosthelpers import (
    GUARD,
    assert_one_line_error,
    free_ports,
    init_args,
    mainhost,
    make_mainhost_data,
    make_remotehost_data,
    token_for,
    trunk_port,
    wait_until,
)

REALM = "branchpbx"
PASSWORD = "correct-horse-battery"
NOW = 1_800_000_000.0
OFFICES = ["lyon", "paris"]
PHONES = {"2001": "lyon", "2002": "lyon", "2101": "paris"}


# --- the main host's policy (pure) ---


def make(text: str = "fire drill at 3", **kw: Any) -> main_announce.Announcement:
    return create(text, now=NOW, offices=OFFICES, phones=PHONES, **kw)


def test_an_announcement_for_everyone_concerns_every_office_and_every_phone() -> None:
    a = make(expires=60)
    assert a.targets == {"lyon": (), "paris": ()}
    assert a.expires_at == NOW + 60
    assert a.to_wire("lyon") == Wire(a.id, "fire drill at 3", NOW + 60, [], "main host")


def test_office_and_extensions_narrow_the_targets() -> None:
    assert make(office="paris").targets == {"paris": ()}
    a = make(extensions=["2101", "2002", "2001", "2002"])
    assert a.targets == {"paris": ("2101",), "lyon": ("2002", "2001")}
    assert a.extensions == ("2101", "2002", "2001")
    assert a.to_wire("lyon").extensions == ["2002", "2001"]
    assert make(office="lyon", extensions=["2001"]).targets == {"lyon": ("2001",)}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"text": ""}, "the announcement text is empty"),
        ({"text": " \n\t"}, "the announcement text is empty"),
        ({"text": "x" * 1301}, "at most 1300"),
        ({"expires": 0}, "--expires must be a positive number of seconds, not 0"),
        ({"expires": -5}, "--expires must be a positive number of seconds, not -5"),
        ({"expires": math.nan}, "positive number"),
        ({"expires": math.inf}, "positive number"),
        ({"office": "berlin"}, "no office named 'berlin'"),
        ({"extensions": ["2999"]}, "no phone with extension '2999'"),
        ({"office": "paris", "extensions": ["2001"]}, "2001 belongs to office lyon, not paris"),
    ],
)
def test_bad_input_is_refused_with_a_clear_reason(kw: dict[str, Any], message: str) -> None:
    text = kw.pop("text", "hello")
    with pytest.raises(AnnounceError, match=message.replace("(", r"\(")):
        make(text, **kw)


def test_no_office_at_all_is_refused() -> None:
    with pytest.raises(AnnounceError, match="no office to send it to"):
        create("hi", now=NOW, offices=[], phones={})


@given(
    text=st.text(min_size=1, max_size=80).filter(lambda t: t.strip()),
    expires=st.floats(min_value=0.001, max_value=1e7),
    exts=st.lists(st.sampled_from(sorted(PHONES)), max_size=4),
)
def test_a_stored_row_reads_back_as_the_same_announcement(
    text: str, expires: float, exts: list[str]
) -> None:
    a = make(text, expires=expires, extensions=exts)
    assert main_announce.Announcement.from_row(a.row()) == a
    # The offices concerned are exactly those of the extensions asked for (or all).
    assert set(a.targets) == ({PHONES[e] for e in exts} if exts else set(OFFICES))


def test_dispatch_sends_once_per_session_and_again_after_a_new_login() -> None:
    a, b = make("one"), make("two", office="paris")
    dispatch = Dispatch()
    assert dispatch.due([a, b], {}, NOW) == []  # nobody online
    due = dispatch.due([a, b], {"lyon": "s1"}, NOW)
    assert due == [("lyon", a)]
    # Not marked sent (the send failed): due again.
    assert dispatch.due([a, b], {"lyon": "s1"}, NOW) == [("lyon", a)]
    dispatch.mark_sent(a.id, "lyon", "s1")
    assert dispatch.due([a, b], {"lyon": "s1"}, NOW) == []
    # Paris logs in; Lyon logs in again (a new session): both get what concerns them.
    due = dispatch.due([a, b], {"lyon": "s2", "paris": "s3"}, NOW)
    assert sorted((o, x.text) for o, x in due) == [
        ("lyon", "one"),
        ("paris", "one"),
        ("paris", "two"),
    ]
    # The old session is forgotten: the set stays as small as what is live.
    assert all(s != "s1" for _, _, s in dispatch.sent)


def test_dispatch_never_sends_an_expired_announcement() -> None:
    a = make(expires=10)
    dispatch = Dispatch()
    assert dispatch.due([a], {"lyon": "s"}, NOW + 10) == []
    assert dispatch.due([a], {"lyon": "s"}, NOW + 9.9) == [("lyon", a)]


def test_a_report_for_an_office_not_concerned_is_refused_and_sizes_are_bounded() -> None:
    a = make(office="lyon")
    report = AnnouncementReport(a.id, ["2001"], {"2002": "x" * 1000}, ["2003"])
    assert report_row(a, "paris", report, NOW) is None
    row = report_row(a, "lyon", report, NOW)
    assert row is not None
    assert json.loads(row["delivered"]) == ["2001"]
    assert len(json.loads(row["failed"])["2002"]) == main_announce.MAX_REASON
    assert json.loads(row["pending"]) == ["2003"]


def test_summary_counts_reports_and_counts_unreported_offices_as_pending() -> None:
    a = make(expires=60)
    report = AnnouncementReport(a.id, ["2001"], {"2002": "486 Busy Here"}, [])
    row = report_row(a, "lyon", report, NOW)
    assert row is not None
    out = summary(a, {"lyon": row}, {"lyon": ["2001", "2002"], "paris": ["2101"]}, NOW + 1)
    lyon, paris = out["offices"]
    assert (lyon["delivered"], lyon["failed"], lyon["pending"]) == (1, 1, 0)
    assert lyon["failed_extensions"] == {"2002": "486 Busy Here"}
    assert (paris["reported"], paris["pending"], paris["pending_extensions"]) == (
        False,
        1,
        ["2101"],
    )
    assert (out["delivered"], out["failed"], out["pending"], out["expired"]) == (1, 1, 1, False)
    assert summary(a, {}, {}, NOW + 60)["expired"] is True


# --- the main host's storage ---


def directory_store(path: Path) -> MainStore:
    store = MainStore(path)
    store.add_office("lyon", "2000-2099", 1000)
    store.add_office("paris", "2100-2199", 1000)
    for ext in PHONES:
        store.add_phone(ext, PASSWORD, REALM)
    return store


def test_announcements_and_reports_survive_a_restart(tmp_path: Path) -> None:
    store = directory_store(tmp_path / "m.db")
    a = main_announce.announce(store, "hello", now=NOW, office="lyon", expires=100)
    row = report_row(a, "lyon", AnnouncementReport(a.id, ["2001"], {}, ["2002"]), NOW)
    assert row is not None and store.record_announcement_report(row)
    store.close()
    store = MainStore(tmp_path / "m.db")
    (only,) = summaries(store, NOW + 1)
    assert (only["id"], only["text"], only["delivered"], only["pending"]) == (a.id, "hello", 1, 1)
    assert store.announcement_rows(NOW + 100) == []  # expired: not sent any more ...
    assert len(summaries(store, NOW + 100)) == 1  # ... but still shown
    store.close()


def test_bad_input_stores_nothing(tmp_path: Path) -> None:
    store = directory_store(tmp_path / "m.db")
    for kw in ({"office": "nope"}, {"extensions": ["2999"]}, {"expires": 0}):
        with pytest.raises(AnnounceError):
            main_announce.announce(store, "hello", now=NOW, **kw)
    with pytest.raises(AnnounceError):
        main_announce.announce(store, "", now=NOW)
    assert store.announcement_rows() == []
    store.close()


def test_a_report_on_an_unknown_announcement_is_not_stored(tmp_path: Path) -> None:
    store = directory_store(tmp_path / "m.db")
    row = {"id": "nope", "office": "lyon", "delivered": "[]", "failed": "{}", "pending": "[]"}
    assert store.record_announcement_report({**row, "at": NOW}) is False
    assert store.announcement_reports() == []
    store.close()


# --- the remote host's book (pure) ---


def wire(id_: str = "a1", expires_at: float = NOW + 60, exts: list[str] | None = None) -> Wire:
    return Wire(id_, f"text of {id_}", expires_at, exts or [], "main host")


def test_book_delivers_once_per_phone() -> None:
    book = AnnouncementBook()
    assert book.add(wire(), NOW)
    assert not book.add(wire(), NOW)  # the same id again (after a login): nothing new
    assert [a.id for a in book.start("2001", NOW)] == ["a1"]
    assert book.start("2001", NOW) == []  # on its way: not twice
    assert book.finish("a1", "2001", None)
    assert book.start("2001", NOW) == []  # delivered: never again
    report = book.report("a1", ["2001", "2002"])
    assert report == AnnouncementReport("a1", ["2001"], {}, ["2002"])


def test_book_retries_a_failed_delivery_at_the_next_registration() -> None:
    book = AnnouncementBook()
    book.add(wire(), NOW)
    book.start("2001", NOW)
    book.finish("a1", "2001", "timeout")
    assert book.report("a1", ["2001"]) == AnnouncementReport("a1", [], {"2001": "timeout"}, [])
    assert [a.id for a in book.start("2001", NOW)] == ["a1"]
    book.finish("a1", "2001", None)
    assert book.report("a1", ["2001"]) == AnnouncementReport("a1", ["2001"], {}, [])
    book.finish("a1", "2001", "late failure")  # a delivered one stays delivered
    assert book.report("a1", ["2001"]) == AnnouncementReport("a1", ["2001"], {}, [])


def test_book_respects_the_extensions_and_the_expiry() -> None:
    book = AnnouncementBook()
    book.add(wire("only", exts=["2002"]), NOW)
    book.add(wire("short", expires_at=NOW + 5), NOW)
    assert not book.add(wire("old", expires_at=NOW), NOW)
    assert [a.id for a in book.start("2001", NOW)] == ["short"]
    assert [a.id for a in book.start("2002", NOW + 6)] == ["only"]  # short has expired
    assert book.report("only", ["2001", "2002", "2003"]) == AnnouncementReport(
        "only", [], {}, ["2002"]
    )
    assert book.expire(NOW + 5) == ["short"]
    assert book.report("short", []) is None
    assert not book.finish("short", "2001", None)  # it went away while on its way


def test_book_abandon_makes_a_delivery_pending_again() -> None:
    book = AnnouncementBook()
    book.add(wire(), NOW)
    book.start("2001", NOW)
    book.abandon("a1", "2001")
    assert [a.id for a in book.start("2001", NOW)] == ["a1"]


class BookMachine(RuleBasedStateMachine):
    """Any order of arrivals, registrations, outcomes and time: a phone never gets an
    announcement twice, delivered is final, and the report adds up."""

    def __init__(self) -> None:
        super().__init__()
        self.book = AnnouncementBook()
        self.now = NOW
        self.sent: list[tuple[str, str]] = []
        self.delivered: set[tuple[str, str]] = set()

    @rule(id_=st.sampled_from(["a", "b", "c"]), life=st.floats(1, 100), only=st.booleans())
    def arrive(self, id_: str, life: float, only: bool) -> None:
        self.book.add(wire(id_, self.now + life, ["2001"] if only else None), self.now)

    @rule(ext=st.sampled_from(["2001", "2002"]))
    def register(self, ext: str) -> None:
        for a in self.book.start(ext, self.now):
            assert (a.id, ext) not in self.delivered
            self.sent.append((a.id, ext))

    @rule(data=st.data(), ok=st.booleans())
    def outcome(self, data: st.DataObject, ok: bool) -> None:
        if not self.sent:
            return
        id_, ext = self.sent.pop(data.draw(st.integers(0, len(self.sent) - 1)))
        if self.book.finish(id_, ext, None if ok else "408 Request Timeout") and ok:
            self.delivered.add((id_, ext))

    @rule(dt=st.floats(0, 50))
    def later(self, dt: float) -> None:
        self.now += dt
        for id_ in self.book.expire(self.now):
            self.delivered = {d for d in self.delivered if d[0] != id_}

    @invariant()
    def reports_add_up(self) -> None:
        for id_ in self.book.announcements:
            report = self.book.report(id_, ["2001", "2002"])
            assert report is not None
            delivered, failed, pending = (
                set(report.delivered),
                set(report.failed),
                set(report.pending),
            )
            assert delivered == {e for i, e in self.delivered if i == id_}
            assert not (delivered & failed) and not (delivered & pending) and not (failed & pending)


BookMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_book_state_machine = BookMachine.TestCase


# --- the remote host's store ---


def test_store_keeps_pending_and_delivered_across_a_restart(tmp_path: Path) -> None:
    store = AnnouncementStore(tmp_path / "a.db")
    store.add(wire("a1"))
    store.add(wire("gone", expires_at=NOW + 1))
    store.record("a1", "2001", None)
    store.record("a1", "2002", "timeout")
    store.record("a1", "2001", "late failure")  # delivered is final on disk too
    store.close()
    store = AnnouncementStore(tmp_path / "a.db")
    book = store.load(NOW + 2)
    assert set(book.announcements) == {"a1"}
    assert book.report("a1", ["2001", "2002", "2003"]) == AnnouncementReport(
        "a1", ["2001"], {"2002": "timeout"}, ["2003"]
    )
    assert book.start("2001", NOW + 2) == []
    assert [a.id for a in book.start("2003", NOW + 2)] == ["a1"]
    store.forget(["a1"])
    assert store.load(NOW + 2).announcements == {}
    store.close()


# --- the remote host's announcer, with a fake SIP service and uplink ---


def binding(ext: str, contact: str = "", expires_at: float = 4e9) -> Binding:
    contact = contact or f"sip:{ext}@192.0.2.1:5060"
    return Binding(ext, contact, expires_at, f"c-{ext}", 1, "udp", "192.0.2.1", 5060)


@dataclass
class FakeOffice:
    announcer: Announcer
    location: Location
    sent: list[tuple[str, str]]
    reports: list[AnnouncementReport]
    answers: dict[str, str | None]
    arrived: trio.Event

    async def wait_reports(self, count: int) -> AnnouncementReport:
        with trio.fail_after(GUARD):
            while len(self.reports) < count:
                self.arrived = trio.Event()
                await self.arrived.wait()
        return self.reports[-1]

    def register(self, ext: str, contact: str = "") -> None:
        b = binding(ext, contact)
        self.location.replace(ext, {**{x.contact: x for x in self.location.get(ext)}, b.contact: b})

    def unregister(self, ext: str) -> None:
        self.location.replace(ext, {})


async def open_fake_office(nursery: trio.Nursery, tmp_path: Path, location: Location) -> FakeOffice:
    sent: list[tuple[str, str]] = []
    reports: list[AnnouncementReport] = []
    answers: dict[str, str | None] = {}
    office: FakeOffice

    async def deliver(b: Binding, a: Wire, now: float) -> str | None:
        sent.append((a.id, b.ext))
        return answers.get(b.ext)

    async def report(r: AnnouncementReport) -> bool:
        reports.append(r)
        office.arrived.set()
        return True

    announcer = Announcer(
        AnnouncementStore(tmp_path / "a.db"),
        location,
        deliver=deliver,
        directory=lambda: ["2001", "2002", "2003"],
        wall_clock=lambda: NOW,
    )
    announcer.report_to = report
    office = FakeOffice(announcer, location, sent, reports, answers, trio.Event())
    nursery.start_soon(announcer.run)
    return office


async def test_announcer_delivers_to_registered_phones_and_later_to_new_ones(
    tmp_path: Path,
) -> None:
    location = Location()
    async with trio.open_nursery() as nursery:
        office = await open_fake_office(nursery, tmp_path, location)
        office.register("2001")
        await office.announcer.on_announcement(wire())
        report = await office.wait_reports(1)
        # The first report may come before the delivery's outcome: wait for the cumulative one.
        while report.delivered != ["2001"]:
            report = await office.wait_reports(len(office.reports) + 1)
        assert report.pending == ["2002", "2003"]
        # 2002 registers: it gets it; a refresh of 2001 (same binding again) sends nothing.
        office.register("2001")
        office.register("2002")
        while report.delivered != ["2001", "2002"]:
            report = await office.wait_reports(len(office.reports) + 1)
        assert office.sent == [("a1", "2001"), ("a1", "2002")]
        # A second contact of a registered phone is not a new registration either.
        office.register("2002", "sip:2002@192.0.2.9:5070")
        # The same announcement again (the main host after a login): only a report.
        count = len(office.reports)
        await office.announcer.on_announcement(wire())
        assert (await office.wait_reports(count + 1)).delivered == ["2001", "2002"]
        assert office.sent == [("a1", "2001"), ("a1", "2002")]
        nursery.cancel_scope.cancel()


async def test_announcer_retries_a_failed_phone_after_it_registers_again(tmp_path: Path) -> None:
    location = Location()
    async with trio.open_nursery() as nursery:
        office = await open_fake_office(nursery, tmp_path, location)
        office.answers["2001"] = "timeout"
        office.register("2001")
        await office.announcer.on_announcement(wire())
        report = await office.wait_reports(1)
        while not report.failed:
            report = await office.wait_reports(len(office.reports) + 1)
        assert report.failed == {"2001": "timeout"}
        office.register("2001")  # a refresh: no retry
        office.answers["2001"] = None
        office.unregister("2001")
        office.register("2001")  # a new registration: retried, and delivered
        while report.delivered != ["2001"]:
            report = await office.wait_reports(len(office.reports) + 1)
        assert report.failed == {}
        assert office.sent == [("a1", "2001"), ("a1", "2001")]
        nursery.cancel_scope.cancel()


async def test_announcer_after_a_restart_delivers_pending_and_not_delivered_again(
    tmp_path: Path,
) -> None:
    location = Location()
    async with trio.open_nursery() as nursery:
        office = await open_fake_office(nursery, tmp_path, location)
        office.register("2001")
        await office.announcer.on_announcement(wire())
        report = await office.wait_reports(1)
        while report.delivered != ["2001"]:
            report = await office.wait_reports(len(office.reports) + 1)
        nursery.cancel_scope.cancel()
    office.announcer.store.close()
    # Restarted: 2001's binding comes back from disk (no listener), 2002 registers later.
    location = Location()
    location.load([binding("2001")])
    async with trio.open_nursery() as nursery:
        office = await open_fake_office(nursery, tmp_path, location)
        office.register("2002")
        await wait_until(lambda: ("a1", "2002") in office.sent)
        assert office.sent == [("a1", "2002")]  # 2001 had it before the restart
        nursery.cancel_scope.cancel()
    office.announcer.store.close()


# --- the whole path in one process: main host, remote host, phone agents ---


@dataclass
class Company:
    host: MainHost
    remote: RemoteHost
    store: MainStore  # a second connection, as the CLI has

    @property
    def sip(self) -> tuple[str, int]:
        assert self.remote.sip.address is not None
        return ("127.0.0.1", self.remote.sip.address[1])

    async def summary(self, announcement_id: str, done: Any) -> dict[str, Any]:
        """The announcement's summary once `done(summary)` holds (the reports are async)."""
        with trio.fail_after(GUARD):
            while True:
                rows = await trio.to_thread.run_sync(summaries, self.store, trio_time())
                (row,) = [r for r in rows if r["id"] == announcement_id]
                if done(row):
                    return row
                await trio.sleep(0.05)


def trio_time() -> float:
    import time

    return time.time()


@pytest.fixture
async def company(tmp_path: Path) -> AsyncIterator[Company]:
    data = tmp_path / "mainhost"
    config = make_mainhost_data(data)
    store = MainStore(data / MAIN_DB)
    secret = store.add_office("lyon", "2000-2099", 1000)
    for ext in ("2001", "2002", "2003"):
        store.add_phone(ext, PASSWORD, REALM)
    host = MainHost(data, config)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(host.serve)
        port = trunk_port(addresses)
        token = token_for(data, port, "lyon", secret)
        ca_der = await check_join(token, GUARD)
        remote_data = tmp_path / "remote"
        remote = RemoteHost(remote_data, make_remotehost_data(remote_data, token, ca_der))
        await nursery.start(remote.serve)
        await wait_until(lambda: remote.mirror.info().entries == 3 and "lyon" in host.trunk.online)
        yield Company(host, remote, store)
        # Work around remotehost/calls.py: its on_trunk_down, called as the uplink is cancelled,
        # spawns into its own nursery, already closed at shutdown ("Nursery is closed").
        remote.uplink.call_handler = None
        nursery.cancel_scope.cancel()
    store.close()


async def wait_text(phone: Phone, text: str) -> None:
    with trio.fail_after(GUARD):
        while text not in [m.text for m in phone.messages]:
            await phone.wait_message(len(phone.messages) + 1)


async def test_an_announcement_reaches_registered_phones_then_one_registering_later(
    company: Company,
) -> None:
    async with (
        open_phone(ext="2001", password=PASSWORD, server=company.sip) as p1,
        open_phone(ext="2002", password=PASSWORD, server=company.sip) as p2,
    ):
        a = main_announce.announce(
            company.store, "fire drill at 3 pm", now=trio_time(), expires=600
        )
        await wait_text(p1, "fire drill at 3 pm")
        await wait_text(p2, "fire drill at 3 pm")
        (message,) = p1.messages
        assert message.content_type.startswith("text/plain")
        assert message.sender.startswith("sip:announcements@")
        row = await company.summary(a.id, lambda r: r["delivered"] == 2)
        (lyon,) = row["offices"]
        assert lyon["delivered_extensions"] == ["2001", "2002"]
        assert lyon["pending_extensions"] == ["2003"]
        # 2003 was offline: it gets it when it registers, and the count goes up.
        async with open_phone(ext="2003", password=PASSWORD, server=company.sip) as p3:
            await wait_text(p3, "fire drill at 3 pm")
            row = await company.summary(a.id, lambda r: r["delivered"] == 3)
            assert row["pending"] == 0
        # The status shows it too.
        status = await trio.to_thread.run_sync(company.host.status)
        assert [x["id"] for x in status["announcements"]] == [a.id]
        # Once per phone: p1's re-registration (a refresh) brings nothing new.
        await p1.register()
        await trio.sleep(0.5)  # give a wrong resend the chance to show (not a timing assertion)
        assert len(p1.messages) == 1


async def test_directory_changes_reach_the_remote_host_within_a_second(company: Company) -> None:
    before = company.remote.status()["directory"]["extensions"]
    await trio.to_thread.run_sync(company.store.add_phone, "2050", PASSWORD, REALM)
    # The promise is one second; the slack is for a loaded test machine (a hang guard only).
    await wait_until(
        lambda: company.remote.status()["directory"]["extensions"] == before + 1, guard=1.0 + 2.0
    )


# --- the SIP MESSAGE to one phone (SipService.send_text) ---


async def test_send_text_over_udp_reports_a_2xx_as_delivered(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        phone = SipPhone("201", office.address)
        await phone.bind()
        await nursery.start(phone.run)
        outcome: list[str | None] = []

        async def send() -> None:
            text = "réunion à 15 h"
            outcome.append(
                await office.sip.send_text(phone.binding(), text, sender='main "host"', now=NOW)
            )

        nursery.start_soon(send)
        request = await phone.expect_request("MESSAGE")
        # RFC 3428: text/plain, to the contact; a Date; the sender as display name (quotes
        # of the operator's text cannot break the From header).
        assert request.uri == phone.contact
        assert request.headers.get("Content-Type") == "text/plain;charset=UTF-8"
        assert request.body.decode("utf-8") == "réunion à 15 h"
        assert request.headers.get("Date") == "Fri, 15 Jan 2027 08:00:00 GMT"
        assert str(request.headers.get("From")).startswith(
            '"main host" <sip:announcements@127.0.0.1>'
        )
        assert request.headers.get("To") == f"<sip:201@{CALL_REALM}>"
        await phone.send(make_response(request, 200, to_tag="t1"))
        await wait_until(lambda: bool(outcome))
        assert outcome == [None]
        nursery.cancel_scope.cancel()


async def test_send_text_reports_an_error_status_and_a_timeout(tmp_path: Path) -> None:
    async with open_office(tmp_path, fast_timers=True) as office, trio.open_nursery() as nursery:
        phone = SipPhone("201", office.address)
        await phone.bind()
        await nursery.start(phone.run)
        outcomes: list[str | None] = []

        async def send() -> None:
            outcomes.append(await office.sip.send_text(phone.binding(), "a", sender="x", now=NOW))

        nursery.start_soon(send)
        request = await phone.expect_request("MESSAGE")
        await phone.send(make_response(request, 100))  # provisional: still waiting
        await phone.send(make_response(request, 415, to_tag="t"))
        await wait_until(lambda: bool(outcomes))
        assert outcomes == ["415 Unsupported Media Type"]
        # A phone that never answers: Timer F (fast timers here) ends it as a timeout.
        outcomes.clear()
        nursery.start_soon(send)
        await wait_until(lambda: bool(outcomes))
        assert outcomes == ["timeout"]
        nursery.cancel_scope.cancel()


async def test_send_text_to_a_tcp_phone_uses_its_own_connection(tmp_path: Path) -> None:
    async with open_office(tmp_path) as office, trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", office.address[1])
        local = stream.socket.getsockname()
        # The phone's connection is known to the transport once something came over it.
        options = SipRequest("OPTIONS", "sip:127.0.0.1", Headers())
        for name, value in (
            ("Via", f"SIP/2.0/TCP 127.0.0.1:{local[1]};branch=z9hG4bKtcp1"),
            ("From", "<sip:201@branchpbx>;tag=f"),
            ("To", "<sip:127.0.0.1>"),
            ("Call-ID", "tcp-1"),
            ("CSeq", "1 OPTIONS"),
            ("Max-Forwards", "70"),
        ):
            options.headers.add(name, value)
        await stream.send_all(options.encode())
        framer = SipStreamFramer(client=True)

        async def next_message() -> SipMessage:
            with trio.fail_after(GUARD):
                while True:
                    item = framer.next_message()
                    if isinstance(item, bytes):
                        return parse_message_untrusted(item)
                    if item is None:
                        framer.receive_data(await stream.receive_some(65536))

        assert isinstance(await next_message(), SipResponse)  # the OPTIONS' 200
        tcp = Binding("201", f"sip:201@127.0.0.1:{local[1]};transport=tcp", 4e9, "c", 1, "tcp",
                      "127.0.0.1", local[1])  # fmt: skip
        outcome: list[str | None] = []

        async def send() -> None:
            outcome.append(await office.sip.send_text(tcp, "over tcp", sender="main host", now=NOW))

        nursery.start_soon(send)
        request = await next_message()
        assert isinstance(request, SipRequest) and request.method == "MESSAGE"
        assert str(request.headers.get("Via")).startswith("SIP/2.0/TCP ")
        await stream.send_all(make_response(request, 202, to_tag="t").encode())
        await wait_until(lambda: bool(outcome))
        assert outcome == [None]
        await stream.aclose()
        nursery.cancel_scope.cancel()


# --- the web API ---


async def http(
    port: int, method: str, path: str, key: bytes | None, body: Any = None
) -> tuple[int, Any]:
    payload = b"" if body is None else json.dumps(body).encode()
    request = f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".encode()
    if key is not None:
        request += b"Authorization: Bearer " + key + b"\r\n"
    request += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
    with trio.fail_after(GUARD):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request + payload)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(rest) if rest else None


async def test_the_api_takes_and_lists_announcements_with_the_admin_key(tmp_path: Path) -> None:
    from dataclasses import replace

    from mainhost.config import ApiConfig

    data = tmp_path / "mh"
    config = replace(
        make_mainhost_data(data), api=ApiConfig(enabled=True, listen="127.0.0.1", port=0)
    )
    directory_store(data / MAIN_DB).close()
    key = (data / "admin.key").read_text().strip().encode()
    host = MainHost(data, config)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(host.serve)
        port = int(addresses["api"][0].rsplit(":", 1)[1])
        body = {"text": "hello", "ext": "2101", "expires": 60}
        assert (await http(port, "POST", "/api/announcements", None, body))[0] == 401
        status, made = await http(port, "POST", "/api/announcements", key, body)
        assert status == 201, made
        assert (made["text"], made["extensions"], made["pending"]) == ("hello", ["2101"], 1)
        for bad, reason in (
            ({"text": ""}, "empty"),
            ({"text": "x", "office": "berlin"}, "no office named"),
            ({"text": "x", "ext": ["2999"]}, "no phone with extension"),
            ({"text": "x", "expires": 0}, "positive number"),
        ):
            status, answer = await http(port, "POST", "/api/announcements", key, bad)
            assert status == 400 and reason in answer["detail"], answer
        status, listed = await http(port, "GET", "/api/announcements", key)
        assert status == 200 and [a["id"] for a in listed] == [made["id"]]
        assert (await http(port, "GET", "/api/announcements", None))[0] == 401
        nursery.cancel_scope.cancel()


# --- the main host's trunk side: reports from offices ---


async def test_reports_from_an_office_not_concerned_or_about_nothing_are_not_stored(
    company: Company,
) -> None:
    a = main_announce.announce(company.store, "only lyon", now=trio_time(), office="lyon")
    announcer = company.host.trunk.announcer
    await announcer.on_report("paris", AnnouncementReport(a.id, ["2101"]))
    await announcer.on_report("lyon", AnnouncementReport("no-such-id", ["2001"]))
    await announcer.on_report("lyon", AnnouncementReport(a.id, ["2001"], {}, ["2002"]))
    rows = await trio.to_thread.run_sync(company.store.announcement_reports)
    assert [(r["id"], r["office"]) for r in rows] == [(a.id, "lyon")]


async def test_a_big_office_gets_bounded_parallel_deliveries_and_batched_reports(
    tmp_path: Path,
) -> None:
    from remotehost import announce as remote_announce

    location = Location()
    phones = [str(3000 + n) for n in range(100)]
    for ext in phones:
        location.load([binding(ext)])
    busy = 0
    most = 0
    reports: list[AnnouncementReport] = []

    async def deliver(b: Binding, a: Wire, now: float) -> str | None:
        nonlocal busy, most
        busy += 1
        most = max(most, busy)
        await trio.sleep(0.01)
        busy -= 1
        return None

    async def report(r: AnnouncementReport) -> bool:
        reports.append(r)
        return True

    announcer = Announcer(
        AnnouncementStore(tmp_path / "a.db"),
        location,
        deliver=deliver,
        directory=lambda: phones,
        wall_clock=lambda: NOW,
    )
    announcer.report_to = report
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.run)
        await announcer.on_announcement(wire())
        await wait_until(lambda: bool(reports) and len(reports[-1].delivered) == 100)
        nursery.cancel_scope.cancel()
    announcer.store.close()
    assert most <= remote_announce.MAX_PARALLEL
    assert len(reports) < 100  # rounds of reports, not one per phone
    assert reports[-1].pending == []


@given(
    delivered=st.lists(st.text(max_size=8), max_size=20),
    failed=st.dictionaries(st.text(max_size=8), st.text(max_size=400), max_size=20),
    pending=st.lists(st.text(max_size=8), max_size=20),
)
def test_any_report_an_office_sends_is_stored_bounded_and_summed(
    delivered: list[str], failed: dict[str, str], pending: list[str]
) -> None:
    a = make(office="lyon")
    row = report_row(a, "lyon", AnnouncementReport(a.id, delivered, failed, pending), NOW)
    assert row is not None
    out = summary(a, {"lyon": row}, {}, NOW)
    (lyon,) = out["offices"]
    assert lyon["delivered"] == len(set(delivered))
    assert lyon["pending"] == len(set(pending))
    assert lyon["failed"] == len(failed)
    assert all(len(why) <= main_announce.MAX_REASON for why in lyon["failed_extensions"].values())


# --- the commands, as an operator runs them ---


def test_the_commands_store_list_and_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "mh"
    assert mainhost(*init_args(data, free_ports())).returncode == 0
    for name, extensions in (("lyon", "2000-2099"), ("paris", "2100-2199")):
        result = mainhost("office", "add", name, "--extensions", extensions, "--data", data)
        assert result.returncode == 0, result.stderr
    assert mainhost("phone", "add", "2001", "--data", data).returncode == 0
    for args, needle in (
        ([""], "text is empty"),
        (["hi", "--office", "berlin"], "no office named 'berlin'"),
        (["hi", "--ext", "2999"], "no phone with extension '2999'"),
        (["hi", "--expires", "0"], "--expires must be a positive number"),
        (["hi", "--expires", "-1"], "--expires must be a positive number"),
    ):
        assert_one_line_error(mainhost("announce", *args, "--data", data), needle)
    listed = mainhost("announcements", "--json", "--data", data)
    assert json.loads(listed.stdout) == [], "bad input stored something"
    made = mainhost("announce", "lunch is served", "--ext", "2001", "--data", data)
    assert made.returncode == 0, made.stderr
    assert "for lyon (2001)" in made.stdout
    (row,) = json.loads(mainhost("announcements", "--json", "--data", data).stdout)
    assert (row["text"], row["extensions"], row["pending"]) == ("lunch is served", ["2001"], 1)
    assert row["expires"] - row["created"] == main_announce.DEFAULT_EXPIRES
    table = mainhost("announcements", "--data", data)
    assert row["id"] in table.stdout and "lyon" in table.stdout
    # Not running: `status --json` shows them from the database.
    status = json.loads(mainhost("status", "--json", "--data", data).stdout)
    assert status["running"] is False
    assert [a["id"] for a in status["announcements"]] == [row["id"]]
