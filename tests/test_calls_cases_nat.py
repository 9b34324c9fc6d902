"""F3/F5 system tests: every way a call can end, with phone agents behind real NAT.

One lab holds the failure cases and the mid-call features, inside an office (1001 calls 100N,
phone to phone on the LAN) and between offices (1001 calls 200N, through both remote hosts'
media anchors, by the main host's relay or directly, F4); the cases use different extensions,
so they run side by side. Each office's phones have one role each:

    p1 caller     p2 busy (486)     p3 rings, never answers (480 after the no-answer timeout)
    p4 never registered (480)       p5 rings until cancelled      p6 talks: DTMF, hold

Every failure is checked for its status and its reason text, where the caller sees it (the
agent's JSON and its one-line error) and, where there is one, on the called phone. A second
lab gives office 1 a new public address in the middle of a call (F9).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from labsystem import wait_until  # deploy/lab, on sys.path via labfixtures

from tests.calllab import (
    REMOTE_HOST,
    Offices,
    assert_audio,
    finish,
    ringing_phone,
    script_in_background,
    script_result,
    stats_of,
)
from tests.labfixtures import LabFactory

pytestmark = pytest.mark.lab

CALLER, BUSY, NO_ANSWER, UNREGISTERED, CANCELLED, TALKER = 1, 2, 3, 4, 5, 6
# remotehost.toml's calls.no_answer_timeout, shortened for the test (60 s by default).
NO_ANSWER_TIMEOUT = 12.0


def ext(office: int, phone: int) -> str:
    return f"{office}00{phone}"


def assert_failed(result: Any, status: int, reason: str) -> dict[str, Any]:
    """The caller's agent exited 1, its JSON says `status` and its error line the reason."""
    out, err = result.stdout, result.stderr
    assert result.returncode == 1, f"exit {result.returncode}:\n{out}\n{err}"
    stats = stats_of(out)
    assert stats["answered"] is False, stats
    assert stats["status"] == status, stats
    assert reason in stats["reason"], stats
    assert f"call failed: {status} " in err and reason in err, err
    return stats


def test_every_way_a_call_ends(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory(2, hosts=[REMOTE_HOST, *(f"p{n}" for n in range(1, 7))])
    offices = Offices(
        lab, tmp_path, 2, phones=6, remote_settings={"no_answer_timeout": str(NO_ANSWER_TIMEOUT)}
    )
    try:
        # No answer: the remote host gives up on ringing after its timeout, so these calls are
        # started first and checked last.
        never_answers = {k: ringing_phone(offices, k, NO_ANSWER) for k in (1, 2)}
        no_answer_calls = {
            k: offices.call_in_background(1, CALLER, ext(k, NO_ANSWER)) for k in (1, 2)
        }
        for k in (1, 2):
            quick_cases(offices, tmp_path, k)
        for k in (1, 2):
            code, out, err = finish(no_answer_calls[k], timeout=NO_ANSWER_TIMEOUT + 40)
            assert code == 1, out + err
            stats = stats_of(out)
            assert stats["status"] == 480 and "No answer" in stats["reason"], stats
            assert "480" in err and "No answer" in err, err
            # The phone stops ringing: the remote host cancelled it.
            rang = script_result(never_answers[k])
            assert rang["stats"]["answered"] is False, rang
            assert rang["stats"]["status"] == 487, rang
    finally:
        offices.stop()
        print(offices.system.logs())


def quick_cases(offices: Offices, tmp_path: Path, k: int) -> None:
    """Office 1's caller against office `k`'s phones (k = 1: inside the office)."""
    busy = offices.answer(k, BUSY, "--busy")
    cancelled_phone = ringing_phone(offices, k, CANCELLED)
    talker = offices.answer(k, TALKER, "--count", "2", "--tone", "660", "--dtmf", "9*0")

    # An extension nobody has: 404, said by the office that owns the number range.
    unknown = offices.call(1, CALLER, f"{k}050", timeout=40)
    assert_failed(unknown, 404, "Not Found")

    # A known extension with no phone registered: 480, saying so.
    absent = offices.call(1, CALLER, ext(k, UNREGISTERED), timeout=40)
    assert_failed(absent, 480, "not registered")

    # Busy: the phone's 486 reaches the caller.
    refused = offices.call(1, CALLER, ext(k, BUSY), timeout=40)
    assert_failed(refused, 486, "Busy")
    code, out, err = finish(busy)
    assert code == 0, out + err
    assert stats_of(out)["status"] == 486

    # Cancel: the caller gives up while the phone rings; the phone stops ringing with 487.
    caller = script_in_background(offices, 1, CALLER, "cancel", ext(k, CANCELLED))
    gave_up = script_result(caller)
    assert 180 in gave_up["progress"], gave_up
    assert gave_up["stats"]["answered"] is False, gave_up
    assert gave_up["stats"]["status"] == 487, gave_up
    rang = script_result(cancelled_phone)
    assert rang["rang"] is True
    assert rang["stats"]["answered"] is False, rang
    assert rang["stats"]["status"] == 487, rang
    assert "Terminated" in rang["stats"]["reason"], rang

    # DTMF both ways (RFC 4733 in the RTP stream, through both anchors between offices).
    dtmf_wav = tmp_path / f"dtmf-{k}.wav"
    dtmf = offices.call(
        1, CALLER, ext(k, TALKER), "--tone", "440", "--record", str(dtmf_wav),
        "--dtmf", "1234#", "--duration", "4",
    )  # fmt: skip
    assert dtmf.returncode == 0, dtmf.stdout + dtmf.stderr
    caller_stats = stats_of(dtmf.stdout)
    assert caller_stats["dtmf_sent"] == "1234#", caller_stats
    assert caller_stats["dtmf_received"] == "9*0", caller_stats
    assert_audio(caller_stats, dtmf_wav, 660)

    # Hold and resume: the re-INVITE with sendonly passes through; audio stops and comes back.
    holder = script_in_background(offices, 1, CALLER, "hold", ext(k, TALKER))
    held = script_result(holder)
    assert held["before_hold"] >= 100, held
    assert held["while_held"] <= 5, held
    assert held["after_resume"] >= 100, held
    assert held["stats"]["answered"] is True, held

    code, out, err = finish(talker, timeout=40)
    assert code == 0, out + err
    talked = [stats_of(line) for line in out.splitlines() if line.startswith("{")]
    assert len(talked) == 2, out
    assert talked[0]["dtmf_received"] == "1234#", talked[0]
    assert talked[0]["dtmf_sent"] == "9*0", talked[0]


def finished_calls(offices: Offices) -> list[dict[str, Any]]:
    calls = json.loads(offices.system.run_main("calls", "--json").stdout)["calls"]
    return [c for c in calls if c["answered_at"] and c["ended_at"]]


def test_call_survives_a_new_public_address(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1"])
    offices = Offices(lab, tmp_path, 2, phones=1)
    try:
        callee = offices.answer(2, 1, "--tone", "660")
        caller = script_in_background(offices, 1, 1, "talk", "2001", "14")
        # Talk a while, then office 1's router gets a new public address (F9).
        time.sleep(6)
        old = offices.system.office_status(1)["public_address"]
        new = lab.office(1).new_public_address()
        changed_at = time.monotonic()
        # The trunk logs in again from the new address.
        wait_until(
            lambda: offices.system.office_status(1)["public_address"] == new,
            15,
            "office 1 logged in from its new address",
        )
        assert new != old
        talk = script_result(caller)
        code, out, err = finish(callee)
        assert code == 0, out + err
        # The call stays one call in the records across the re-login (F9, F15).
        finished = wait_until(
            lambda: finished_calls(offices) or None, 20, "the call's record at the main host"
        )
        assert len(finished) == 1, finished
        assert finished[0]["status"] == 0 and finished[0]["route"] == "relayed", finished
    finally:
        offices.stop()
        print(offices.system.logs())
    samples = talk["samples"]
    before = max(n for t, n in samples if t <= changed_at)
    last = samples[-1][1]
    resumed = [t for t, n in samples if t > changed_at and n > before + 10]
    gap = resumed[0] - changed_at if resumed else None
    print(f"packets received: {before} before the change, {last} at the end; gap {gap} s")
    # The issue: audio resumes on its own within 2 s (one second more for sampling it).
    assert gap is not None and gap < 3.0, samples
    # The caller keeps hearing the far office after its address changed ...
    assert before >= 100, samples
    assert last - before >= 200, (before, last, talk["stats"])
    # ... and so does the callee (both streams started together, so it had about as many
    # before the change); loss is about the gap, not the rest of the call.
    callee_stats = stats_of(out)
    assert callee_stats["packets_received"] >= before + 200, (before, callee_stats)
    assert talk["stats"]["packets_lost"] < 200, talk["stats"]
    assert callee_stats["packets_lost"] < 200, callee_stats
