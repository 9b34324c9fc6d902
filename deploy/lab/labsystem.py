"""Running our real programs (as processes) in the NAT lab, for the system tests and the demo.

A `LabSystem` puts a main host in the lab's main namespace and a remote host in each office's
"rh" LAN host, each with its own data directory, and reads their state back through their own
`status --json` commands, as an operator would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
PYTHON = sys.executable


class WaitTimeout(AssertionError):
    pass


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll until `probe` returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
        except Exception as exc:  # a probe may fail while things start; keep the reason
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"{what}: not within {timeout} s (last: {last!r})")
        time.sleep(interval)


class Process:
    """A program started in a namespace, its output in a log file."""

    def __init__(self, lab: Any, ns: str, argv: list[str], log: Path) -> None:
        self.lab, self.ns, self.argv, self.log = lab, ns, argv, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = self.lab.popen(self.ns, self.argv, stdout=out, stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class LabSystem:
    def __init__(
        self,
        lab: Any,
        workdir: Path,
        *,
        main_args: tuple[str, ...] = (),
        names: dict[int, str] | None = None,
    ) -> None:
        self.lab = lab
        self.names = names or {}
        self.workdir = workdir
        self.main_data = workdir / "mainhost"
        self.main: Process | None = None
        self.remotes: dict[int, Process] = {}
        first, second = lab.main_addresses
        self.run_main(
            "init",
            "--public-address",
            first,
            "--stun-alternate-address",
            second,
            *main_args,
        )

    def office_name(self, office: int) -> str:
        return self.names.get(office, f"office{office}")

    def remote_data(self, office: int) -> Path:
        return self.workdir / f"remotehost-{office}"

    def run_main(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(
            self.lab.main_ns, ["mainhost", *args, "--data", str(self.main_data)], check=check
        )

    def run_remote(
        self, office: int, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        host = self.lab.office(office).host("rh")
        return self._run(
            host.ns, ["remotehost", *args, "--data", str(self.remote_data(office))], check=check
        )

    def _run(self, ns: str, argv: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
        program, *rest = argv
        result: subprocess.CompletedProcess[str] = self.lab.run(
            ns, [PYTHON, "-m", program, *rest], capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def start_main(self) -> Process:
        if self.main is None:
            self.main = Process(
                self.lab,
                self.lab.main_ns,
                [PYTHON, "-m", "mainhost", "serve", "--data", str(self.main_data)],
                self.workdir / "mainhost.log",
            )
        else:
            self.main.start()
        wait_until(lambda: self.main_status()["running"], 20, "main host serving")
        return self.main

    def add_office(self, office: int, extensions: str) -> str:
        out = self.run_main("office", "add", self.office_name(office), "--extensions", extensions)
        return out.stdout.strip().splitlines()[-1]

    def join(self, office: int, token: str) -> None:
        self.run_remote(office, "join", token)

    def start_remote(self, office: int) -> Process:
        host = self.lab.office(office).host("rh")
        process = Process(
            self.lab,
            host.ns,
            [PYTHON, "-m", "remotehost", "serve", "--data", str(self.remote_data(office))],
            self.workdir / f"remotehost-{office}.log",
        )
        self.remotes[office] = process
        return process

    def main_status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.run_main("status", "--json").stdout)
        return result

    def office_status(self, office: int) -> dict[str, Any]:
        for entry in self.main_status()["offices"]:
            if entry["name"] == self.office_name(office):
                result: dict[str, Any] = entry
                return result
        raise AssertionError(f"{self.office_name(office)} not in mainhost status")

    def remote_status(self, office: int) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.run_remote(office, "status", "--json").stdout)
        return result

    def logs(self) -> str:
        parts = []
        for process in [self.main, *self.remotes.values()]:
            if process is not None:
                parts.append(f"--- {process.log.name}\n{process.output()[-4000:]}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        for process in [*self.remotes.values(), self.main]:
            if process is not None:
                process.stop()
