"""The NAT lab set up for calls: a main host, offices with a remote host and phones in their own
LAN namespaces, phone agents run from the command line, and packet captures.

Used by the call system tests (tests/test_calls_*.py). Every office k has phones k001, k002, ...
with one password; `Offices.answer`/`call` run `phoneagent` in the phone's namespace.
"""

from __future__ import annotations

import json
import subprocess
import time
from functools import partial
from pathlib import Path
from typing import Any

from labsystem import PYTHON, LabSystem, wait_until  # deploy/lab, on sys.path via labfixtures

from phoneagent.tone import dominant_frequency

PASSWORD = "correct-horse"
REMOTE_HOST = "rh"


def registered(system: LabSystem, office: int, ext: str) -> bool:
    return any(r["ext"] == ext for r in system.remote_status(office)["registrations"])


class Offices:
    """A main host, offices 1..n with a remote host and phones kEXT = k001, k002 each."""

    def __init__(self, lab: Any, workdir: Path, count: int, phones: int = 2) -> None:
        self.lab, self.workdir = lab, workdir
        self.system = LabSystem(lab, workdir)
        self.system.start_main()
        for k in range(1, count + 1):
            token = self.system.add_office(k, f"{k}000-{k}099")
            for n in range(1, phones + 1):
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

    def call_in_background(
        self, office: int, phone: int, number: str, *args: str
    ) -> subprocess.Popen[str]:
        ns, argv = self.agent_argv(office, phone, "call", number, "--json", *args)
        agent: subprocess.Popen[str] = self.lab.popen(
            ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.agents.append(agent)
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


class Capture:
    """tshark on one interface of one namespace, for counting what crossed it."""

    def __init__(self, lab: Any, ns: str, interface: str, path: Path) -> None:
        self.lab, self.path = lab, path
        self.proc: subprocess.Popen[str] = lab.popen(
            ns,
            ["tshark", "-n", "-q", "-i", interface, "-f", "udp", "-w", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        # tshark says "Capturing on ..." once packets are being captured.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if "Capturing on" in line or not line:
                break
        assert self.proc.poll() is None, "tshark did not start"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def count(self, display_filter: str) -> int:
        result = subprocess.run(
            ["tshark", "-n", "-r", str(self.path), "-Y", display_filter],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return len([line for line in result.stdout.splitlines() if line.strip()])


SIGNALLING = "udp.port == 5060 || udp.port == 3478 || udp.port == 3479"


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


# --- phones driven through the Python API (phoneagent.phone), for what the CLI cannot do ------

# Run as `python -c PHONE_SCRIPT ROLE SERVER EXT PASSWORD LOCAL_IP [NUMBER]` in a phone's
# namespace; prints one JSON object on stdout (the call's statistics and what the role saw).
#   ring:   take one call, ring (180) and never answer; report how the call ended.
#   cancel: call NUMBER, give up once it rings (CANCEL); report how the call ended.
#   hold:   call NUMBER, talk, hold (re-INVITE sendonly), resume; packets received per phase.
#   talk:   call NUMBER, talk SECONDS; samples of (time.monotonic(), packets received so far).
PHONE_SCRIPT = r"""
import json, sys, time
import trio
from phoneagent.phone import CallFailedError, open_phone

role, server, ext, password, local_ip, *rest = sys.argv[1:]


async def received(call):
    return call.stats().packets_received


async def grow(call, packets, guard):
    start = await received(call)
    with trio.fail_after(guard):
        while await received(call) < start + packets:
            await trio.sleep(0.05)


async def main():
    out = {}
    async with open_phone(ext=ext, password=password, server=server, local_ip=local_ip) as phone:
        print("registered", file=sys.stderr, flush=True)
        if role == "ring":
            with trio.fail_after(120):
                call = await phone.next_call()
            await call.ring()
            out["rang"] = True
            with trio.fail_after(120):
                await call.wait_ended()
        elif role == "cancel":
            call = await phone.call(rest[0], tone=440)
            with trio.fail_after(30):
                while 180 not in call.progress and not call.ended:
                    await trio.sleep(0.02)
            out["progress"] = list(call.progress)
            await call.hangup()
        elif role == "hold":
            call = await phone.call(rest[0], tone=440)
            with trio.fail_after(30):
                await call.wait_answered()
            await grow(call, 100, 20)
            out["before_hold"] = await received(call)
            await call.hold()
            # What was on its way when the re-INVITE was answered arrives in the next moments.
            await trio.sleep(0.5)
            held_at = await received(call)
            await trio.sleep(2)
            out["while_held"] = await received(call) - held_at
            await call.resume()
            resumed_at = await received(call)
            await grow(call, 100, 10)
            out["after_resume"] = await received(call) - resumed_at
            await call.hangup()
        elif role == "talk":
            call = await phone.call(rest[0], tone=440)
            with trio.fail_after(30):
                await call.wait_answered()
            samples = []
            with trio.move_on_after(float(rest[1])):
                while not call.ended:
                    samples.append((time.monotonic(), await received(call)))
                    await trio.sleep(0.1)
            out["samples"] = samples
            await call.hangup()
        else:
            raise SystemExit(f"unknown role {role}")
        out["stats"] = call.stats().to_json()
    print(json.dumps(out), flush=True)


trio.run(main)
"""


def script_in_background(
    offices: Offices, office: int, phone: int, role: str, *args: str
) -> subprocess.Popen[str]:
    """PHONE_SCRIPT as office `office`'s phone `phone` (its own extension and address)."""
    host = offices.lab.office(office).host(f"p{phone}")
    argv = [
        PYTHON, "-c", PHONE_SCRIPT, role, offices.server(office), f"{office}00{phone}",
        PASSWORD, host.address, *args,
    ]  # fmt: skip
    agent: subprocess.Popen[str] = offices.lab.popen(
        host.ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    offices.agents.append(agent)
    return agent


def ringing_phone(offices: Offices, office: int, phone: int) -> subprocess.Popen[str]:
    """A phone that rings for every call and never answers (registered when this returns)."""
    agent = script_in_background(offices, office, phone, "ring")
    wait_until(
        partial(registered, offices.system, office, f"{office}00{phone}"),
        15,
        f"{office}00{phone} registered",
    )
    return agent


def script_result(agent: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    """The JSON a PHONE_SCRIPT printed; fails with its output when it did not exit 0."""
    code, out, err = finish(agent, timeout)
    assert code == 0, f"phone script exited {code}:\n{out}\n{err}"
    return stats_of(out)
