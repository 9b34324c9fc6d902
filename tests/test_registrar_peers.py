"""The remote host's registrar proven with real SIP peers: SIPp, baresip and sipvicious.

A main host and one office's remote host run as processes on loopback (tests/peerhelpers.py),
set up the way an operator does it; the peers are the Debian packages a phone vendor's QA would
use. What each test shows is read back from BOTH hosts' `status --json`: the remote host's
bindings and the main host's copy, which the remote host reports over the trunk (F2).

Most tests share one office (module scope) and each uses its own extension, so they do not
see each other's bindings. Password cracking blocks its source address for minutes, so that
test gets an office of its own. Waits poll with a deadline (a hang guard, never a timing
assertion); silence is judged after a later message was answered, not after a pause.

A missing peer program FAILS the test, naming the Debian package (deploy/setup.sh installs
them): a skip would hide a broken CI.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.peerhelpers import (
    LOOPBACK,
    MissingPeer,
    Office,
    SippRun,
    find_binding,
    free_port,
    free_sip_port,
    open_office,
    peer_binary,
    run_sipp,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.peer

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
    run, port = register(office, tmp_path, "2001", "not-the-password", transport=transport)
    assert run.returncode != 0
    # Challenged twice: the answer to the challenge was refused like no answer at all.
    assert run.statuses() == [401, 401], run.messages
    after = office.sip_stats()["service"]["registrar"]
    assert after["auth_failures"] == before["auth_failures"] + 1
    assert after["accepted"] == before["accepted"]
    contact = contact_of("2001", port, name)
    assert _with_contact(office.registrations("2001"), contact) is None
    remote_cli, main_cli = cli_registrations(office, "2001")
    assert contact not in [r["contact"] for r in remote_cli + main_cli]


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

    def __init__(self, workdir: Path, ext: str, password: str, registrar_port: int) -> None:
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
            f"<sip:{ext}@{LOOPBACK}:{registrar_port}>;auth_pass={password};regint=60\n"
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
    phone = Baresip(tmp_path, "2002", PHONES["2002"], office.sip_port)
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
        assert "200 OK" in info["data"] or "OK" in info["data"], info
        first = phone.trace()
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
