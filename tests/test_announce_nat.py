"""F8 system tests: announcements from the main host reach real phones behind real NAT.

An office behind NAT in the lab, its remote host, and phones in their own namespaces on the
office LAN: our phone agent (which prints each MESSAGE it gets) and baresip (whose menu prints
each MESSAGE it gets; its `-s` trace shows the request). `mainhost announce` is run as an
operator would, and `mainhost announcements --json` must count what the phones showed.
Also here: a directory change made on the main host reaches the remote host within a second.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from labsystem import Process, wait_until  # deploy/lab, on sys.path via labfixtures

from tests.calllab import PASSWORD, REMOTE_HOST, Offices, registered
from tests.labfixtures import LabFactory
from tests.peerhelpers import MissingPeer, peer_binary, stop_process

pytestmark = pytest.mark.lab

TEXT = "Fire drill at 3 pm: leave by the stairs"
GUARD = 30.0  # a hang guard for one wait, never a timing assertion
BARESIP_SIP_PORT = 5062


def need(name: str) -> str:
    """The peer's path; FAIL (not skip) naming the Debian package when it is missing."""
    try:
        return peer_binary(name)
    except MissingPeer as exc:
        pytest.fail(str(exc), pytrace=False)


def agent(offices: Offices, office: int, phone: int, log: Path) -> Process:
    """A phone agent answering (not --json: it prints each MESSAGE as it comes), registered."""
    ns, argv = offices.agent_argv(office, phone, "answer", "--count", "1")
    process = Process(offices.lab, ns, argv, log)
    ext = f"{office}00{phone}"
    wait_until(lambda: registered(offices.system, office, ext), GUARD, f"agent {ext} registered")
    return process


class Baresip:
    """baresip 1.0 headless as phone `phone`. Its menu module shows a MESSAGE it receives as
    `PEER: "TEXT"` through the UI; the stdio UI prints that on stdout, and needs a stdin that
    stays open (a pipe we never write to); `-s` adds the SIP trace to the same log."""

    def __init__(self, offices: Offices, office: int, phone: int, workdir: Path) -> None:
        host = offices.lab.office(office).host(f"p{phone}")
        ext = f"{office}00{phone}"
        workdir.mkdir(parents=True)
        (workdir / "config").write_text(
            "poll_method\tepoll\n"
            f"sip_listen\t{host.address}:{BARESIP_SIP_PORT}\n"
            "module_path\t/usr/lib/baresip/modules\n"
            "module\tstdio.so\n"
            "module_tmp\taccount.so\n"
            "module_app\tmenu.so\n"
        )
        (workdir / "accounts").write_text(
            f"<sip:{ext}@{offices.server(office)}>;auth_pass={PASSWORD};regint=300\n"
        )
        self.log = workdir / "baresip.log"
        with self.log.open("wb") as out:
            self.proc: subprocess.Popen[bytes] = offices.lab.popen(
                host.ns,
                [need("baresip"), "-f", str(workdir), "-s"],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            lambda: registered(offices.system, office, ext), GUARD, f"baresip {ext} registered"
        )

    def output(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text(errors="replace"))

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, grace=10.0)
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def announce(offices: Offices, *args: str) -> str:
    """Run `mainhost announce`; the announcement's id."""
    out = offices.system.run_main("announce", *args).stdout
    match = re.search(r"announcement (\S+) stored", out)
    assert match, out
    return match.group(1)


def summary(offices: Offices, announcement_id: str) -> dict[str, Any]:
    rows = json.loads(offices.system.run_main("announcements", "--json").stdout)
    (row,) = [r for r in rows if r["id"] == announcement_id]
    result: dict[str, Any] = row
    return result


def counts(offices: Offices, announcement_id: str) -> tuple[int, int, int]:
    row = summary(offices, announcement_id)
    return row["delivered"], row["failed"], row["pending"]


@pytest.mark.peer
def test_the_agent_and_baresip_show_it_and_an_offline_phone_gets_it_when_it_registers(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(1, hosts=[REMOTE_HOST, "p1", "p2", "p3"])
    offices = Offices(lab, tmp_path, 1, phones=3)
    processes: list[Process | Baresip] = []
    try:
        processes.append(agent(offices, 1, 1, tmp_path / "agent-1001.log"))
        phone = Baresip(offices, 1, 2, tmp_path / "baresip")
        processes.append(phone)
        announcement_id = announce(offices, TEXT, "--expires", "600")
        line = f"MESSAGE from sip:announcements@{offices.server(1)}: {TEXT}"
        wait_until(lambda: line in processes[0].output(), GUARD, "the agent shows the MESSAGE")
        shown = f'sip:announcements@{offices.server(1)}: "{TEXT}"'
        wait_until(lambda: shown in phone.output(), GUARD, "baresip shows the MESSAGE")
        # baresip's trace: the request came as RFC 3428 text/plain with a Date.
        trace = phone.output()
        assert re.search(r"^MESSAGE sip:1002\S*@", trace, re.M), trace[-3000:]
        assert re.search(r"^Content-Type: text/plain", trace, re.M | re.I)
        assert re.search(r"^Date: \w{3}, \d\d \w{3} \d{4} ", trace, re.M)
        # Both phones answered 2xx, the phone that is off is pending.
        wait_until(lambda: counts(offices, announcement_id) == (2, 0, 1), GUARD, "2 delivered")
        (lyon,) = summary(offices, announcement_id)["offices"]
        assert lyon["delivered_extensions"] == ["1001", "1002"]
        assert lyon["pending_extensions"] == ["1003"]
        # The offline phone registers: it gets it, and the count goes up.
        processes.append(agent(offices, 1, 3, tmp_path / "agent-1003.log"))
        wait_until(lambda: TEXT in processes[2].output(), GUARD, "the late phone shows it")
        wait_until(lambda: counts(offices, announcement_id) == (3, 0, 0), GUARD, "3 delivered")
        status = offices.system.main_status()
        assert [a["delivered"] for a in status["announcements"]] == [3]
        # Once per phone: the agent saw it exactly once.
        assert processes[0].output().count(TEXT) == 1
    finally:
        for process in processes:
            process.stop()
        offices.stop()
        print(offices.system.logs())


def test_a_pending_delivery_survives_a_remote_host_restart(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(1, hosts=[REMOTE_HOST, "p1"])
    offices = Offices(lab, tmp_path, 1, phones=1)
    processes: list[Process] = []
    system = offices.system
    try:
        announcement_id = announce(offices, TEXT, "--office", "office1", "--expires", "600")
        wait_until(
            lambda: (
                summary(offices, announcement_id)["offices"][0]["reported"]
                and counts(offices, announcement_id) == (0, 0, 1)
            ),
            GUARD,
            "the remote host reports 1001 pending",
        )
        # The main host goes away, so it cannot send the announcement again: what the phone
        # gets after the remote host's restart comes from the remote host's own disk.
        assert system.main is not None
        system.main.stop()
        system.remotes[1].stop()
        system.remotes[1].start()
        wait_until(lambda: system.remote_status(1)["running"], GUARD, "remote host back")
        processes.append(agent(offices, 1, 1, tmp_path / "agent-1001.log"))
        wait_until(lambda: TEXT in processes[0].output(), GUARD, "the phone shows it")
        # The main host comes back and learns the outcome.
        system.start_main()
        wait_until(lambda: counts(offices, announcement_id) == (1, 0, 0), GUARD, "1 delivered")
    finally:
        for process in processes:
            process.stop()
        offices.stop()
        print(system.logs())


def test_a_phone_added_on_the_main_host_reaches_the_remote_host_within_a_second(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(1, hosts=[REMOTE_HOST])
    offices = Offices(lab, tmp_path, 1, phones=1)
    system = offices.system
    try:
        wait_until(
            lambda: system.remote_status(1)["directory"]["extensions"] == 1, GUARD, "mirrored"
        )
        system.run_main("phone", "add", "1050", "--password", PASSWORD)
        # The promise is one second; the slack covers starting `remotehost status` (a Python
        # program) in the namespace to look. A hang guard, not a measurement.
        wait_until(
            lambda: system.remote_status(1)["directory"]["extensions"] == 2,
            1.0 + 5.0,
            "the new phone in the remote host's directory",
            interval=0.05,
        )
    finally:
        offices.stop()
        print(system.logs())


def test_bad_announcements_are_one_line_and_store_nothing(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(1, hosts=[REMOTE_HOST])
    offices = Offices(lab, tmp_path, 1, phones=1)
    system = offices.system
    try:
        for args in (
            [""],
            ["hi", "--office", "nowhere"],
            ["hi", "--ext", "1999"],
            ["hi", "--expires", "0"],
            ["hi", "--expires", "-3"],
        ):
            result: subprocess.CompletedProcess[str] = system.run_main(
                "announce", *args, check=False
            )
            assert result.returncode != 0, args
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert json.loads(system.run_main("announcements", "--json").stdout) == []
    finally:
        offices.stop()
        print(system.logs())
