"""A real office on loopback for real SIP peers: a main host and one remote host as processes.

The peer tests (tests/test_registrar_peers.py) and the benchmark (bench/register_sipp.py) do what
an operator does: `mainhost init`, `office add`, `remotehost join`, then `serve` both, each as
its own process with its own data directory, on loopback ports found by binding port 0 and
closing again (a port someone takes in between makes a host exit naming the port: we retry with
new ports). Then SIPp, baresip and sipvicious talk to the remote host's SIP port as phones would.

This module owns starting and stopping those processes (SIGTERM, then SIGKILL: nothing outlives
`close()`), reading both hosts' status (through their control sockets, which is what
`status --json` prints; `*_status_cli` runs the command itself), waiting for a condition with a
deadline, and running SIPp. It asserts nothing about SIP: the tests do.

Phones are written straight into the main host's store (what `mainhost phone add` does, without
starting a Python process per phone), so a benchmark can have hundreds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mainhost.config import load as load_main_config
from mainhost.store import DB_NAME as MAIN_DB
from mainhost.store import MainStore
from remotehost.config import CONFIG_NAME as REMOTE_CONFIG
from remotehost.config import load as load_remote_config
from remotehost.location import DB_NAME as LOCATION_DB
from shared import config as cfg
from shared.aio import control

LOOPBACK = "127.0.0.1"
SIPP_DIR = Path(__file__).resolve().parent / "sipp"
GUARD = 30.0  # seconds: a hang guard for one wait, never a timing assertion
T = TypeVar("T")

# Which Debian package installs each peer (deploy/setup.sh installs them all).
PEER_PACKAGES = {
    "sipp": "sip-tester",
    "baresip": "baresip-core",
    "svwar": "sipvicious",
    "svcrack": "sipvicious",
    "tshark": "tshark",
}


class MissingPeer(Exception):
    """A peer program is not installed; the message names the Debian package."""


class HostFailed(Exception):
    """A host process exited or never became ready; the message carries its log's tail."""


def peer_binary(name: str) -> str:
    """The path of a peer program, or MissingPeer naming the package that installs it."""
    path = shutil.which(name)
    if path is None:
        package = PEER_PACKAGES.get(name, name)
        raise MissingPeer(
            f"{name} is not installed: it comes with the Debian package {package}"
            f" (apt-get install {package}; deploy/setup.sh installs it)"
        )
    return path


# --- ports ---------------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM, ip: str = LOOPBACK) -> int:
    """A port nobody uses on `ip` right now (bound to port 0, read back, closed)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((ip, 0))
        port: int = sock.getsockname()[1]
        return port


def free_sip_port(ip: str = LOOPBACK, avoid: Sequence[int] = ()) -> int:
    """A port free for both UDP and TCP on `ip` (SIP listens on both)."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM, ip)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                tcp.bind((ip, port))
            except OSError:
                continue
        return port
    raise OSError("no port free for both UDP and TCP")


def distinct_ports(count: int, kinds: Sequence[int]) -> list[int]:
    """`count` different free ports, the i-th of socket type kinds[i]."""
    ports: list[int] = []
    for i in range(count):
        port = free_port(kinds[i])
        while port in ports:
            port = free_port(kinds[i])
        ports.append(port)
    return ports


# --- waiting -------------------------------------------------------------------------------


def wait_for(
    probe: Callable[[], T | None], what: str, guard: float = GUARD, interval: float = 0.1
) -> T:
    """Poll `probe` until it returns something truthy and return it; TimeoutError after `guard`.

    `probe` may raise control.ControlError (a host between processes): that counts as not yet.
    """
    deadline = time.monotonic() + guard
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
        except control.ControlError as exc:
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"waited {guard:.0f} s for {what}{detail}")
        time.sleep(interval)


# --- processes -----------------------------------------------------------------------------


def host_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BRANCHPBX_MAINHOST_DATA", None)
    env.pop("BRANCHPBX_REMOTEHOST_DATA", None)
    env["COLUMNS"] = "200"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(program: str, *args: str | Path, timeout: float = 60.0) -> str:
    """`python -m program args...`; its stdout, or HostFailed with its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", program, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=host_env(),
        check=False,
    )
    if result.returncode != 0:
        raise HostFailed(f"{program} {args[0]} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def stop_process(
    process: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 10.0
) -> int:
    """Send `sig`, wait up to `grace` seconds, then SIGKILL; return the exit status."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
    return process.returncode


class HostProcess:
    """`python -m PROGRAM serve --data DATA`, output to a log file."""

    def __init__(self, program: str, data: Path, log: Path) -> None:
        self.program = program
        self.data = data
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.program, "serve", "-v", "--data", str(self.data)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=host_env(),
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        status = stop_process(self.process, sig)
        self.process = None
        return status

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def status(self) -> dict[str, Any]:
        """What `PROGRAM status --json` prints while the host runs (ControlError if it doesn't)."""
        result: dict[str, Any] = control.call(self.data, "status")
        return result

    def wait_ready(self, ready: Callable[[dict[str, Any]], bool], what: str, guard: float) -> None:
        def probe() -> bool:
            if not self.alive:
                raise HostFailed(f"{self.program} exited:\n{self.log_tail()}")
            return ready(self.status())

        try:
            wait_for(probe, what, guard)
        except TimeoutError as exc:
            raise HostFailed(f"{exc}\n{self.log_tail()}") from None


# --- the office ----------------------------------------------------------------------------


@dataclass
class Office:
    """One main host with one office (`name`, extensions `extensions`) and its remote host."""

    root: Path
    phones: dict[str, str]
    name: str = "berlin"
    extensions: str = "2000-2099"
    keepalive_interval: float | None = None
    sip_port: int = 0
    stun_port: int = 0
    main: HostProcess = field(init=False)
    remote: HostProcess = field(init=False)

    def __post_init__(self) -> None:
        self.main_data = self.root / "mainhost"
        self.remote_data = self.root / "remotehost"
        self.main = HostProcess("mainhost", self.main_data, self.root / "mainhost.log")
        self.remote = HostProcess("remotehost", self.remote_data, self.root / "remotehost.log")

    # -- start and stop --

    def start(self, attempts: int = 3) -> None:
        """Init, add the office and phones, join, serve both; retry with new ports on a clash."""
        for attempt in range(attempts):
            try:
                self._start_main()
                break
            except HostFailed:
                self.main.stop()
                if attempt == attempts - 1:
                    raise
                shutil.rmtree(self.main_data, ignore_errors=True)
        token = run_cli("mainhost", "office", "token", self.name, "--data", self.main_data)
        self.sip_port = free_sip_port()
        run_cli(
            "remotehost",
            "join",
            token.strip().splitlines()[-1],
            "--data",
            self.remote_data,
            "--sip-port",
            str(self.sip_port),
        )
        for attempt in range(attempts):
            self.write_remote_config()
            try:
                self.start_remote()
                return
            except HostFailed:
                self.remote.stop()
                if attempt == attempts - 1:
                    raise
                self.sip_port = free_sip_port()

    def _start_main(self) -> None:
        trunk, stun, alternate, api = distinct_ports(
            4, [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_DGRAM, socket.SOCK_STREAM]
        )
        self.stun_port = stun
        run_cli(
            "mainhost", "init", "--data", self.main_data, "--public-address", LOOPBACK,
            "--listen", LOOPBACK, "--trunk-port", str(trunk), "--stun-port", str(stun),
            "--stun-alternate-port", str(alternate), "--api-port", str(api), "--media-port", "0",
        )  # fmt: skip
        run_cli(
            "mainhost", "office", "add", self.name, "--extensions", self.extensions,
            "--data", self.main_data,
        )  # fmt: skip
        self.add_phones(self.phones)
        self.main.start()
        self.main.wait_ready(lambda s: bool(s.get("running")), "the main host to answer", GUARD)

    def add_phones(self, phones: dict[str, str]) -> None:
        """What `mainhost phone add EXT --password P` does, for many phones in one process."""
        realm = load_main_config(self.main_data).sip.realm
        store = MainStore(self.main_data / MAIN_DB)
        try:
            for ext, password in phones.items():
                store.add_phone(ext, password, realm, "")
        finally:
            store.close()

    def write_remote_config(self) -> None:
        """The joined config, aimed at this main host's STUN port, SIP on loopback only."""
        config = load_remote_config(self.remote_data)
        sip = dataclasses.replace(config.sip, listen=LOOPBACK, port=self.sip_port)
        if self.keepalive_interval is not None:
            sip = dataclasses.replace(sip, keepalive_interval=self.keepalive_interval)
        config = dataclasses.replace(
            config,
            stun=dataclasses.replace(config.stun, port=self.stun_port, probe_timeout=2.0),
            trunk=dataclasses.replace(config.trunk, backoff_max=0.5),
            sip=sip,
        )
        (self.remote_data / REMOTE_CONFIG).write_text(cfg.dump(config))

    def start_remote(self, guard: float = GUARD) -> None:
        """Serve the remote host; ready when online with every phone in its mirror."""
        self.remote.start()

        def ready(status: dict[str, Any]) -> bool:
            return bool(
                status.get("online")
                and status.get("sip_address")
                and status["directory"]["extensions"] >= len(self.phones)
            )

        self.remote.wait_ready(ready, "the remote host online with its directory", guard)

    def stop_remote(self, sig: int = signal.SIGTERM) -> int | None:
        return self.remote.stop(sig)

    def close(self) -> None:
        self.remote.stop()
        self.main.stop()

    # -- status --

    def remote_status(self) -> dict[str, Any]:
        return self.remote.status()

    def main_status(self) -> dict[str, Any]:
        return self.main.status()

    def remote_status_cli(self) -> dict[str, Any]:
        """`remotehost status --json`, run as an operator would."""
        result: dict[str, Any] = json.loads(
            run_cli("remotehost", "status", "--json", "--data", self.remote_data)
        )
        return result

    def main_status_cli(self) -> dict[str, Any]:
        """`mainhost status --json`, run as an operator would."""
        result: dict[str, Any] = json.loads(
            run_cli("mainhost", "status", "--json", "--data", self.main_data)
        )
        return result

    def office_entry(self, main_status: dict[str, Any] | None = None) -> dict[str, Any]:
        status = main_status if main_status is not None else self.main_status()
        for office in status["offices"]:
            if office["name"] == self.name:
                result: dict[str, Any] = office
                return result
        raise KeyError(self.name)

    def registrations(self, ext: str | None = None) -> list[dict[str, Any]]:
        """The remote host's bindings (of `ext`, or all)."""
        regs: list[dict[str, Any]] = self.remote_status().get("registrations") or []
        return [r for r in regs if ext is None or r["ext"] == ext]

    def main_registrations(self, ext: str | None = None) -> list[dict[str, Any]]:
        """The bindings the main host was told about (empty while the office is offline)."""
        regs: list[dict[str, Any]] = self.office_entry().get("registrations") or []
        return [r for r in regs if ext is None or r["ext"] == ext]

    def sip_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.remote_status()["sip"]
        return stats

    def stored_bindings(self, ext: str) -> list[dict[str, Any]]:
        """Rows of the remote host's location.db for `ext` (what survives a crash)."""
        path = self.remote_data / LOCATION_DB
        if not path.exists():
            return []
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM bindings WHERE ext=?", (ext,)).fetchall()
        finally:
            db.close()
        return [dict(r) for r in rows]


@contextlib.contextmanager
def open_office(
    root: Path,
    phones: dict[str, str],
    *,
    keepalive_interval: float | None = None,
    extensions: str = "2000-2099",
) -> Iterator[Office]:
    """A running main host and remote host with `phones`; both stopped on exit, always."""
    root.mkdir(parents=True, exist_ok=True)
    office = Office(root, phones, extensions=extensions, keepalive_interval=keepalive_interval)
    try:
        office.start()
        yield office
    finally:
        office.close()


def find_binding(regs: list[dict[str, Any]], ext: str, contact_part: str) -> dict[str, Any] | None:
    """The registration of `ext` whose contact contains `contact_part` (e.g. ':PORT')."""
    for reg in regs:
        if reg["ext"] == ext and contact_part in reg["contact"]:
            return reg
    return None


# --- SIPp ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SippRun:
    returncode: int
    output: str
    messages: str  # the -trace_msg log: every message sent and received

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def received(self) -> list[str]:
        """The messages SIPp received, in order (from the -trace_msg log)."""
        out = []
        for block in re.split(r"^-{20,}.*$", self.messages, flags=re.M):
            head, _, body = block.strip("\n").partition("\n")
            if re.match(r"(UDP|TCP) message received", head):
                out.append(body.strip("\n"))
        return out

    def statuses(self) -> list[int]:
        """Status codes of the responses SIPp received, in order."""
        return [int(m.split()[1]) for m in self.received() if m.startswith("SIP/2.0 ")]


def write_injection(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    """A SIPp injection file (-inf): SEQUENTIAL, then one row of fields per call."""
    path.write_text("SEQUENTIAL\n" + "".join(";".join(row) + ";\n" for row in rows))
    return path


def sipp_auth(ext: str, password: str) -> str:
    """An injection field that SIPp expands as the [authentication] keyword.

    SIPp 3.6 does not expand [fieldN] inside `[authentication username=... password=...]`,
    but a field whose value IS that keyword works, so each row can carry its own credentials.
    """
    return f"[authentication username={ext} password={password}]"


@dataclass(frozen=True)
class SippCommand:
    """A SIPp command line and where its message trace goes."""

    argv: list[str]
    workdir: Path
    trace: Path
    local_port: int


def sipp_command(
    scenario: str | Path,
    workdir: Path,
    *,
    target: tuple[str, int] | None,
    fields: Sequence[Sequence[str]] = (),
    auth: tuple[str, str] | None = None,
    transport: str = "u1",
    local_ip: str = LOOPBACK,
    local_port: int | None = None,
    calls: int | None = 1,
    timeout: float = 15.0,
    extra: Sequence[str] = (),
) -> SippCommand:
    """SIPp as a UAC (with a target) or a UAS (without), bound to `local_ip`.

    `scenario` is a file in tests/sipp or a path. The local port is a free one unless given
    (SIPp would take 5060). `calls=None` runs until stopped (or `timeout`).
    """
    sipp = peer_binary("sipp")
    path = Path(scenario) if os.sep in str(scenario) else SIPP_DIR / scenario
    workdir.mkdir(parents=True, exist_ok=True)
    port = local_port or free_sip_port(local_ip)
    name = f"sipp-{port}-{time.monotonic_ns()}"
    trace = workdir / f"{name}.messages"
    argv = [sipp]
    if target is not None:
        argv.append(f"{target[0]}:{target[1]}")
    argv += ["-sf", str(path), "-t", transport, "-i", local_ip, "-bind_local", "-p", str(port)]
    argv += ["-timeout", f"{timeout:g}s", "-timeout_error"]
    if calls is not None:
        argv += ["-m", str(calls)]
    # No BYE for a call that failed: a REGISTER dialog has nothing to end.
    argv += ["-default_behaviors", "all,-bye"]
    argv += ["-trace_msg", "-message_file", str(trace), "-nostdin"]
    if fields:
        argv += ["-inf", str(write_injection(workdir / f"{name}.csv", fields))]
    if auth is not None:
        argv += ["-au", auth[0], "-ap", auth[1]]
    argv += list(extra)
    return SippCommand(argv, workdir, trace, port)


def run_sipp(scenario: str | Path, workdir: Path, **options: Any) -> SippRun:
    """Run SIPp to completion (`sipp_command`'s options) and collect what it did."""
    command = sipp_command(scenario, workdir, **options)
    result = subprocess.run(
        command.argv,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=float(options.get("timeout", 15.0)) + 15.0,
        check=False,
    )
    trace = command.trace
    messages = trace.read_text(errors="replace") if trace.exists() else ""
    return SippRun(result.returncode, result.stdout + result.stderr, messages)


class BackgroundSipp:
    """SIPp running while the test does other things; `finish()` waits for it, `stop()` ends it.

    Its screen goes to a file, not a pipe: nobody reads it while SIPp runs, and a full pipe
    would stop SIPp.
    """

    def __init__(self, scenario: str | Path, workdir: Path, **options: Any) -> None:
        self.command = sipp_command(scenario, workdir, **options)
        self.screen = self.command.trace.with_suffix(".screen")
        with self.screen.open("wb") as screen:
            self.process = subprocess.Popen(
                self.command.argv,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=screen,
                stderr=subprocess.STDOUT,
            )

    @property
    def local_port(self) -> int:
        return self.command.local_port

    def call_id(self, call_number: int = 1) -> str:
        """SIPp's [call_id] of a call: '[call_number]-[pid]@[local_ip]'."""
        ip = self.command.argv[self.command.argv.index("-i") + 1]
        return f"{call_number}-{self.process.pid}@{ip}"

    def run(self) -> SippRun:
        trace = self.command.trace
        messages = trace.read_text(errors="replace") if trace.exists() else ""
        output = self.screen.read_text(errors="replace") if self.screen.exists() else ""
        return SippRun(self.process.returncode, output, messages)

    def finish(self, guard: float = GUARD) -> SippRun:
        try:
            self.process.wait(guard)
        except subprocess.TimeoutExpired:
            self.stop()
        return self.run()

    def stop(self) -> SippRun:
        stop_process(self.process)
        return self.run()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat, utime and stime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")
