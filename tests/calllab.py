"""The NAT lab set up for calls: a main host, offices with a remote host and phones in their own
LAN namespaces, phone agents run from the command line, and packet captures.

Used by the call system tests (tests/test_calls_*.py). Every office k has phones k001, k002, ...
with one password; `Offices.answer`/`call` run `phoneagent` in the phone's namespace.

What the command line cannot do (give up while it rings, hold mid-call, sample the packets
received during a call) runs through the phone agent's Python API in `PHONE_SCRIPT`
(`script_in_background`, `ringing_phone`, `script_result`). Real peers in a phone's namespace:
`LabBaresip` (baresip driven over ctrl_tcp) and `sipp_in_lab`.
"""

from __future__ import annotations

import json
import re
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

    def __init__(
        self,
        lab: Any,
        workdir: Path,
        count: int,
        phones: int = 2,
        remote_settings: dict[str, str] | None = None,
    ) -> None:
        self.lab, self.workdir = lab, workdir
        self.system = LabSystem(lab, workdir)
        self.system.start_main()
        for k in range(1, count + 1):
            token = self.system.add_office(k, f"{k}000-{k}099")
            for n in range(1, phones + 1):
                self.system.run_main("phone", "add", f"{k}00{n}", "--password", PASSWORD)
            self.system.join(k, token)
            self.set_remote_settings(k, remote_settings or {})
            self.system.start_remote(k)
        for k in range(1, count + 1):
            wait_until(partial(self.online, k), 20, f"office{k} online")
        self.agents: list[subprocess.Popen[str]] = []

    def set_remote_settings(self, office: int, settings: dict[str, str]) -> None:
        """Change `key = value` lines of the office's remotehost.toml (keys are unique there)."""
        path = self.system.remote_data(office) / "remotehost.toml"
        text = path.read_text()
        for key, value in settings.items():
            text, found = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text)
            assert found == 1, f"{key} is not a remotehost.toml key"
        path.write_text(text)

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


# --- real SIP peers in a phone's namespace --------------------------------------------------

# One ctrl_tcp command to baresip (a JSON object in a netstring, its answer the same way); run
# with `python -c` inside the phone's namespace, where baresip's control port is.
_BARESIP_COMMAND = r"""
import json, socket, sys
port, command, params = int(sys.argv[1]), sys.argv[2], sys.argv[3]
body = json.dumps({"command": command, "params": params, "token": "t"}).encode()
with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
    sock.sendall(b"%d:%s," % (len(body), body))
    data = b""
    while True:
        length, colon, rest = data.partition(b":")
        if colon and len(rest) > int(length):
            answer = json.loads(rest[: int(length)])
            if answer.get("response"):
                print(json.dumps(answer))
                break
            data = rest[int(length) + 1 :]
            continue
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit(f"baresip closed ctrl_tcp; got {data!r}")
        data += chunk
"""

BARESIP_SIP_PORT = 5070  # in the phone's own namespace: nobody else binds there
BARESIP_CTRL_PORT = 4444  # on that namespace's loopback


class LabBaresip:
    """baresip (1.0.0, Debian's baresip-core) headless as office `office`'s phone `phone`.

    It registers with digest auth, answers every call at once (answermode=auto), plays
    `source` (a WAV file, through the aufile module) and records what it hears: the sndfile
    filter writes `dump-<time>-dec.wav` (received) and `-enc.wav` (sent) per call in `dir`.
    baresip 1.0.0's aufile is an audio source only (no `audio_player aufile,FILE` yet), and no
    player is needed: the decoded audio passes the sndfile filter before the (absent) player.
    """

    def __init__(
        self, binary: str, offices: Offices, office: int, phone: int, source: Path, dir: Path
    ) -> None:
        self.lab, self.ext = offices.lab, f"{office}00{phone}"
        self.host = offices.lab.office(office).host(f"p{phone}")
        self.dir = dir
        dir.mkdir(parents=True)
        (dir / "config").write_text(
            "poll_method\tepoll\n"
            f"sip_listen\t{self.host.address}:{BARESIP_SIP_PORT}\n"
            f"audio_source\taufile,{source}\n"
            "module_path\t/usr/lib/baresip/modules\n"
            "module\tg711.so\n"
            "module\taufile.so\n"
            "module\tsndfile.so\n"
            "module\tctrl_tcp.so\n"
            "module_tmp\taccount.so\n"
            "module_app\tmenu.so\n"
            f"ctrl_tcp_listen\t127.0.0.1:{BARESIP_CTRL_PORT}\n"
            f"snd_path\t{dir}\n"
        )
        (dir / "accounts").write_text(
            f"<sip:{self.ext}@{offices.server(office)}>;auth_pass={PASSWORD};regint=300"
            ";answermode=auto\n"
        )
        self.log = dir / "baresip.log"
        with self.log.open("wb") as out:
            self.proc: subprocess.Popen[bytes] = self.lab.popen(
                self.host.ns,
                [binary, "-f", str(dir), "-s"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until(partial(registered, offices.system, office, self.ext), 15, f"baresip {self.ext}")

    def output(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text(errors="replace"))

    def command(self, command: str, params: str = "") -> dict[str, Any]:
        result = self.lab.run(
            self.host.ns,
            [PYTHON, "-c", _BARESIP_COMMAND, str(BARESIP_CTRL_PORT), command, params],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def wait_calls_ended(self, count: int, timeout: float = 30) -> None:
        """Until baresip has logged `count` calls as terminated."""
        wait_until(
            lambda: self.output().count(" terminated (duration") >= count,
            timeout,
            f"baresip: {count} call(s) ended",
        )

    def recordings(self) -> list[Path]:
        """What baresip heard, one WAV file per call, oldest first."""
        return sorted(self.dir.glob("dump-*-dec.wav"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


SIPP_PORT = 5070  # in the phone's own namespace


def sipp_in_lab(
    binary: str,
    offices: Offices,
    office: int,
    phone: int,
    scenario: Path,
    workdir: Path,
    *args: str,
    target: bool = True,
) -> subprocess.Popen[bytes]:
    """SIPp as office `office`'s phone `phone`, from its address and port 5070, one call;
    `target` aims it at the office's remote host (a UAC); without, it waits (a UAS). Its
    message trace is `workdir/<scenario>-<ext>.messages`, its screen `.screen`. The caller
    stops it (it gives up by itself after 30 s)."""
    host = offices.lab.office(office).host(f"p{phone}")
    workdir.mkdir(parents=True, exist_ok=True)
    trace = workdir / f"{scenario.stem}-{office}00{phone}.messages"
    argv = [binary]
    if target:
        argv.append(f"{offices.server(office)}:5060")
    argv += [
        "-sf", str(scenario), "-t", "u1", "-i", host.address, "-p", str(SIPP_PORT),
        "-m", "1", "-timeout", "30s", "-timeout_error", "-nostdin",
        "-trace_msg", "-message_file", str(trace), *args,
    ]  # fmt: skip
    # The screen goes to a file: nobody reads a pipe while SIPp runs, and a full one stops it.
    with trace.with_suffix(".screen").open("wb") as screen:
        sipp: subprocess.Popen[bytes] = offices.lab.popen(
            host.ns, argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=screen,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    return sipp
