"""F3/F5/F6 system tests: real calls with real audio between phone agents, offices behind real NAT.

Every office has its remote host ("rh") and two phones ("p1", "p2") in their own namespaces on
the office LAN. Phones are our phone agent run from the command line, as a script would; audio
is checked by the tone each side hears (each side plays its own frequency and records the
other), and by the agents' RTP statistics.
"""

from __future__ import annotations

import json
import subprocess
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from labsystem import PYTHON, LabSystem, wait_until  # deploy/lab, on sys.path via labfixtures

from phoneagent.tone import dominant_frequency
from tests.labfixtures import LabFactory

pytestmark = pytest.mark.lab
PASSWORD = "correct-horse"
REMOTE_HOST = "rh"


def registered(system: LabSystem, office: int, ext: str) -> bool:
    return any(r["ext"] == ext for r in system.remote_status(office)["registrations"])


class Offices:
    """A main host, offices 1..n with a remote host and phones kEXT = k001, k002 each."""

    def __init__(self, lab: Any, workdir: Path, count: int) -> None:
        self.lab, self.workdir = lab, workdir
        self.system = LabSystem(lab, workdir)
        self.system.start_main()
        for k in range(1, count + 1):
            token = self.system.add_office(k, f"{k}000-{k}099")
            for n in (1, 2):
                self.system.run_main("phone", "add", f"{k}00{n}", "--password", PASSWORD)
            self.system.join(k, token)
            self.system.start_remote(k)
        for k in range(1, count + 1):
            wait_until(partial(self.online, k), 20, f"office{k} online")
        self.agents: list[subprocess.Popen[str]] = []

    def online(self, office: int) -> bool:
        return bool(self.system.office_status(office)["online"])

    def server(self, office: int) -> str:
        return str(self.lab.office(office).host(REMOTE_HOST).address)

    def agent_argv(self, office: int, phone: int, *args: str) -> tuple[str, list[str]]:
        host = self.lab.office(office).host(f"p{phone}")
        argv = [
            PYTHON, "-m", "phoneagent", "--server", self.server(office),
            "--ext", f"{office}00{phone}", "--password", PASSWORD, "--local-ip", host.address,
            *args,
        ]  # fmt: skip
        return host.ns, argv

    def answer(self, office: int, phone: int, *args: str) -> subprocess.Popen[str]:
        ns, argv = self.agent_argv(office, phone, "answer", "--json", *args)
        agent: subprocess.Popen[str] = self.lab.popen(
            ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.agents.append(agent)
        wait_until(
            partial(registered, self.system, office, f"{office}00{phone}"),
            15,
            f"{office}00{phone} registered",
        )
        return agent

    def call(
        self, office: int, phone: int, number: str, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        ns, argv = self.agent_argv(office, phone, "call", number, "--json", *args)
        result: subprocess.CompletedProcess[str] = self.lab.run(
            ns, argv, capture_output=True, text=True, timeout=timeout
        )
        return result

    def stop(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.terminate()
                try:
                    agent.wait(10)
                except subprocess.TimeoutExpired:
                    agent.kill()
        self.system.stop_all()


def stats_of(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, f"no JSON statistics in the output:\n{output}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def finish(agent: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    out, err = agent.communicate(timeout=timeout)
    return agent.returncode, out, err


def assert_audio(stats: dict[str, Any], recording: Path, expected_hz: float) -> None:
    assert stats["answered"] is True
    received, lost = stats["packets_received"], stats["packets_lost"]
    assert received > 50, stats
    assert lost < 0.01 * (received + lost), f"more than 1 % lost: {stats}"
    heard = dominant_frequency(recording)
    assert heard is not None and abs(heard - expected_hz) < 25, (
        f"heard {heard} Hz, expected {expected_hz}"
    )


@pytest.mark.parametrize("different_subnets", [False, True], ids=["same-lan", "different-lans"])
def test_call_between_offices_has_audio_both_ways(
    lab_factory: LabFactory, tmp_path: Path, different_subnets: bool
) -> None:
    lab = lab_factory(2, hosts=[REMOTE_HOST, "p1"], different_subnets=different_subnets)
    offices = Offices(lab, tmp_path, 2)
    try:
        callee_wav, caller_wav = tmp_path / "callee.wav", tmp_path / "caller.wav"
        agent = offices.answer(2, 1, "--tone", "660", "--record", str(callee_wav))
        # Office 1's phone 1001 calls office 2's phone 2001.
        result = offices.call(
            1, 1, "2001", "--tone", "440", "--record", str(caller_wav), "--duration", "4"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        code, out, err = finish(agent)
        assert code == 0, out + err
        assert_audio(stats_of(result.stdout), caller_wav, 660)
        assert_audio(stats_of(out), callee_wav, 440)
        # The audio went through the main host's relay, and only authenticated packets did.
        relay = offices.system.main_status()["relay"]
        assert relay["forwarded"] > 200
    finally:
        offices.stop()
        print(offices.system.logs())
