"""F15 system tests: call records in the NAT lab, with phone agents and real remote hosts.

No record is lost: calls inside an office made while the WAN is cut, with the remote host killed
(SIGKILL) in the middle of a call, all reach the main host once the WAN is back, each exactly
once. A call between offices is one record with both offices' views.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from labsystem import wait_until  # deploy/lab, on sys.path via labfixtures

from tests.calllab import REMOTE_HOST, Offices, finish, stats_of
from tests.labfixtures import LabFactory

pytestmark = pytest.mark.lab


def main_calls(offices: Offices, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(offices.system.run_main("calls", "--json", *args).stdout)
    return result


def remote_running(offices: Offices, office: int) -> bool:
    result = offices.system.run_remote(office, "status", "--json", check=False)
    return result.returncode == 0 and bool(json.loads(result.stdout).get("running"))


def connected_calls(offices: Offices, office: int) -> int:
    calls = offices.system.remote_status(office)["calls"]
    return len([c for c in calls if c["state"] == "connected"])


def test_no_record_is_lost_across_a_wan_cut_and_a_kill_9(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(1, hosts=[REMOTE_HOST, "p1", "p2", "p3"])
    offices = Offices(lab, tmp_path, 1, phones=3)
    made: list[dict[str, Any]] = []  # what the calling phone saw of each call it made
    try:
        lab.office(1).cut_wan()
        wait_until(lambda: not offices.system.remote_status(1)["online"], 10, "WAN cut noticed")
        # Before the crash: 4 short calls answered, 1 refused (no such extension), then a long
        # call that is up when the remote host is killed.
        before = offices.answer(1, 2, "--count", "5", "--duration", "6")
        for _ in range(4):
            result = offices.call(1, 1, "1002", "--duration", "0.5", timeout=30)
            assert result.returncode == 0, result.stdout + result.stderr
            made.append(stats_of(result.stdout))
        refused = offices.call(1, 1, "1098", "--duration", "0.5", timeout=30)
        assert refused.returncode != 0
        made.append(stats_of(refused.stdout))
        long_call = offices.call_in_background(1, 1, "1002", "--duration", "4")
        wait_until(lambda: connected_calls(offices, 1) == 1, 15, "the long call is up")
        offices.system.remotes[1].stop(signal.SIGKILL)
        _, out, _ = finish(long_call, timeout=40)
        made.append(stats_of(out))
        finish(before, timeout=40)
        # After the restart (the WAN still cut): 4 more calls to another phone.
        offices.system.remotes[1].start()
        wait_until(lambda: remote_running(offices, 1), 20, "remote host running again")
        after = offices.answer(1, 3, "--count", "4")
        for _ in range(4):
            result = offices.call(1, 1, "1003", "--duration", "0.5", timeout=30)
            assert result.returncode == 0, result.stdout + result.stderr
            made.append(stats_of(result.stdout))
        finish(after, timeout=30)
        status = offices.system.remote_status(1)["call_records"]
        assert status["pending"] > 0  # nothing could be uploaded yet
        # Nothing reached the main host while the WAN was cut.
        assert main_calls(offices)["calls"] == []
        lab.office(1).restore_wan()
        wait_until(lambda: offices.online(1), 30, "office back online")
        wait_until(
            lambda: offices.system.remote_status(1)["call_records"]["pending"] == 0,
            30,
            "every record acknowledged",
        )
        found = main_calls(offices)
    finally:
        offices.stop()
        print(offices.system.logs())
    calls = found["calls"]
    # Exactly the calls that were made: none missing, none twice.
    assert len(made) == 10
    assert len(calls) == len(made), json.dumps(calls, indent=1)
    assert len({c["id"] for c in calls}) == len(calls)
    assert all(c["state"] == "ended" and c["offices"] == ["office1"] for c in calls)
    assert all(c["route"] == "local" and c["caller"] == "1001" for c in calls)
    answered = [c for c in calls if c["answered_at"] is not None]
    assert len(answered) == len([m for m in made if m["answered"]]) == 9
    assert [c["status"] for c in calls if c["callee"] == "1098"] == [404]
    # The call the crash cut short was ended by the restart, in the new boot epoch.
    (cut,) = [c for c in calls if c["status"] == 500]
    assert cut["callee"] == "1002" and cut["answered_at"] is not None
    # Two boot epochs, each complete: no gap.
    assert len(found["gaps"]) == 2
    assert all(g["missing"] == [] for g in found["gaps"])
    assert sum(g["stored"] for g in found["gaps"]) == sum(g["highest"] for g in found["gaps"])


def test_a_call_between_offices_is_one_record_with_both_offices(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1"])
    offices = Offices(lab, tmp_path, 2, phones=1)
    try:
        agent = offices.answer(2, 1)
        result = offices.call(1, 1, "2001", "--duration", "2")
        assert result.returncode == 0, result.stdout + result.stderr
        code, out, err = finish(agent)
        assert code == 0, out + err
        # A call the main host refuses (no such phone in office 2) is a record too.
        refused = offices.call(1, 1, "2050", "--duration", "1", timeout=30)
        assert refused.returncode != 0

        def settled() -> list[dict[str, Any]]:
            calls: list[dict[str, Any]] = main_calls(offices)["calls"]
            relayed = [c for c in calls if c["offices"] == ["office1", "office2"]]
            done = len(calls) == 2 and relayed and relayed[0]["state"] == "ended"
            return calls if done else []

        calls = wait_until(settled, 30, "both calls recorded")
        csv_file = tmp_path / "calls.csv"
        offices.system.run_main("calls", "--csv", str(csv_file))
    finally:
        offices.stop()
        print(offices.system.logs())
    answered, refusal = calls
    assert answered["callee"] == "2001" and answered["caller"] == "1001"
    assert answered["route"] == "relayed"
    assert answered["offices"] == ["office1", "office2"]  # one record, both offices' views
    assert answered["views"] == {"office1": "outbound", "office2": "inbound"}
    assert answered["status"] == 0 and answered["duration"] > 1
    assert refusal["callee"] == "2050" and refusal["status"] == 404
    assert refusal["offices"] == ["office1"]
    lines = csv_file.read_text().splitlines()
    assert lines[0].startswith("id,state,caller") and len(lines) == 3
