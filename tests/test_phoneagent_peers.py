"""The phone agent against real peers: a branchpbx remote host (registrar), SIPp UAS and UAC.

The office is started as an operator would (tests/peerhelpers.py: `mainhost init`, `office
add`, `remotehost join`, `serve`); registration and unregistration are read back from
`remotehost status --json`. SIPp runs its built-in scenarios (`-sn uas`, `-sn uac`), which
carry no RTP: those tests check signalling and SIPp's exit status.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from phoneagent.phone import RegistrationError, open_phone
from tests.peerhelpers import (
    LOOPBACK,
    MissingPeer,
    Office,
    free_sip_port,
    open_office,
    peer_binary,
    stop_process,
    wait_for,
)

PHONES = {"2001": "alpha-secret", "2002": "bravo-secret"}
GUARD = 60.0


def need(name: str) -> str:
    try:
        return peer_binary(name)
    except MissingPeer as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def office(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Office]:
    # OPTIONS keepalives every second, so the agent's answers to them show quickly.
    with open_office(tmp_path_factory.mktemp("office"), PHONES, keepalive_interval=1.0) as running:
        yield running


def bindings(office: Office, ext: str) -> list[str]:
    """The contacts of `ext` as `remotehost status --json` shows them."""
    status = office.remote_status_cli()
    return [r["contact"] for r in status.get("registrations") or [] if r["ext"] == ext]


async def test_registers_and_unregisters_with_the_remote_host(office: Office) -> None:
    server = f"{LOOPBACK}:{office.sip_port}"
    with trio.fail_after(GUARD):
        async with open_phone(ext="2001", password=PHONES["2001"], server=server) as phone:
            assert phone.ua.registered
            contacts = await trio.to_thread.run_sync(bindings, office, "2001")
            assert any(f"@{LOOPBACK}:{phone.port}" in c for c in contacts), contacts
            port = phone.port
        contacts = await trio.to_thread.run_sync(bindings, office, "2001")
    assert not any(f":{port}" in c for c in contacts), contacts


async def test_wrong_password_is_refused(office: Office) -> None:
    server = f"{LOOPBACK}:{office.sip_port}"
    with trio.fail_after(GUARD), pytest.raises(RegistrationError) as refused:
        async with open_phone(ext="2002", password="not-it", server=server):
            pass
    assert refused.value.status in (401, 403)
    assert "registration failed" in str(refused.value)


def test_cli_wrong_password_is_one_clear_line(office: Office) -> None:
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "phoneagent", "--server", f"{LOOPBACK}:{office.sip_port}",
         "--ext", "2002", "--password", "wrong", "call", "2001"],
        capture_output=True, text=True, timeout=GUARD, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "registration failed: 40" in errors[0]


def start_uas(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """SIPp's built-in UAS for one call on `port` (stopped by the caller)."""
    argv = [need("sipp"), "-sn", "uas", "-p", str(port), "-i", LOOPBACK, "-m", "1",
            "-nostdin", "-timeout", "30s", "-timeout_error", "-trace_msg", "-message_file",
            str(workdir / "uas.messages")]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_bound(port: int) -> None:
    """Until someone (SIPp) holds UDP `port` on loopback."""

    def taken() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                return True
            return False

    wait_for(taken, f"SIPp to bind port {port}")


def run_uac(argv: list[str], workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=workdir, capture_output=True, text=True, timeout=GUARD, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


async def test_sipp_uas_answers_a_call_from_the_agent(tmp_path: Path) -> None:
    port = free_sip_port()
    process = start_uas(port, tmp_path)
    try:
        await trio.to_thread.run_sync(wait_bound, port)
        with trio.fail_after(GUARD):
            async with open_phone(ext="2001") as phone:
                call = await phone.call(f"sip:service@{LOOPBACK}:{port}", tone=440)
                await call.wait_answered()
                assert 180 in call.progress
                await trio.sleep(1.0)
                stats = await call.hangup()
            status = await trio.to_thread.run_sync(process.wait, 30)
    finally:
        stop_process(process)
    assert status == 0, (tmp_path / "uas.messages").read_text(errors="replace")[-3000:]
    assert stats.answered and stats.codec == "PCMU" and stats.packets_sent > 0
    trace = (tmp_path / "uas.messages").read_text(errors="replace")
    assert "ACK sip:" in trace and "BYE sip:" in trace


async def test_sipp_uac_gets_answered_by_the_agent(tmp_path: Path) -> None:
    sipp = need("sipp")
    with trio.fail_after(GUARD):
        async with open_phone(ext="2002") as phone:
            port = free_sip_port()
            argv = [sipp, f"{LOOPBACK}:{phone.port}", "-sn", "uac", "-s", "2002", "-p", str(port),
                    "-i", LOOPBACK, "-m", "1", "-nostdin", "-timeout", "30s", "-timeout_error",
                    "-trace_msg", "-message_file", str(tmp_path / "uac.messages")]  # fmt: skip

            async def answer() -> None:
                call = await phone.next_call()
                await call.ring()
                await call.answer(tone=880, record=tmp_path / "heard.wav")
                await call.wait_ended()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer)
                result = await trio.to_thread.run_sync(run_uac, argv, tmp_path)
    trace = (tmp_path / "uac.messages").read_text(errors="replace")
    assert result.returncode == 0, trace[-3000:]
    assert "SIP/2.0 180 Ringing" in trace and "SIP/2.0 200 OK" in trace
    assert "a=sendrecv" in trace  # our SDP answer


def test_cli_agent_registers_and_unregisters_on_sigterm(office: Office) -> None:
    import re
    import signal
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "phoneagent", "--server", f"{LOOPBACK}:{office.sip_port}",
         "--ext", "2002", "--password", PHONES["2002"], "answer"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.search(r"listening on sip:2002@127\.0\.0\.1:(\d+) \(registered", line)
        assert match, line
        port = match.group(1)
        assert any(f":{port}" in c for c in bindings(office, "2002"))
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=GUARD)
    finally:
        stop_process(process)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert not any(f":{port}" in c for c in bindings(office, "2002"))


def wait_pings_answered(office: Office, more: int) -> None:
    """Until the remote host has had `more` of its OPTIONS pings answered from now on."""

    def answered() -> int:
        return int(office.sip_stats()["service"]["pings_answered"])

    before = answered()
    wait_for(lambda: answered() >= before + more, f"{more} keepalive pings answered")


async def test_two_agents_in_one_process_register_and_answer_keepalives(office: Office) -> None:
    """Both bindings at once, each staying reachable: the remote host's OPTIONS pings get
    the agents' 200s."""
    server = f"{LOOPBACK}:{office.sip_port}"
    with trio.fail_after(GUARD):
        async with (
            open_phone(ext="2001", password=PHONES["2001"], server=server) as first,
            open_phone(ext="2002", password=PHONES["2002"], server=server) as second,
        ):
            await trio.to_thread.run_sync(wait_pings_answered, office, 4)
            registrations = await trio.to_thread.run_sync(office.registrations)
            ours = {
                r["ext"]: r
                for r in registrations
                if r["contact"].endswith((f":{first.port}", f":{second.port}"))
            }
            assert set(ours) == {"2001", "2002"}
            assert all(r["reachable"] for r in ours.values())
