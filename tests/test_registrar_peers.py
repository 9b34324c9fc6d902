"""The remote host's registrar proven with real SIP peers: SIPp, baresip and sipvicious.

A main host and one office's remote host run as processes on loopback (tests/peerhelpers.py),
set up the way an operator does it; the peers are the Debian packages a phone vendor's QA would
use. What each test shows is read back from BOTH hosts' `status --json`: the remote host's
bindings and the main host's copy, which the remote host reports over the trunk (F2).

Most tests share one office (module scope) and each uses its own extension, so they do not
see each other's bindings. Five failed authentications block a source address for minutes:
wrong passwords come from 127.0.0.3, never from 127.0.0.1 where the other tests' phones are,
and password cracking (which sipvicious only does from 127.0.0.1) gets an office of its own.
Waits poll with a deadline (a hang guard, never a timing assertion); silence is judged after a
later message was answered, not after a pause.

A missing peer program FAILS the test, naming the Debian package (deploy/setup.sh installs
them): a skip would hide a broken CI.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.peerhelpers import (
    GUARD,
    LOOPBACK,
    BackgroundSipp,
    MissingPeer,
    Office,
    SippRun,
    find_binding,
    free_port,
    free_sip_port,
    open_office,
    peer_binary,
    run_sipp,
    sipp_auth,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.peer

WRONG_IP = "127.0.0.3"  # where the wrong passwords come from
PHONES = {f"20{i:02d}": f"secret-20{i:02d}" for i in range(1, 11)}
VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "sip" / "rfc4475"


def need(name: str) -> str:
    """The peer's path; FAIL (not skip) naming the Debian package when it is missing."""
    try:
        return peer_binary(name)
    except MissingPeer as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def office(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Office]:
    """The shared office: OPTIONS keepalives every second, so reachability shows quickly."""
    with open_office(tmp_path_factory.mktemp("office"), PHONES, keepalive_interval=1.0) as o:
        yield o


def register(
    office: Office,
    workdir: Path,
    ext: str,
    password: str | None = None,
    *,
    transport: str = "u1",
    local_ip: str = LOOPBACK,
    local_port: int | None = None,
    timeout: float = 15.0,
) -> tuple[SippRun, int]:
    """tests/sipp/register_auth.xml for `ext` (credentials through -au/-ap); (run, local port)."""
    need("sipp")
    port = local_port or free_sip_port(local_ip)
    run = run_sipp(
        "register_auth.xml",
        workdir,
        target=(LOOPBACK, office.sip_port),
        fields=[[ext]],
        auth=(ext, password if password is not None else PHONES[ext]),
        transport=transport,
        local_ip=local_ip,
        local_port=port,
        timeout=timeout,
    )
    return run, port


def contact_of(ext: str, port: int, transport: str = "UDP", ip: str = LOOPBACK) -> str:
    """The Contact URI the SIPp scenarios register."""
    return f"sip:{ext}@{ip}:{port};transport={transport}"


def wait_registered(
    office: Office, ext: str, contact: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait until both hosts list `contact` for `ext`; return (remote's, main's) binding."""
    remote = wait_for(
        lambda: _with_contact(office.registrations(ext), contact),
        f"the remote host to list {contact}",
    )
    main = wait_for(
        lambda: _with_contact(office.main_registrations(ext), contact),
        f"the main host to list {contact}",
    )
    return remote, main


def _with_contact(regs: list[dict[str, Any]], contact: str) -> dict[str, Any] | None:
    return next((r for r in regs if r["contact"] == contact), None)


def cli_registrations(
    office: Office, ext: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`remotehost status --json` and `mainhost status --json`, as an operator reads them."""
    remote = [r for r in office.remote_status_cli()["registrations"] if r["ext"] == ext]
    main = [r for r in office.office_entry(office.main_status_cli())["registrations"]]
    return remote, [r for r in main if r["ext"] == ext]


# --- 1. SIPp registers with digest auth over UDP and TCP ------------------------------------


@pytest.mark.parametrize(("transport", "name"), [("u1", "UDP"), ("t1", "TCP")])
def test_sipp_registers_with_md5_digest(office: Office, tmp_path: Path, transport, name):
    run, port = register(office, tmp_path, "2001", transport=transport)
    assert run.ok, run.output[-2000:]
    assert run.statuses() == [401, 200]
    # The registrar challenged with MD5 and SIPp answered it.
    assert re.search(r"WWW-Authenticate: Digest .*algorithm=MD5", run.messages)
    assert re.search(r'Authorization: Digest username="2001".*algorithm=MD5', run.messages)
    contact = contact_of("2001", port, name)
    remote, main = wait_registered(office, "2001", contact)
    assert remote["user_agent"] == main["user_agent"] == "SIPp"
    assert remote["source"].startswith(f"{name.lower()}:127.0.0.1:")
    assert main["source"] == remote["source"]
    assert 0 < remote["expires_in"] <= 300
    # And what the operator's commands print says the same.
    remote_cli, main_cli = cli_registrations(office, "2001")
    assert [r["user_agent"] for r in remote_cli if r["contact"] == contact] == ["SIPp"]
    assert [r["user_agent"] for r in main_cli if r["contact"] == contact] == ["SIPp"]


@pytest.mark.parametrize(("transport", "name"), [("u1", "UDP"), ("t1", "TCP")])
def test_sipp_with_a_wrong_password_is_refused(office: Office, tmp_path: Path, transport, name):
    before = office.sip_stats()["service"]["registrar"]
    # From an address of its own: failures add up per address (five block it), and the
    # other tests share this office from 127.0.0.1.
    run, port = register(
        office, tmp_path, "2001", "not-the-password", transport=transport, local_ip=WRONG_IP
    )
    assert run.returncode != 0
    # Challenged twice: the answer to the challenge was refused like no answer at all.
    assert run.statuses() == [401, 401], run.messages
    after = office.sip_stats()["service"]["registrar"]
    assert after["auth_failures"] == before["auth_failures"] + 1
    assert after["accepted"] == before["accepted"]
    contact = contact_of("2001", port, name, WRONG_IP)
    assert _with_contact(office.registrations("2001"), contact) is None
    remote_cli, main_cli = cli_registrations(office, "2001")
    assert contact not in [r["contact"] for r in remote_cli + main_cli]


def test_one_sipp_registers_several_phones_then_unregisters_them(office: Office, tmp_path: Path):
    """Per-row credentials (tests/sipp/register_fields.xml), then Expires: 0 from the same
    contact: gone from both hosts."""
    need("sipp")
    phones = ["2009", "2010"]
    port = free_sip_port()

    def rows(expires: int) -> list[list[str]]:
        return [[ext, sipp_auth(ext, PHONES[ext]), str(expires)] for ext in phones]

    run = run_sipp(
        "register_fields.xml",
        tmp_path / "on",
        target=(LOOPBACK, office.sip_port),
        fields=rows(120),
        local_port=port,
        calls=len(phones),
    )
    assert run.ok, run.output[-2000:]
    assert run.statuses() == [401, 200, 401, 200]
    for ext in phones:
        remote, _ = wait_registered(office, ext, contact_of(ext, port))
        assert 60 < remote["expires_in"] <= 120
    run = run_sipp(
        "register_fields.xml",
        tmp_path / "off",
        target=(LOOPBACK, office.sip_port),
        fields=rows(0),
        local_port=port,
        calls=len(phones),
    )
    assert run.ok, run.output[-2000:]

    def gone(ext: str) -> bool:
        return office.registrations(ext) == [] and office.main_registrations(ext) == []

    for ext in phones:
        wait_for(functools.partial(gone, ext), f"both hosts to forget {ext}")
    remote_cli, main_cli = cli_registrations(office, "2009")
    assert remote_cli == [] and main_cli == []


# --- 2. baresip registers, refreshes and unregisters ----------------------------------------


@dataclass
class SipTrace:
    """Messages out of baresip's `-s` SIP trace: (direction, start line, headers)."""

    messages: list[tuple[str, str, dict[str, str]]]

    @classmethod
    def parse(cls, text: str) -> SipTrace:
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        out = []
        for block in re.split(r"\n#\n", text):
            lines = block.strip("\n").splitlines()
            if len(lines) < 2 or " -> " not in lines[0]:
                continue
            headers: dict[str, str] = {}
            for line in lines[2:]:
                name, colon, value = line.partition(":")
                if not colon or not line.strip():
                    break
                headers.setdefault(name.strip().lower(), value.strip())
            out.append((lines[0], lines[1], headers))
        return cls(out)

    def registers(self) -> list[dict[str, str]]:
        return [h for _, start, h in self.messages if start.startswith("REGISTER ")]

    def ok_cseqs(self) -> set[int]:
        """CSeq numbers of REGISTERs that got 200 OK."""
        return {
            int(h["cseq"].split()[0])
            for _, start, h in self.messages
            if start.startswith("SIP/2.0 200") and h.get("cseq", "").endswith("REGISTER")
        }


class Baresip:
    """baresip, headless: config and accounts in a directory, ctrl_tcp for commands."""

    def __init__(
        self, workdir: Path, ext: str, password: str, registrar_port: int, regint: int
    ) -> None:
        self.binary = need("baresip")
        self.dir = workdir / "baresip"
        self.dir.mkdir()
        self.sip_port = free_sip_port()
        self.ctrl_port = free_port()
        # Only what a registration needs: accounts, the command menu, ctrl_tcp to drive it.
        (self.dir / "config").write_text(
            "poll_method\tepoll\n"
            f"sip_listen\t{LOOPBACK}:{self.sip_port}\n"
            "module_path\t/usr/lib/baresip/modules\n"
            "module_tmp\taccount.so\n"
            "module_app\tmenu.so\n"
            "module\tctrl_tcp.so\n"
            f"ctrl_tcp_listen\t{LOOPBACK}:{self.ctrl_port}\n"
        )
        (self.dir / "accounts").write_text(
            f"<sip:{ext}@{LOOPBACK}:{registrar_port}>;auth_pass={password};regint={regint}\n"
        )
        self.log = self.dir / "baresip.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [self.binary, "-f", str(self.dir), "-s"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def trace(self) -> SipTrace:
        return SipTrace.parse(self.log.read_text(errors="replace"))

    def command(self, command: str, params: str = "") -> dict[str, Any]:
        """One ctrl_tcp command (JSON in a netstring); its JSON answer."""
        body = json.dumps({"command": command, "params": params, "token": "t"}).encode()
        with socket.create_connection((LOOPBACK, self.ctrl_port), timeout=10) as sock:
            sock.sendall(b"%d:%s," % (len(body), body))
            data = b""
            while True:
                length, colon, rest = data.partition(b":")
                if colon and len(rest) > int(length):
                    answer: dict[str, Any] = json.loads(rest[: int(length)])
                    if answer.get("response"):
                        return answer
                    data = rest[int(length) + 1 :]
                    continue
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"baresip closed ctrl_tcp; got {data!r}")
                data += chunk

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGTERM, grace=10.0)


# baresip re-registers at 90 % of the granted time: 54 s for the registrar's minimum of 60 s.
REFRESH_GUARD = 90.0


def test_baresip_registers_refreshes_and_unregisters(office: Office, tmp_path: Path):
    # It asks for 30 s, below the registrar's minimum: 423 with Min-Expires 60 (RFC 3261
    # §10.3 step 7), and baresip asks again for 60.
    phone = Baresip(tmp_path, "2002", PHONES["2002"], office.sip_port, regint=30)
    try:
        phone.start()
        contact_part = f"@{LOOPBACK}:{phone.sip_port}"

        def binding(regs: list[dict[str, Any]]) -> dict[str, Any] | None:
            return find_binding(regs, "2002", contact_part)

        remote = wait_for(lambda: binding(office.registrations("2002")), "baresip registered")
        main = wait_for(lambda: binding(office.main_registrations("2002")), "main host told")
        assert remote["user_agent"].startswith("baresip")
        assert main["user_agent"] == remote["user_agent"]
        assert remote["source"] == f"udp:{LOOPBACK}:{phone.sip_port}"
        assert remote["expires_in"] <= 60
        # baresip's own view: registered, with our registrar's 200.
        info = phone.command("reginfo")
        assert info["ok"], info
        view = re.sub(r"\x1b\[[0-9;]*m", "", info["data"])
        where = re.escape(f"sip:2002@{LOOPBACK}:{office.sip_port}")
        assert re.search(rf"{where}\s+OK\s+branchpbx-remotehost", view), view
        first = phone.trace()
        too_brief = [h for _, start, h in first.messages if start.startswith("SIP/2.0 423")]
        assert too_brief and too_brief[0]["min-expires"] == "60", first.messages
        assert [h["contact"].rsplit(";", 1)[-1] for h in first.registers()[:3]] == [
            "expires=30",  # challenged
            "expires=30",  # 423
            "expires=60",  # 200
        ]
        assert first.ok_cseqs(), "baresip saw no 200 for its REGISTER"
        call_id = first.registers()[0]["call-id"]
        first_ok = max(first.ok_cseqs())

        # The refresh: the same Call-ID with a higher CSeq, answered 200 (RFC 3261 §10.2.4).
        def refreshed() -> bool:
            trace = phone.trace()
            same_dialog = {
                int(h["cseq"].split()[0]) for h in trace.registers() if h["call-id"] == call_id
            }
            return any(c > first_ok for c in trace.ok_cseqs() & same_dialog)

        wait_for(refreshed, "baresip's refresh REGISTER", REFRESH_GUARD, interval=0.5)
        stored = wait_for(
            lambda: [b for b in office.stored_bindings("2002") if b["cseq"] > first_ok],
            "the refreshed binding on disk",
        )
        assert stored[0]["call_id"] == call_id
        remote = wait_for(lambda: binding(office.registrations("2002")), "still registered")
        assert remote["expires_in"] > 50  # renewed, not what was left of the first 60 s
        assert remote["reachable"], "baresip answers the OPTIONS keepalives"
        remote_cli, main_cli = cli_registrations(office, "2002")
        assert binding(remote_cli) is not None
        assert binding(main_cli) is not None

        # Quitting unregisters: Expires 0 for the contact, then both hosts forget it.
        phone.command("quit")
        assert phone.process is not None
        phone.process.wait(15)
        goodbye = [
            h
            for h in phone.trace().registers()
            if "expires=0" in h.get("contact", "") or h.get("expires") == "0"
        ]
        assert goodbye, "baresip sent no REGISTER with Expires 0"
        assert max(int(h["cseq"].split()[0]) for h in goodbye) in phone.trace().ok_cseqs()
        wait_for(lambda: binding(office.registrations("2002")) is None, "2002 forgotten")
        wait_for(lambda: binding(office.main_registrations("2002")) is None, "main forgot 2002")
        remote_cli, main_cli = cli_registrations(office, "2002")
        assert remote_cli == [] and main_cli == []
    finally:
        phone.stop()


# --- 3. sipvicious: no extension list, password guessing blocked ----------------------------


@pytest.mark.parametrize("method", ["REGISTER", "INVITE"])
def test_svwar_finds_no_extensions(office: Office, method):
    svwar = need("svwar")
    before = office.sip_stats()["service"]["registrar"]
    argv = [svwar, "-e2000-2010", "-m", method, "-p", str(office.sip_port)]
    argv += ["-P", str(free_sip_port()), "--maximumtime", "5", LOOPBACK]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "found nothing" in output, output
    # svwar prints a table row per extension it found: there must be none, although
    # 2001-2010 exist and 2000 does not (the registrar answers both alike).
    assert not re.search(r"^\|\s*20\d\d\s*\|", output, re.M), output
    # Asking without credentials is no failed authentication: nothing to block.
    after = office.sip_stats()["service"]["registrar"]
    assert after["auth_failures"] == before["auth_failures"]


def test_svcrack_is_blocked_and_other_sources_still_register(tmp_path: Path):
    svcrack = need("svcrack")
    need("sipp")
    # Its own office: the block of 127.0.0.1 lasts minutes (sipvicious 0.3 ignores -b and
    # always sends from 127.0.0.1 here).
    with open_office(tmp_path / "office", PHONES) as office:
        # The right password comes 9th: only the block keeps svcrack from finding it.
        words = [f"wrong-{i}" for i in range(1, 9)] + [PHONES["2001"]]
        words += [f"wrong-{i}" for i in range(9, 13)]
        wordlist = tmp_path / "words.txt"
        wordlist.write_text("\n".join(words) + "\n")
        argv = [svcrack, "-u2001", "-d", str(wordlist), "-p", str(office.sip_port)]
        argv += ["-P", str(free_sip_port()), "--maximumtime", "3", LOOPBACK]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        output = result.stdout + result.stderr
        assert PHONES["2001"] not in output, output
        assert "found nothing" in output, output
        assert "since we last received a response" in output, output
        stats = office.sip_stats()["service"]
        registrar = stats["registrar"]
        assert registrar["auth_failures"] == 5  # RegistrarPolicy.failures_before_block
        assert registrar["blocked_sources"] == 1
        assert registrar["accepted"] == 0
        assert stats["blocked_drops"] > 0  # svcrack's later guesses, dropped unanswered
        remote_cli = office.remote_status_cli()
        assert remote_cli["sip"]["service"]["blocked_drops"] >= stats["blocked_drops"]
        assert remote_cli["registrations"] == []

        # The blocked address gets no answer at all, even with the right password ...
        blocked, _ = register(office, tmp_path / "blocked", "2001", timeout=3.0)
        assert blocked.returncode != 0
        assert blocked.received() == []
        # ... while a phone at another address registers as usual.
        run, port = register(office, tmp_path / "other", "2005", local_ip="127.0.0.2")
        assert run.ok, run.output[-2000:]
        remote, main = wait_registered(office, "2005", contact_of("2005", port, ip="127.0.0.2"))
        assert remote["source"] == f"udp:127.0.0.2:{port}"
        assert main["source"] == remote["source"]
        assert office.registrations("2001") == []


# --- 4. registrations survive a restart of the remote host ----------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_registration_survives_remote_host_restart(office: Office, tmp_path: Path, sig):
    run, port = register(office, tmp_path, "2003")
    assert run.ok, run.output[-2000:]
    contact = contact_of("2003", port)
    wait_registered(office, "2003", contact)
    if sig == signal.SIGKILL:
        # A crash loses only what the batch writer had not saved yet: wait until it has.
        wait_for(
            lambda: [b for b in office.stored_bindings("2003") if b["contact"] == contact],
            "the binding in location.db",
        )
    office.stop_remote(sig)
    # The main host saw the office go and forgot its registrations with it.
    wait_for(lambda: not office.office_entry()["online"], "the office offline")
    assert office.main_registrations("2003") == []
    # While it is down, `remotehost status` shows what its disk knows: the binding.
    down = office.remote_status_cli()
    assert down["running"] is False
    assert contact in [r["contact"] for r in down["registrations"] if r["ext"] == "2003"]
    office.start_remote()
    remote, main = wait_registered(office, "2003", contact)
    assert remote["user_agent"] == main["user_agent"] == "SIPp"
    assert 0 < remote["expires_in"] <= 300
    remote_cli, main_cli = cli_registrations(office, "2003")
    assert contact in [r["contact"] for r in remote_cli]
    assert contact in [r["contact"] for r in main_cli]


# --- 5. contacts that stop answering OPTIONS are unreachable -------------------------------


def test_unanswered_keepalives_mark_the_contact_unreachable(office: Office, tmp_path: Path):
    run, port = register(office, tmp_path, "2004")
    assert run.ok, run.output[-2000:]
    contact = contact_of("2004", port)
    wait_registered(office, "2004", contact)

    def reachable(regs: list[dict[str, Any]]) -> bool | None:
        binding = _with_contact(regs, contact)
        return None if binding is None else bool(binding["reachable"])

    # SIPp has exited: nobody answers the OPTIONS pings sent every second.
    wait_for(lambda: reachable(office.registrations("2004")) is False, "unreachable")
    wait_for(lambda: reachable(office.main_registrations("2004")) is False, "main: unreachable")
    remote_cli, main_cli = cli_registrations(office, "2004")
    assert [r["reachable"] for r in remote_cli if r["contact"] == contact] == [False]
    assert [r["reachable"] for r in main_cli if r["contact"] == contact] == [False]

    # A SIPp UAS on the contact's port answers them: reachable again, and it stays so while
    # it answers three rounds of pings. (It also answers retransmissions of the earlier,
    # unanswered pings; those count for nothing: their rounds are over.)
    before: int = office.sip_stats()["service"]["pings_answered"]
    uas = BackgroundSipp(
        "options_answer.xml", tmp_path / "uas", target=None, local_port=port, calls=None, timeout=60
    )
    samples: list[bool | None] = []

    def three_rounds_answered() -> bool:
        samples.append(reachable(office.registrations("2004")))
        answered: int = office.sip_stats()["service"]["pings_answered"]
        return answered >= before + 3

    try:
        wait_for(lambda: reachable(office.registrations("2004")), "reachable again")
        wait_for(three_rounds_answered, "three answered rounds of pings", interval=0.2)
    finally:
        uas_run = uas.stop()
    assert samples and all(samples), samples
    assert uas_run.messages.count("SIP/2.0 200 OK") >= 3
    wait_for(lambda: reachable(office.main_registrations("2004")), "main: reachable again")
    remote_cli, main_cli = cli_registrations(office, "2004")
    assert [r["reachable"] for r in main_cli if r["contact"] == contact] == [True]


# --- 6. what the remote host answers besides REGISTER ---------------------------------------


@pytest.mark.parametrize(
    ("scenario", "status", "counter"),
    [
        ("options_allow.xml", 200, "options_answered"),
        ("invite_challenge.xml", 407, "invites_challenged"),
        ("subscribe_405.xml", 405, "not_allowed"),
        ("unknown_method.xml", 501, "not_implemented"),
        ("register_foreign.xml", 403, None),
    ],
)
def test_other_requests_get_the_right_status(
    office: Office, tmp_path: Path, scenario, status, counter
):
    need("sipp")
    before = office.sip_stats()["service"]
    run = run_sipp(
        scenario, tmp_path, target=(LOOPBACK, office.sip_port), fields=[["2007"]], timeout=10
    )
    assert run.ok, run.output[-3000:]
    assert status in run.statuses()
    after = office.sip_stats()["service"]
    if counter is not None:
        assert after[counter] == before[counter] + 1
    else:
        assert after["registrar"]["refused"] == before["registrar"]["refused"] + 1
        assert after["registrar"]["challenged"] == before["registrar"]["challenged"]
    assert office.registrations("2007") == []


# --- 7. the RFC 4475 torture messages against the running remote host -----------------------

SILENT = None
# file -> (status, words the reason must hold) the remote host answers, or SILENT. Where the
# parser rejects a message, the status is the one tests/test_rfc4475.py expects of it (the
# one RFC 4475 names); where it accepts one, it is what the service does with the request.
ANSWERS: dict[str, tuple[int, str] | None] = {
    # §3.1.1 valid messages: the method decides. A new INVITE is challenged first (407); one
    # with a To tag belongs to a dialog we do not have (481); MESSAGE only inside a call.
    "wsinv.dat": (481, "Does Not Exist"),
    "intmeth.dat": (501, "Not Implemented"),
    "esc01.dat": (407, "Proxy Authentication Required"),
    "escnull.dat": (403, "domain"),  # REGISTER sip:example.com: not our domain
    "esc02.dat": (501, "Not Implemented"),  # RE%47IST%45R is not REGISTER
    "lwsdisp.dat": (200, "OK"),
    "longreq.dat": (407, "Proxy Authentication Required"),
    "dblreq.dat": (403, "domain"),
    "semiuri.dat": (200, "OK"),
    "transports.dat": (200, "OK"),
    "mpart01.dat": (405, "Method Not Allowed"),
    "unreason.dat": SILENT,  # responses to nothing we sent
    "noreason.dat": SILENT,
    # §3.1.2 invalid messages: 400 naming the fault, 505 for the version; bad responses dropped
    "badinv01.dat": (400, "Empty"),
    "clerr.dat": (400, "Content-Length"),
    "ncl.dat": (400, "Content-Length"),
    "scalar02.dat": (400, "CSeq"),
    "scalarlg.dat": SILENT,
    "quotbal.dat": (400, "quoted"),
    "ltgtruri.dat": (400, "Request-URI"),
    "lwsruri.dat": (400, "Request-URI"),
    "lwsstart.dat": (400, "Request-URI"),
    "trws.dat": (400, "Request-URI"),
    "escruri.dat": (400, "Request-URI"),
    "baddate.dat": (400, "Date"),
    "regbadct.dat": (400, "<>"),
    "badaspec.dat": (400, "Whitespace"),
    "baddn.dat": (400, "display name"),
    "badvers.dat": (505, "Version"),
    "mismatch01.dat": (400, "CSeq method"),
    "mismatch02.dat": (400, "CSeq method"),
    "bigcode.dat": SILENT,
    # §3.2
    "badbranch.dat": (200, "OK"),
    # §3.3 application-layer semantics
    "insuf.dat": (400, "Missing"),
    "unkscm.dat": (416, "Scheme"),
    "novelsc.dat": (416, "Scheme"),
    "unksm2.dat": (403, "domain"),
    "bext01.dat": (420, "Bad Extension"),
    "invut.dat": (407, "Proxy Authentication Required"),  # RFC 4475: 415 (after auth, here)
    "regaut01.dat": (403, "domain"),  # 401 once the domain is ours: see REGISTERS_TO_US
    "multi01.dat": (400, "Multiple"),
    "mcl01.dat": (400, "Multiple Content-Length"),
    "bcast.dat": SILENT,
    "zeromf.dat": (200, "OK"),  # Max-Forwards 0 stops proxies; we are the UAS
    "cparam01.dat": (403, "domain"),
    "cparam02.dat": (403, "domain"),
    "regescrt.dat": (403, "domain"),
    "sdp01.dat": (407, "Proxy Authentication Required"),  # RFC 4475: 406 (after auth, here)
    # §3.4
    "inv2543.dat": (407, "Proxy Authentication Required"),
}

# Where we answer differently from RFC 4475 (reported; the test keeps the RFC's answer).
DIFFERS = {
    "insuf.dat": "no From, To or Call-ID to copy into a reply: dropped; RFC 4475 §3.3.1 says"
    " ideally 400",
}

# The valid REGISTERs again with the Request-URI naming us: the registrar's answer is 401
# (for regaut01 exactly what RFC 4475 §3.3.7 asks: an unknown scheme is no credential).
REGISTERS_TO_US = [
    "escnull.dat",
    "dblreq.dat",
    "unksm2.dat",
    "regaut01.dat",
    "cparam01.dat",
    "cparam02.dat",
    "regescrt.dat",
]

# The top Via's sent-by: the one thing rewritten, so replies come back to the test's socket.
# (Folded lines and spaces around '/' as in wsinv.dat; the first Via header is the top one.)
TOP_VIA_SENT_BY = re.compile(
    rb"^((?:via|v)[ \t]*:\s*SIP\s*/\s*[0-9.]+\s*/\s*[A-Za-z0-9]+\s+)([^;\s,]+)", re.I | re.M
)


def vector_names() -> list[str]:
    rows = (VECTORS / "INDEX.psv").read_text().splitlines()
    return [r.split("|")[0] for r in rows if r.strip() and not r.startswith("#")]


@dataclass
class TortureResults:
    answers: dict[str, list[str]]  # key -> status lines received, in order
    registered_after: SippRun
    alive_after: bool
    handler_errors: int


def _first_line(datagram: bytes) -> str:
    return datagram.split(b"\r\n", 1)[0].decode("utf-8", "replace")


@pytest.fixture(scope="module")
def torture(office: Office, tmp_path_factory: pytest.TempPathFactory) -> TortureResults:
    """Send every vector (and the REGISTERs again, to us) over UDP, each from its own socket
    (several share a branch; distinct sent-by ports keep their transactions apart), then
    collect what came back."""
    need("sipp")
    target = (LOOPBACK, office.sip_port)
    sent: dict[str, bytes] = {}
    for name in vector_names():
        sent[name] = (VECTORS / name).read_bytes()
    for name in REGISTERS_TO_US:
        data = sent[name].replace(b"REGISTER sip:example.com ", b"REGISTER sip:127.0.0.1 ", 1)
        assert data != sent[name]
        sent[f"{name}@us"] = data
    sockets: dict[str, socket.socket] = {}
    selector = selectors.DefaultSelector()
    answers: dict[str, list[str]] = {key: [] for key in sent}
    try:
        for key, data in sent.items():
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets[key] = sock
            sock.bind((LOOPBACK, 0))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, key)
            here = b"%s:%d" % (LOOPBACK.encode(), sock.getsockname()[1])
            if not data.startswith(b"SIP/2.0 "):  # responses go out as they are
                data, count = TOP_VIA_SENT_BY.subn(rb"\g<1>" + here, data, count=1)
                assert count == 1, key
            sock.sendto(data, target)

        def drain(until: Callable[[], bool], guard: float) -> None:
            deadline = time.monotonic() + guard
            while not until() and time.monotonic() < deadline:
                for selected, _ in selector.select(0.05):
                    sock = selected.fileobj
                    assert isinstance(sock, socket.socket)
                    with contextlib.suppress(BlockingIOError):
                        answers[selected.data].append(_first_line(sock.recv(65536)))

        def final(key: str) -> bool:
            return any(not line.startswith("SIP/2.0 1") for line in answers[key])

        # Everything that will be answered, answered (a hang guard, not a timing check) ...
        expect_answer = [k for k in sent if ANSWERS[k.removesuffix("@us")] is not SILENT]
        drain(lambda: all(final(k) for k in expect_answer if k not in DIFFERS), GUARD)
        # ... then one more request as a barrier: UDP is handled in order, so once it is
        # answered, every vector before it has been dealt with, answered or dropped.
        barrier = "barrier"
        answers[barrier] = []
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets[barrier] = sock
        sock.bind((LOOPBACK, 0))
        selector.register(sock, selectors.EVENT_READ, barrier)
        port = sock.getsockname()[1]
        sock.sendto(options_request(port), target)
        drain(lambda: final(barrier), GUARD)
        assert answers[barrier] == ["SIP/2.0 200 OK"]
        drain(lambda: False, 0.2)  # replies already on their way
    finally:
        selector.close()
        for sock in sockets.values():
            sock.close()
    run, port = register(office, tmp_path_factory.mktemp("after"), "2006")
    stats = office.sip_stats()["transport"]
    return TortureResults(answers, run, office.remote.alive, stats["handler_errors"])


def options_request(port: int) -> bytes:
    return (
        f"OPTIONS sip:{LOOPBACK} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {LOOPBACK}:{port};branch=z9hG4bK-barrier-{port}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:2001@{LOOPBACK}>;tag=barrier\r\n"
        f"To: <sip:{LOOPBACK}>\r\n"
        f"Call-ID: barrier-{port}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _cases() -> list[Any]:
    cases = []
    for key in [*vector_names(), *(f"{n}@us" for n in REGISTERS_TO_US)]:
        marks = []
        if key in DIFFERS:
            marks.append(pytest.mark.xfail(reason=DIFFERS[key], strict=True))
        cases.append(pytest.param(key, marks=marks, id=key))
    return cases


@pytest.mark.parametrize("key", _cases())
def test_rfc4475_vector_gets_the_right_answer(torture: TortureResults, key):
    lines = torture.answers[key]
    finals = [line for line in lines if not line.startswith("SIP/2.0 1")]
    if key.endswith("@us"):
        expected: tuple[int, str] | None = (401, "Unauthorized")
    else:
        expected = ANSWERS[key]
    if expected is SILENT:
        assert lines == []
        return
    assert expected is not None
    status, words = expected
    assert finals, f"no final answer to {key} (got {lines})"
    # The same final answer each time (INVITE's 405 is retransmitted until an ACK).
    assert len(set(finals)) == 1, finals
    code, _, reason = finals[0].removeprefix("SIP/2.0 ").partition(" ")
    assert int(code) == status, finals[0]
    assert words in reason, finals[0]


def test_after_the_torture_messages_sipp_still_registers(torture: TortureResults):
    assert torture.alive_after
    assert torture.handler_errors == 0
    run = torture.registered_after
    assert run.ok, run.output[-2000:]
    assert run.statuses() == [401, 200]


def test_refresh_with_a_nonce_from_before_a_restart_is_stale_not_wrong(
    office: Office, tmp_path: Path
):
    """A phone that refreshes with its last challenge's credentials after the remote host
    restarted must hear stale=true, not 'wrong password' (which also counts toward
    blocking its address)."""
    need("sipp")
    phone = BackgroundSipp(
        "register_restart.xml",
        tmp_path,
        target=(LOOPBACK, office.sip_port),
        fields=[["2008"]],
        auth=("2008", PHONES["2008"]),
        timeout=60,
    )
    try:
        contact = contact_of("2008", phone.local_port)
        wait_for(lambda: _with_contact(office.registrations("2008"), contact), "registered")
        office.stop_remote(signal.SIGTERM)
        office.start_remote()
        # Tell SIPp the registrar is back: a MESSAGE in its call.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((LOOPBACK, 0))
            here = sock.getsockname()[1]
            sock.sendto(
                (
                    f"MESSAGE sip:2008@{LOOPBACK}:{phone.local_port} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP {LOOPBACK}:{here};branch=z9hG4bK-go-{here}\r\n"
                    "Max-Forwards: 70\r\n"
                    f"From: <sip:test@{LOOPBACK}>;tag=go\r\n"
                    f"To: <sip:2008@{LOOPBACK}>\r\n"
                    f"Call-ID: {phone.call_id()}\r\n"
                    "CSeq: 1 MESSAGE\r\n"
                    "Content-Length: 0\r\n\r\n"
                ).encode(),
                (LOOPBACK, phone.local_port),
            )
            run = phone.finish()
    finally:
        run = phone.stop()
    assert run.ok, run.messages[-3000:]
    assert run.statuses() == [401, 200, 401, 200], run.messages
    registrar = office.sip_stats()["service"]["registrar"]
    assert registrar["auth_failures"] == 0
