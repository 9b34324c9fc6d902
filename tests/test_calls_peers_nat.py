"""F3/F5 system tests with real SIP phones: baresip and SIPp place and take calls behind real NAT.

Our own phone agent proving our own remote host would prove little on its own, so here the
phones are Debian's peers (STYLE.md: a feature that real phones would use is proven with a real
phone), each in its own phone namespace on an office LAN:

- baresip registers with digest auth and talks with a phone agent in the other office, both
  ways of calling: each side plays its own tone and records the other, so the audio is checked
  by the frequency each side heard, and the agent's RTP statistics say how much was lost.
- SIPp completes calls with scenarios of its own (tests/sipp/call_uac.xml answers the 407 with
  digest credentials; tests/sipp/call_uas.xml answers after registering with
  tests/sipp/register_auth.xml), inside one office and between offices; both SIPp runs exit 0.

A missing peer program FAILS the test, naming the Debian package (deploy/setup.sh installs
them): a skip would hide a broken CI.
"""

from __future__ import annotations

import re
import subprocess
from functools import partial
from pathlib import Path

import pytest
from labsystem import wait_until  # deploy/lab, on sys.path via labfixtures

from phoneagent.audio import write_wav
from phoneagent.tone import ToneGenerator, dominant_frequency
from tests.calllab import (
    PASSWORD,
    REMOTE_HOST,
    LabBaresip,
    Offices,
    assert_audio,
    finish,
    registered,
    sipp_in_lab,
    stats_of,
)
from tests.labfixtures import LabFactory
from tests.peerhelpers import SIPP_DIR, MissingPeer, peer_binary, stop_process, write_injection

pytestmark = [pytest.mark.lab, pytest.mark.peer]

BARESIP_HZ, AGENT_HZ = 1000, 660


def need(name: str) -> str:
    """The peer's path; FAIL (not skip) naming the Debian package when it is missing."""
    try:
        return peer_binary(name)
    except MissingPeer as exc:
        pytest.fail(str(exc), pytrace=False)


def tone_wav(path: Path, hz: float, seconds: float) -> Path:
    tone = ToneGenerator(hz)
    write_wav(path, b"".join(tone.frame() for _ in range(int(seconds * 50))))
    return path


def assert_heard(recording: Path, expected_hz: float) -> None:
    heard = dominant_frequency(recording)
    assert heard is not None and abs(heard - expected_hz) < 25, (
        f"{recording.name}: heard {heard} Hz, expected {expected_hz}"
    )


def test_baresip_and_the_agent_talk_between_offices_both_ways(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    binary = need("baresip")
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1"])
    offices = Offices(lab, tmp_path, 2, phones=1)
    # baresip's aufile source stops at the end of the file: longer than both calls.
    source = tone_wav(tmp_path / "baresip-plays.wav", BARESIP_HZ, 60)
    baresip = LabBaresip(binary, offices, 1, 1, source, tmp_path / "baresip")
    try:
        # It registered with digest auth (MD5, what the remote host offers by default).
        registration = next(
            r for r in offices.system.remote_status(1)["registrations"] if r["ext"] == "1001"
        )
        assert registration["user_agent"].startswith("baresip"), registration
        trace = baresip.output()
        challenge = re.search(r"^WWW-Authenticate: Digest (.*)$", trace, re.M)
        assert challenge is not None and "algorithm=MD5" in challenge[1], trace[-3000:]
        assert 'Authorization: Digest username="1001"' in trace

        # baresip calls the agent in the other office; the agent hangs up after 4 s.
        first_wav = tmp_path / "agent-heard-1.wav"
        agent = offices.answer(
            2, 1, "--tone", str(AGENT_HZ), "--record", str(first_wav), "--duration", "4"
        )
        answer = baresip.command("dial", "2001")
        assert answer["ok"], answer
        code, out, err = finish(agent)
        assert code == 0, out + err
        assert_audio(stats_of(out), first_wav, BARESIP_HZ)
        baresip.wait_calls_ended(1)
        assert len(baresip.recordings()) == 1, baresip.recordings()
        assert_heard(baresip.recordings()[0], AGENT_HZ)

        # The agent calls baresip (which answers at once) and hangs up after 4 s.
        second_wav = tmp_path / "agent-heard-2.wav"
        result = offices.call(
            2, 1, "1001", "--tone", str(AGENT_HZ), "--record", str(second_wav), "--duration", "4"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert_audio(stats_of(result.stdout), second_wav, BARESIP_HZ)
        baresip.wait_calls_ended(2)
        recordings = baresip.recordings()
        assert len(recordings) == 2, recordings
        assert_heard(recordings[1], AGENT_HZ)
    finally:
        baresip.stop()
        offices.stop()
        print(baresip.output()[-3000:])
        print(offices.system.logs())


def no_calls(offices: Offices, office: int) -> bool:
    return not offices.system.remote_status(office)["calls"]


def test_sipp_calls_inside_an_office_and_between_offices(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    binary = need("sipp")
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1", "p2"])
    offices = Offices(lab, tmp_path, 2, phones=2)
    uac_xml, uas_xml, register_xml = (
        SIPP_DIR / name for name in ("call_uac.xml", "call_uas.xml", "register_auth.xml")
    )
    running: list[subprocess.Popen[bytes]] = []

    def sipp(office: int, phone: int, scenario: Path, *args: str, target: bool = True) -> int:
        """Run SIPp to its end; its exit status."""
        process = sipp_in_lab(
            binary, offices, office, phone, scenario, tmp_path / "sipp", *args, target=target
        )
        running.append(process)
        return process.wait(60)

    def trace(scenario: str, ext: str) -> str:
        return (tmp_path / "sipp" / f"{scenario}-{ext}.messages").read_text(errors="replace")

    try:
        # Two phones that answer: 1002 (office 1) and 2002 (office 2), SIPp UASs registered
        # from the address and port they answer on.
        for office in (1, 2):
            ext = f"{office}002"
            fields = write_injection(tmp_path / f"register-{ext}.csv", [[ext]])
            status = sipp(office, 2, register_xml, "-au", ext, "-ap", PASSWORD, "-inf", str(fields))
            assert status == 0, trace("register_auth", ext)
            wait_until(partial(registered, offices.system, office, ext), 10, f"{ext} registered")
        for callee in ("1002", "2002"):
            office = int(callee[0])
            uas = sipp_in_lab(
                binary, offices, office, 2, uas_xml, tmp_path / "sipp", "-aa", target=False
            )
            running.append(uas)
            # 1001 (SIPp, not registered: an INVITE is authenticated on its own) calls.
            status = sipp(1, 1, uac_xml, "-s", callee, "-key", "caller", "1001",
                          "-au", "1001", "-ap", PASSWORD,
                          "-auth_uri", f"{callee}@{offices.server(1)}:5060")  # fmt: skip
            assert status == 0, trace("call_uac", "1001")
            assert uas.wait(30) == 0, trace("call_uas", callee)
            caller_saw = trace("call_uac", "1001")
            assert "SIP/2.0 407" in caller_saw and "Proxy-Authorization: Digest" in caller_saw
            callee_saw = trace("call_uas", callee)
            assert "INVITE sip:" in callee_saw and "BYE sip:" in callee_saw
        # Nothing is left of either call at the remote hosts.
        for office in (1, 2):
            wait_until(partial(no_calls, offices, office), 10, f"office {office}: calls ended")
    finally:
        for process in running:
            stop_process(process)
        offices.stop()
        print(offices.system.logs())
